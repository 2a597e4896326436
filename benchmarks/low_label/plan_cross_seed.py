"""The cross-seed plan (`--cross_seed`, on v2/v3): the bases of several seeds as one ensemble, the judge audit on
seed 0's cross-seed proposals (validation cases), then RN-DPO (each of CROSS_MODEL_MININGS) and self-training with
the best label-free judge there on seed 0's cross-seed proposals, the same on the other seeds' with the mining seed
0's validation preferred, with the reliable oracle on seed 0's (the ceiling), then with the oracle at each level of
ORACLE_SWEEP on seed 0's (the reliability curve); with --preference_sweep, RN-DPO with the label-free judge under
each PREFERENCE_VARIANTS setting on seed 0's, the one its validation prefers on the other seeds', the step-matched
self-training where that setting is an SFT weight (`step_matched_self_training`), then RN-DPO under that setting
with the oracle at each level on seed 0's (its reliability curve); last, the reliable oracle's arms on the other
seeds' (the ceiling beyond seed 0, with its step-matched control), then RN-DPO with the label-free judge under the
chosen setting with each of SPREAD_MININGS on seed 0's and, when validation prefers one, on the other seeds' and
with the reliable oracle on seed 0's."""

from __future__ import annotations

import json

from benchmarks.low_label import models
from benchmarks.low_label.arms import Arm
from benchmarks.low_label.catalogue import (
    CROSS_MODEL_JUDGES,
    CROSS_MODEL_MININGS,
    MEASURED_WITH,
    ORACLE_SWEEP,
    PREFERENCE_VARIANTS,
    SPREAD_MININGS,
    sft_weight_of,
)
from benchmarks.low_label.plans import (
    best_label_free,
    best_mining,
    best_preference_variant,
    cross_seed_arms,
    cross_seed_preference_arms,
    cross_seed_proposals,
    ensemble_name,
    step_matched_self_training,
)
from benchmarks.low_label.scheduling import SPLIT, Context, Stage, wait_for

RELIABLE = "oracle_reliable"


