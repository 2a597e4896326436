"""The arms the plans draw on, built from fields (protocol v2/v3's mirror-member arms, the cross-seed arms on
several bases' proposals), and the choices a plan reads from finished arms and the audit (always validation, never
the test cases). The plans themselves, as lists of stages: plan_v2.py, plan_cross_seed.py, plan_folds.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from benchmarks.low_label import models
from benchmarks.low_label.arms import Arm
from benchmarks.low_label.catalogue import (
    ORACLE_SWEEP,
    PREFERENCE_VARIANTS,
    cross_model_proposals,
    variant_applies,
)
from benchmarks.low_label.protocols import PROTOCOL_V2, Schedule
from benchmarks.low_label.results import validation_dice

CROSS_SEED_DATASET = PROTOCOL_V2.dataset_id  # the cross-seed arms run on v2's and v3's dataset
GATE_ARMS = (
    Arm("base", 0),
    Arm("upper", 0),
    Arm("rn_dpo", 0, "oracle_reliable"),
    Arm("self_train", 0, "oracle_reliable"),
)


def self_train_arm(judge: str, seed: int) -> Arm:
    """Self-training with `judge`'s pick on the seed's mirror-member proposals (the arm every RN-DPO arm of the
    v2/v3 plan is compared with)."""
    return Arm("self_train", seed, judge)


def build_arms_v2(
    best_label_free: str, label_free: tuple[str, ...], seeds=(0, 1, 2), recommended_mining: Optional[str] = None
) -> list[Arm]:
    """Protocol v2, most important first: the sanity gate, the oracle reliability sweep, every label-free
    judge, then more seeds of the best one. RN-DPO and self-training always side by side. `recommended_mining`:
    the mining the audit recommends for the best label-free judge (`audit_mining`), if not top_bottom, is tried
    with it on seed 0 right after its top_bottom arm."""

    def pair(judge, seed):
        return [Arm("rn_dpo", seed, judge), self_train_arm(judge, seed)]

    arms = [Arm("base", 0), Arm("upper", 0), *pair("oracle_reliable", 0)]
    for judge in ORACLE_SWEEP[1:]:
        arms += pair(judge, 0)
    for judge in label_free:
        arms += pair(judge, 0)
        if judge == best_label_free and recommended_mining not in (None, "top_bottom"):
            arms.append(Arm("rn_dpo", 0, judge, recommended_mining))
    for seed in seeds[1:]:
        arms.append(Arm("base", seed))
        arms += pair(best_label_free, seed) + pair("oracle_reliable", seed)
    return arms


def preference_arms(
    seed: int = 0, judges: tuple[str, ...] = ("oracle_reliable",), mining: str = "top_bottom"
) -> list[Arm]:
    """RN-DPO under each PREFERENCE_VARIANTS setting, with each judge (the sweep itself uses the reliable oracle;
    a label-free judge's variants run when --only names them), on the seed's mirror members."""
    return [
        Arm("rn_dpo", seed, judge, mining, variant=variant, settings=dict(settings))
        for judge in judges
        for variant, settings in PREFERENCE_VARIANTS.items()
        if variant_applies(judge, settings)
    ]


def at_larger_step(plain: Arm, sft_weight: float, schedule: Schedule) -> Arm:
    """`plain` self-training at `sft_weight` times the learning rate: the control for RN-DPO at that SFT weight. Its
    SFT term is self-training's Dice+CE times the weight, which under SGD is self-training at the weight times the
    step (weight decay and gradient clipping aside); without this control, RN-DPO's lead over self-training could be
    its larger step, not its preference term."""
    return replace(plain, step=sft_weight, settings={**plain.settings, "initial_lr": schedule.tune_lr * sft_weight})


def larger_sft_weights() -> list[float]:
    """The SFT weights of the PREFERENCE_VARIANTS settings that raise it (each has a step-matched control)."""
    return sorted({v["sft_weight"] for v in PREFERENCE_VARIANTS.values() if "sft_weight" in v})


def preference_controls(seed: int, judges: tuple[str, ...], schedule: Schedule) -> list[Arm]:
    """For each PREFERENCE_VARIANTS setting that raises the SFT weight, self-training with each judge at that weight
    times the learning rate (`at_larger_step`): its control on the mirror-member proposals, run when --only names
    it (e.g. self_train_atlas_lr3x_s0)."""
    return [
        at_larger_step(self_train_arm(judge, seed), weight, schedule)
        for judge in judges
        for weight in larger_sft_weights()
    ]


def preference_sweep_arms(
    seeds, label_free: tuple[str, ...], best: str, recommended_mining: Optional[str], schedule: Schedule
) -> list[Arm]:
    """Every arm `--preference_sweep` can run on the v2/v3 plan, in order: each PREFERENCE_VARIANTS setting with
    the reliable oracle and each label-free judge, the best judge's settings with the mining its audit recommends
    (when that is not top_bottom), then the step-matched controls (`preference_controls`)."""
    arms = [arm for seed in seeds for arm in preference_arms(seed, ("oracle_reliable", *label_free))]
    if recommended_mining not in (None, "top_bottom"):
        arms += [arm for seed in seeds for arm in preference_arms(seed, (best,), recommended_mining)]
    return arms + [arm for seed in seeds for arm in preference_controls(seed, label_free, schedule)]


# Cross-model proposals (`--cross_seed`): each seed's base is one model of a deep ensemble trained on the same
# labeled cases from another initialisation, the stand-in for nnU-Net's 5 fold models (the folds protocol has
# them). A seed's proposals: its own base's members, each other seed's base's, and nnU-Net's ensemble of every pass.


def ensemble_name(seeds) -> str:
    """`seeds_0_1_2`: names the arms' proposals (`Arm.proposals`), the audit and the proposal stores of one
    ensemble of bases."""
    return "seeds_" + "_".join(str(seed) for seed in seeds)


def cross_seed_proposals(seed: int, seeds=(0, 1, 2), dataset_id: int = CROSS_SEED_DATASET) -> dict:
    """The `proposals` setting of a cross-seed arm: the other seeds' base checkpoints as extra proposal sources."""
    return cross_model_proposals(
        [str(models.base_folder(other, dataset_id) / "checkpoint_final.pth") for other in seeds if other != seed]
    )


def cross_seed_arms(
    seed: int,
    judges: tuple[str, ...],
    seeds=(0, 1, 2),
    stores: Path = Path("proposals"),
    minings: tuple[str, ...] = ("top_bottom",),
) -> list[Arm]:
    """RN-DPO (one arm per mining strategy) and self-training side by side with each judge, on the cross-seed
    proposals of `seed`'s base, which they share in a store of their own under `stores` (the default store of a
    base holds its mirror members)."""
    ensemble = ensemble_name(seeds)
    settings = {"proposals": cross_seed_proposals(seed, seeds), "proposal_store": str(stores / f"{ensemble}_s{seed}")}
    return [
        arm
        for judge in judges
        for arm in (
            *(Arm("rn_dpo", seed, judge, mining, proposals=ensemble, settings=settings) for mining in minings),
            Arm("self_train", seed, judge, proposals=ensemble, settings=settings),
        )
    ]


def cross_seed_preference_arms(
    seed: int,
    judge: str,
    seeds=(0, 1, 2),
    stores: Path = Path("proposals"),
    variants: Optional[dict] = None,
    mining: str = "top_bottom",
) -> list[Arm]:
    """RN-DPO with `judge` under each preference setting of `variants` (default PREFERENCE_VARIANTS), on the same
    cross-seed proposals and store as `cross_seed_arms`: the preference term's settings measured where a label-free
    judge has something to rank."""
    plain = cross_seed_arms(seed, (judge,), seeds, stores)[0]
    return [
        replace(plain, mining=mining, variant=variant, settings={**plain.settings, **settings})
        for variant, settings in (PREFERENCE_VARIANTS if variants is None else variants).items()
        if variant_applies(judge, settings)
    ]


def step_matched_self_training(
    seed: int, judge: str, sft_weight: float, schedule: Schedule, seeds=(0, 1, 2), stores: Path = Path("proposals")
) -> Arm:
    """Self-training with `judge` on the same cross-seed proposals at `sft_weight` times the learning rate
    (`at_larger_step`): the control for RN-DPO at that SFT weight."""
    plain = next(arm for arm in cross_seed_arms(seed, (judge,), seeds, stores) if arm.kind == "self_train")
    return at_larger_step(plain, sft_weight, schedule)


# ------------------------------------------------------------------------------------------------ choices
def best_preference_variant(results: dict) -> Optional[str]:
    """The preference variant of the finished RN-DPO arm with the highest final validation Dice (whole cases)."""
    return max(results, key=lambda arm: validation_dice(results[arm])).variant


def best_mining(results: dict) -> str:
    """The mining strategy of the RN-DPO arm with the highest final validation Dice (whole cases); top_bottom
    when no RN-DPO arm has finished."""
    rn_dpo = [arm for arm in results if arm.kind == "rn_dpo"]
    return max(rn_dpo, key=lambda arm: validation_dice(results[arm])).mining if rn_dpo else "top_bottom"


def audit_mining(audit: dict, judge: str) -> Optional[str]:
    """The mining strategy the audit recommends (`audit.recommend`) if it recommends `judge`, else None."""
    recommendation = audit.get("recommendation") or {}
    return recommendation.get("mining") if recommendation.get("judge") == judge else None


def best_label_free(audit: dict, label_free: tuple[str, ...]) -> str:
    """The label-free judge whose pick beats a typical proposal by most on validation (its top-1 lift)."""
    audited = [judge for judge in label_free if judge in audit["judges"]]
    return max(audited, key=lambda judge: audit["judges"][judge].get("top1_lift") or -1)