def stages(seeds=(0, 1, 2)) -> list[Stage]:
    """The plan for the ensemble of `seeds` (seed 0 among them); every choice is read from seed 0's validation."""
    others = [seed for seed in seeds if seed != 0]
    folder = "audit_" + ensemble_name(seeds)  # one audit per ensemble

    def arms_of(context: Context, seed: int, judges, minings=("top_bottom",)) -> list[Arm]:
        return cross_seed_arms(seed, judges, seeds, context.work / "proposals", minings)

    def preference(context: Context, seed: int, judge: str, mining: str = "top_bottom", variants=None) -> list[Arm]:
        """RN-DPO under `variants`, by default the setting the sweep chose (none before it chose one)."""
        chosen = context.choices.get("variants") if variants is None else variants
        return (
            cross_seed_preference_arms(seed, judge, seeds, context.work / "proposals", chosen, mining) if chosen else []
        )

    def controls(context: Context, pairs) -> list[Arm]:
        """Self-training at RN-DPO's step on its pseudo-labels, where the chosen setting raises the SFT weight."""
        weight = context.choices.get("sft_weight", MEASURED_WITH["sft_weight"])
        if weight == MEASURED_WITH["sft_weight"]:
            return []
        stores, schedule = context.work / "proposals", context.bench.schedule
        return [step_matched_self_training(seed, judge, weight, schedule, seeds, stores) for seed, judge in pairs]

    def audit(context: Context, _results) -> None:
        from benchmarks.low_label.runner import audit_on_validation

        bench = context.bench
        for seed in seeds:
            wait_for(models.base_folder(seed, bench.protocol.dataset_id) / "checkpoint_final.pth")
        label_free = (*bench.protocol.label_free, *CROSS_MODEL_JUDGES)
        if context.parts.part_id == 0:
            audit_on_validation(bench, 0, label_free, cross_seed_proposals(0, seeds), folder)
        audit = json.loads(wait_for(context.work / folder / "judge_audit.json").read_text())
        best = best_label_free(audit, label_free)
        lift = audit["judges"][best]["top1_lift"]
        print(f"best label-free judge on the cross-seed proposals: {best} (top-1 lift {lift})", flush=True)
        context.choices["best"] = best

    def choose_mining(context: Context, results: dict) -> None:
        context.choices["mining"] = mining = best_mining(results)
        print(f"RN-DPO mining chosen on seed 0's validation: {mining}", flush=True)

    def choose_variant(context: Context, swept: dict) -> None:
        """The setting seed 0's validation prefers, for the other seeds and RN-DPO's curve under it."""
        if swept:
            variant = best_preference_variant(swept)
            print(f"preference setting chosen on seed 0's validation: {variant}", flush=True)
            context.choices.update(variants={variant: PREFERENCE_VARIANTS[variant]}, sft_weight=sft_weight_of(variant))

    def choose_spread(context: Context, candidates: dict) -> None:
        if context.choices.get("variants"):
            context.choices["spread"] = mining = best_mining(candidates)
            variant = next(iter(context.choices["variants"]))
            print(f"RN-DPO mining under {variant} chosen on seed 0's validation: {mining}", flush=True)

    def if_spread(arms_of_choice):
        chosen = lambda context: context.choices.get("spread", "top_bottom") != "top_bottom"  # noqa: E731
        return lambda context: arms_of_choice(context) if chosen(context) else []

    best = lambda context: context.choices["best"]  # noqa: E731
    return [
        Stage("bases", lambda context: [Arm("base", seed) for seed in seeds], SPLIT, then=audit),
        # seed 0 first, with each mining strategy; the other seeds then take the one validation preferred
        Stage("minings", lambda c: arms_of(c, 0, (best(c),), CROSS_MODEL_MININGS), then=choose_mining),
        Stage(
            "other_seeds",
            lambda c: [arm for seed in others for arm in arms_of(c, seed, (best(c),), (c.choices["mining"],))],
        ),
        Stage("ceiling", lambda c: arms_of(c, 0, (RELIABLE,))),
        Stage("reliability_curve", lambda c: arms_of(c, 0, ORACLE_SWEEP[1:])),
        # the preference term's settings with the label-free judge, read on validation
        Stage(
            "preference_sweep",
            lambda c: preference(c, 0, best(c), variants=PREFERENCE_VARIANTS) if c.options.preference_sweep else [],
            then=choose_variant,
        ),
        Stage("preference_other_seeds", lambda c: [a for s in others for a in preference(c, s, best(c))]),
        Stage("step_matched", lambda c: controls(c, [(0, best(c)), (0, RELIABLE), *((s, best(c)) for s in others)])),
        Stage(
            "preference_reliability_curve",
            lambda c: [arm for judge in ORACLE_SWEEP for arm in preference(c, 0, judge)],
        ),
        # the ceiling on the other seeds (and under the chosen setting): is the reliable oracle's margin over
        # self-training more than seed 0's?
        Stage(
            "ceiling_other_seeds",
            lambda c: (
                [arm for seed in others for arm in arms_of(c, seed, (RELIABLE,))]
                + [arm for seed in others for arm in preference(c, seed, RELIABLE)]
                + controls(c, [(seed, RELIABLE) for seed in others])
            ),
        ),
        # the label-free judge's pairs spread over its halves, under the chosen setting: seed 0's validation
        # chooses between them and top_bottom, the other seeds follow, then the reliable oracle with it (does it
        # cost the ceiling?)
        Stage(
            "spread_minings",
            lambda c: [a for m in ("top_bottom", *SPREAD_MININGS) for a in preference(c, 0, best(c), m)],
            then=choose_spread,
        ),
        Stage(
            "spread_other_seeds",
            if_spread(lambda c: [a for s in others for a in preference(c, s, best(c), c.choices["spread"])]),
        ),
        Stage("spread_ceiling", if_spread(lambda c: preference(c, 0, RELIABLE, c.choices["spread"]))),
    ]
