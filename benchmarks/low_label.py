"""The low-label benchmark on real data (Dataset004_Hippocampus): does RN-DPO help, and is it stable, under
reliable and weak judges?

Two protocols (`--protocol`): v1, the first one (network 8-64, 3,000 base and 300 fine-tuning iterations; results in
benchmarks/results/low_label/), whose upper bound sat only 0.4 points above its base, so it could not show a gain;
v2 (network 16-128 on the 3d_fullres patch, 5,000 base and 2,000 fine-tuning iterations, 20 validation iterations
per epoch), built to see one: sanity arms first (upper bound, RN-DPO and self-training with the reliable oracle),
which gate the rest on the validation split; then the oracle reliability sweep (noise_std 0.01-0.3) and the
label-free judges, each with RN-DPO and self-training; then seeds 1 and 2 of the best label-free judge (chosen by
its top-1 lift in the validation audit). v3 is v2 with 5 labeled and 20 validation cases (v2's upper bound sat
only 1.1 points above its base on the CPU).

    python benchmarks/low_label.py --protocol v2 --work bench_output/low_label_v2 --device cuda
    python benchmarks/low_label.py --work bench_output/low_label --data ../shared/data/Dataset004_Hippocampus
    python benchmarks/low_label.py ... --only base_s0 rn_dpo_agreement_top_bottom_s0   # a subset
    python benchmarks/low_label.py ... --part_id 0 --num_parts 2                        # shard the arms
    python benchmarks/low_label.py ... --report BENCHMARKS_low_label.md                # summarise finished arms

Protocol (fixed seed, split written to <work>/split.json): L labeled training cases, V labeled validation
cases (checkpoint selection and setting choices only), U unlabeled cases (imagesUnlabeled; their labels sit in
labelsUnlabeled, read only by the oracle judge and the upper bound), T test cases (the rest, never used for
any choice). Every arm of a seed continues from the same base model. Each finished arm writes
<work>/arms/<arm>.json and is skipped on a rerun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np

from nnunet_rndpo import nnunet_paths

DATASET_ID = 940
UPPER_ID = 941
CONFIGURATION = "3d_bench"
JUDGES = {
    "oracle_reliable": ("oracle", {"noise_std": 0.005, "seed": 0}),
    "oracle_weak": ("oracle", {"flip_probability": 0.7, "seed": 0}),
    "agreement": ("agreement", {}),
    "uncertainty": ("uncertainty", {}),
    "learned_qc": ("learned_qc", {}),
    "virtual_annotator": ("virtual_annotator", {}),
    "anatomy": ("anatomy", {}),
    "agreement_anatomy": ("combination", {"judges": ["agreement", "anatomy"]}),
    # the labeled cases registered onto each case: information by a route outside the network
    "atlas": ("atlas", {}),
    "agreement_atlas": ("combination", {"judges": ["agreement", "atlas"]}),
    # cross-model proposals only (--cross_seed): each proposal against the vote of every other model
    "agreement_other_models": ("agreement", {"to": "other_models"}),
    "agreement_other_models_atlas": (
        "combination",
        {"judges": ["agreement", "atlas"], "judge_options": {"agreement": {"to": "other_models"}}},
    ),
    **{f"oracle_noise_{noise}": ("oracle", {"noise_std": noise, "seed": 0}) for noise in (0.01, 0.03, 0.1, 0.3)},
}
# the oracle at decreasing reliability: the reliable one, then the noise sweep (reliability curve)
ORACLE_SWEEP = ("oracle_reliable", *(f"oracle_noise_{noise}" for noise in (0.01, 0.03, 0.1, 0.3)))
RELIABILITY_METHODS = {"rn_dpo": "rn_dpo_{judge}_top_bottom", "self_train": "self_train_{judge}"}
MEANINGFUL_GAP = 0.01  # 1 Dice point between base and upper bound, below which "gap closed" is not reported
LABEL_FREE = ("agreement", "uncertainty", "learned_qc", "virtual_annotator")
GATE_MARGIN = 0.005  # v2: RN-DPO with the reliable oracle must beat its base by 0.5 points on validation
# What the gate and the choice of settings read: the final checkpoint's Dice on the whole validation cases
# (sliding window, as the test split is scored), not nnU-Net's per-epoch pseudo Dice on random patches. One
# 20-iteration pseudo-Dice pass varies by 0.43 points (std) on the v2 base (validation_noise.py, BENCHMARKS.md),
# and even the mean of the last 5 epochs' passes put the base 0.26 points below the mean of 8 passes of its own
# final checkpoint, in the fine-tuned arms' favour. Whole cases are deterministic for a checkpoint, and every arm
# is scored on the same cases (paired).
GATE_EPOCHS = 5


def late_validation(curve: list[float]) -> float:
    """The mean validation pseudo Dice of the last GATE_EPOCHS epochs (shown beside the gate's figure)."""
    return float(np.mean(curve[-GATE_EPOCHS:]))


def validation_dice(result: dict) -> float:
    """An arm's final checkpoint's mean foreground Dice on the whole validation cases (`score_validation`)."""
    return result["validation"]["checkpoint_final"]["foreground_mean"]


@dataclass(frozen=True)
class Schedule:
    base_epochs: int = 60
    base_iterations: int = 50
    tune_epochs: int = 6
    tune_iterations: int = 50
    val_iterations: int = 5
    base_lr: float = 1e-2
    tune_lr: float = 1e-3


@dataclass(frozen=True)
class Protocol:
    name: str
    features: tuple[int, ...]
    schedule: Schedule
    label_free: tuple[str, ...]
    # the split's sizes; the test split is the rest of the 180 cases
    labeled: int = 10
    validation: int = 10
    unlabeled: int = 120

    @property
    def gated(self) -> bool:
        """Whether the sanity gate runs first (v2 on): see build_arms_v2 and gate_verdict."""
        return self.name != "v1"


PROTOCOL_V2 = Protocol(
    "v2",
    (16, 32, 64, 128),
    Schedule(base_epochs=100, base_iterations=50, tune_epochs=40, tune_iterations=50, val_iterations=20),
    (
        "agreement",
        "anatomy",
        "agreement_anatomy",
        "learned_qc",
        "virtual_annotator",
        "uncertainty",
        "atlas",
        "agreement_atlas",
    ),
)
PROTOCOLS = {
    "v1": Protocol("v1", (8, 16, 32, 64), Schedule(), LABEL_FREE),
    "v2": PROTOCOL_V2,
    # v2 with 5 labeled cases instead of 10 and twice the validation cases: on the CPU, v2's base reached test
    # Dice 0.8665 and its upper bound only +1.1 points above it (the issue asks for 2), and its 10 validation
    # cases put a standard error of about 0.2 points on a paired difference (BENCHMARKS.md, "sanity gate").
    "v3": replace(PROTOCOL_V2, name="v3", labeled=5, validation=20, unlabeled=115),
}
QUICK_SCHEDULE = Schedule(base_epochs=2, base_iterations=5, tune_epochs=2, tune_iterations=5, val_iterations=2)


@dataclass
class Arm:
    name: str
    kind: str  # base | upper | rn_dpo | dpo | self_train
    seed: int
    judge: Optional[str] = None
    mining: str = "top_bottom"
    settings: dict = field(default_factory=dict)


def build_arms(best_label_free: str, seeds=(0, 1, 2)) -> list[Arm]:
    """Every arm, most important first (a run cut short still answers the main questions)."""
    arms = [Arm(f"base_s{s}", "base", s) for s in seeds]
    arms.append(Arm("upper_s0", "upper", 0))

    def both(judge, seed, mining="top_bottom"):
        return [Arm(f"{kind}_{judge}_{mining}_s{seed}", kind, seed, judge, mining) for kind in ("rn_dpo", "dpo")]

    for judge in (best_label_free, "oracle_weak", "oracle_reliable"):
        arms += both(judge, 0)
    arms.append(Arm("self_train_agreement_s0", "self_train", 0, "agreement"))
    for seed in seeds[1:]:
        for judge in (best_label_free, "oracle_weak"):
            arms += both(judge, seed)
    for judge in LABEL_FREE:
        if judge != best_label_free:
            arms += both(judge, 0)
    for mining in ("top_rest", "margin", "random"):
        arms.append(Arm(f"rn_dpo_{best_label_free}_{mining}_s0", "rn_dpo", 0, best_label_free, mining))
    return arms


GATE_ARMS = ("base_s0", "upper_s0", "rn_dpo_oracle_reliable_top_bottom_s0", "self_train_oracle_reliable_s0")
# The preference term's own settings (`--preference_sweep`), each as RN-DPO with the reliable oracle from the seed-0
# base, chosen on validation only (`validation_dice`) against the gate's RN-DPO arm (the defaults: sigmoid loss,
# beta 0.1, SFT weight 1). The per-voxel log-ratio gap of two labels is a logit difference whose gradient never
# shrinks: at beta 0.1 the push is still 40% of its start at 4 nats per voxel. A smaller beta pushes less; a larger
# one fades sooner; IPO stops at its target margin; a larger SFT weight holds the rest of the prediction.
PREFERENCE_VARIANTS = {
    "beta0.03": {"beta": 0.03},
    "beta1": {"beta": 1.0},
    "ipo0.5": {"objective": "ipo", "target_margin": 0.5},
    "sft3": {"sft_weight": 3.0},
    # push only some of a pair's disagreeing voxels (nnunet_rndpo/preference_region.py): those the judge's top and
    # bottom halves agree on, or those where most of the case's proposals hold the chosen label
    "consensus": {"preference_region": "ranked_consensus"},
    "majority": {"preference_region": "majority"},
    # only where the judge's own voxel probabilities side with the chosen label (judges that have them: atlas),
    # at the package's SFT weight
    "sft3_voxels": {"sft_weight": 3.0, "preference_region": "judge_voxels"},
}


def variant_applies(judge: str, settings: dict) -> bool:
    """Whether a PREFERENCE_VARIANTS setting can run with `judge` (a JUDGES key): the judge_voxels region needs a
    judge with per-voxel probabilities of its own."""
    from nnunet_rndpo.judges import judges_with_voxel_probabilities

    return settings.get("preference_region") != "judge_voxels" or JUDGES[judge][0] in judges_with_voxel_probabilities()


def variant_tag(variant: str, mining: str = "top_bottom") -> str:
    """How a preference arm's name says its PREFERENCE_VARIANTS setting: the variant, after the mining when that is
    not top_bottom (`margin_sft3`)."""
    return variant if mining == "top_bottom" else f"{mining}_{variant}"


def preference_arms(
    seed: int = 0, judges: tuple[str, ...] = ("oracle_reliable",), mining: str = "top_bottom"
) -> list[Arm]:
    """RN-DPO under each PREFERENCE_VARIANTS setting, with each judge (the sweep itself uses the reliable oracle;
    a label-free judge's variants run when --only names them). `mining` other than top_bottom is named before the
    setting (`variant_tag`: `rn_dpo_atlas_margin_sft3_s0`)."""
    return [
        Arm(
            f"rn_dpo_{judge}_{variant_tag(name, mining)}_s{seed}",
            "rn_dpo",
            seed,
            judge,
            mining=mining,
            settings=dict(settings),
        )
        for judge in judges
        for name, settings in PREFERENCE_VARIANTS.items()
        if variant_applies(judge, settings)
    ]


def self_train_arm(judge: str, seed: int) -> Arm:
    """Self-training with `judge`'s pick on the seed's mirror-member proposals (the arm every RN-DPO arm of the
    v2/v3 plan is compared with)."""
    return Arm(f"self_train_{judge}_s{seed}", "self_train", seed, judge)


def preference_controls(seed: int, judges: tuple[str, ...], schedule: Schedule) -> list[Arm]:
    """For each PREFERENCE_VARIANTS setting that raises the SFT weight, self-training with each judge at that weight
    times the learning rate (`at_larger_step`): its control on the mirror-member proposals, run when --only names
    it (e.g. self_train_atlas_lr3x_s0)."""
    return [
        at_larger_step(self_train_arm(judge, seed), weight, schedule, f"self_train_{judge}_lr{weight:g}x_s{seed}")
        for judge in judges
        for weight in sorted({v["sft_weight"] for v in PREFERENCE_VARIANTS.values() if "sft_weight" in v})
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


def at_larger_step(plain: Arm, sft_weight: float, schedule: Schedule, name: str) -> Arm:
    """`plain` self-training at `sft_weight` times the learning rate, as arm `name`: the control
    for RN-DPO at that SFT weight. Its SFT term is self-training's Dice+CE times the weight, which under SGD is
    self-training at the weight times the step (weight decay and gradient clipping aside); without this control,
    RN-DPO's lead over self-training could be its larger step, not its preference term."""
    return replace(plain, name=name, settings={**plain.settings, "initial_lr": schedule.tune_lr * sft_weight})


def preference_sweep_table(results: dict, seed: int = 0) -> list[str]:
    """Each preference variant beside the base, the default RN-DPO and self-training with the reliable oracle, by
    the final checkpoint's Dice on the whole validation cases (what the choice of defaults reads)."""
    rows = [
        ("base", f"base_s{seed}"),
        ("defaults (sigmoid, beta 0.1, SFT 1)", f"rn_dpo_oracle_reliable_top_bottom_s{seed}"),
        ("self-training", f"self_train_oracle_reliable_s{seed}"),
        *(
            (json.dumps(s), f"rn_dpo_oracle_reliable_{n}_s{seed}")
            for n, s in PREFERENCE_VARIANTS.items()
            if variant_applies("oracle_reliable", s)
        ),
    ]
    base = validation_dice(results[f"base_s{seed}"]) if f"base_s{seed}" in results else None
    lines = [
        "| arm | settings | validation Dice, whole cases (final) | vs base | validation pseudo Dice, last 5 epochs | test Dice, final (not used to choose) |",  # noqa: E501
        "|---|---|---|---|---|---|",
    ]
    for settings, name in rows:
        if name not in results:
            lines.append(f"| {name} | {settings} | not run | | | |")
            continue
        value = validation_dice(results[name])
        versus = f"{(value - base) * 100:+.2f} pts" if base is not None and not name.startswith("base") else ""
        curve = late_validation(results[name]["validation_curve"])
        test = results[name]["test"]["checkpoint_final"]["foreground_mean"]
        lines.append(f"| {name} | {settings} | {value:.4f} | {versus} | {curve:.4f} | {test:.4f} |")
    return lines


# Cross-model proposals (`--cross_seed`): each seed's base is one model of a deep ensemble trained on the same
# labeled cases from another initialisation, the stand-in here for nnU-Net's 5 fold models (`other_folds`), which
# 5 labeled cases cannot give. A seed's proposals: its own base's plain pass and mirror members, one plain pass and
# the mirror members of each other seed's base, and nnU-Net's ensemble of every pass (3 seeds: 1 + 7 + 2 + 14 + 1).
# Disagreement between models trained from different starts is information that one model's mirror flips lack.
CROSS_SEED_SOURCES = ("tta", "checkpoint", "checkpoint_tta", "ensemble")
CROSS_MODEL_JUDGES = ("agreement_other_models", "agreement_other_models_atlas")  # need several models' proposals


def cross_seed_proposals(seed: int, seeds=(0, 1, 2)) -> dict:
    """The `proposals` setting of a cross-seed arm: the other seeds' base checkpoints as extra proposal sources."""
    others = [str(base_folder(other) / "checkpoint_final.pth") for other in seeds if other != seed]
    members_per_network = 8  # the plain pass and 7 mirror flips over 3 axes
    return {
        "sources": list(CROSS_SEED_SOURCES),
        "extra_checkpoints": others,
        "num_proposals": members_per_network * (1 + len(others)) + 1,
    }


def ensemble_name(seeds) -> str:
    """`seeds_0_1_2`: names the arms, the audit and the proposal stores of one ensemble of bases."""
    return "seeds_" + "_".join(str(seed) for seed in seeds)


def cross_seed_group_name(kind: str, judge: str, ensemble: str, tag: Optional[str] = None) -> str:
    """`<kind>_<judge>_[<tag>_]<ensemble>`: the seeds of one cross-seed arm, as the report groups them. `tag`: a
    mining other than top_bottom, a preference variant, a step-matched learning rate."""
    return f"{kind}_{judge}_{tag + '_' if tag else ''}{ensemble}"


def cross_seed_arm_name(kind: str, judge: str, ensemble: str, seed: int, tag: Optional[str] = None) -> str:
    """`<group>_s<seed>`: the one place a cross-seed arm's name is made (the arms are built, the curve and the
    report look them up by it); the group is `cross_seed_group_name`."""
    return f"{cross_seed_group_name(kind, judge, ensemble, tag)}_s{seed}"


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
    name = f"{ensemble_name(seeds)}_s{seed}"
    settings = {"proposals": cross_seed_proposals(seed, seeds), "proposal_store": str(stores / name)}

    ensemble = ensemble_name(seeds)

    def rn_dpo(judge, mining):
        tag = None if mining == "top_bottom" else mining
        arm_name = cross_seed_arm_name("rn_dpo", judge, ensemble, seed, tag)
        return Arm(arm_name, "rn_dpo", seed, judge, mining=mining, settings=settings)

    return [
        arm
        for judge in judges
        for arm in (
            *(rn_dpo(judge, mining) for mining in minings),
            Arm(cross_seed_arm_name("self_train", judge, ensemble, seed), "self_train", seed, judge, settings=settings),
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
    judge has something to rank. `mining` other than top_bottom is named before the setting."""
    proposals = cross_seed_arms(seed, (judge,), seeds, stores)[0].settings
    return [
        Arm(
            cross_seed_arm_name(
                "rn_dpo",
                judge,
                ensemble_name(seeds),
                seed,
                variant_tag(variant, mining),
            ),
            "rn_dpo",
            seed,
            judge,
            mining=mining,
            settings={**proposals, **settings},
        )
        for variant, settings in (PREFERENCE_VARIANTS if variants is None else variants).items()
        if variant_applies(judge, settings)
    ]


def step_matched_self_training(
    seed: int, judge: str, sft_weight: float, schedule: Schedule, seeds=(0, 1, 2), stores: Path = Path("proposals")
) -> Arm:
    """Self-training with `judge` on the same cross-seed proposals at `sft_weight` times the learning rate
    (`at_larger_step`): the control for RN-DPO at that SFT weight."""
    plain = next(arm for arm in cross_seed_arms(seed, (judge,), seeds, stores) if arm.kind == "self_train")
    name = cross_seed_arm_name("self_train", judge, ensemble_name(seeds), seed, f"lr{sft_weight:g}x")
    return at_larger_step(plain, sft_weight, schedule, name)


def best_preference_variant(results: dict[str, dict]) -> str:
    """The PREFERENCE_VARIANTS setting of the finished `cross_seed_preference_arms` arm with the highest final
    validation Dice (whole cases), read from the settings the arm ran with (the most specific variant they hold:
    sft3_voxels holds sft3's setting too)."""
    chosen = max(results.values(), key=validation_dice)["arm"]["settings"]
    held = [name for name, setting in PREFERENCE_VARIANTS.items() if setting.items() <= chosen.items()]
    return max(held, key=lambda name: len(PREFERENCE_VARIANTS[name]))


# RN-DPO's pairs on the cross-seed proposals: the judge's best against its worst, or against the base's own
# prediction (only the voxels the pick would change); seed 0's validation chooses for the other seeds
CROSS_SEED_MININGS = ("top_bottom", "top_plain")
# tried last, under the preference setting validation chose: pairs drawn from the judge's halves, which spread a
# consensus judge's picks over the members as a noisy judge's are spread
SPREAD_MININGS = ("halves",)


def best_mining(results: dict[str, dict]) -> str:
    """The mining strategy of the RN-DPO arm with the highest final validation Dice (whole cases); top_bottom
    when no RN-DPO arm has finished."""
    rn_dpo = [result for result in results.values() if result["arm"]["kind"] == "rn_dpo"]
    return max(rn_dpo, key=validation_dice)["arm"]["mining"] if rn_dpo else "top_bottom"


def build_arms_v2(
    best_label_free: str, label_free: tuple[str, ...], seeds=(0, 1, 2), recommended_mining: Optional[str] = None
) -> list[Arm]:
    """Protocol v2, most important first: the sanity gate, the oracle reliability sweep, every label-free
    judge, then more seeds of the best one. RN-DPO and self-training always side by side. `recommended_mining`:
    the mining the audit recommends for the best label-free judge (`audit_mining`), if not top_bottom, is tried
    with it on seed 0 right after its top_bottom arm."""

    def rn_dpo(judge, seed, mining="top_bottom"):
        return Arm(f"rn_dpo_{judge}_{mining}_s{seed}", "rn_dpo", seed, judge, mining)

    def pair(judge, seed):
        return [rn_dpo(judge, seed), self_train_arm(judge, seed)]

    arms = [Arm("base_s0", "base", 0), Arm("upper_s0", "upper", 0), *pair("oracle_reliable", 0)]
    for judge in ORACLE_SWEEP[1:]:
        arms += pair(judge, 0)
    for judge in label_free:
        arms += pair(judge, 0)
        if judge == best_label_free and recommended_mining not in (None, "top_bottom"):
            arms.append(rn_dpo(judge, 0, recommended_mining))
    for seed in seeds[1:]:
        arms.append(Arm(f"base_s{seed}", "base", seed))
        arms += pair(best_label_free, seed) + pair("oracle_reliable", seed)
    return arms


def scored_results(work: Path, device: str = "cpu") -> dict:
    """Every finished arm's result, each with its validation Dice (scored and saved for arms finished before the
    gate read whole validation cases)."""
    from nnunet_rndpo.atomic import save_json

    results = {}
    for path in sorted((work / "arms").glob("*.json")):
        result = json.loads(path.read_text())
        if "validation" not in result:
            save_json(score_validation(work, path.stem, result, device), path)
        results[path.stem] = result
    return results


def gate_verdict(results: dict) -> tuple[bool, str]:
    """v2's sanity gate, on the validation split (never the test split): RN-DPO with the reliable oracle beats
    its base by GATE_MARGIN and beats self-training with the same oracle, by each final checkpoint's Dice on the
    whole validation cases (`validation_dice`)."""
    final = {name: validation_dice(results[name]) for name in GATE_ARMS if name in results}
    missing = [name for name in GATE_ARMS if name not in final]
    if missing:
        return False, f"gate arms not finished: {missing}"
    rn_dpo, base, self_train = (
        final["rn_dpo_oracle_reliable_top_bottom_s0"],
        final["base_s0"],
        final["self_train_oracle_reliable_s0"],
    )
    passed = rn_dpo >= base + GATE_MARGIN and rn_dpo > self_train
    return passed, (
        f"validation Dice (final checkpoints, whole cases): base {base:.4f}, upper {final['upper_s0']:.4f}, RN-DPO (reliable oracle) {rn_dpo:.4f}, "  # noqa: E501
        f"self-training (reliable oracle) {self_train:.4f}: gate {'passed' if passed else 'FAILED'} (RN-DPO must beat the base by "  # noqa: E501
        f"{GATE_MARGIN * 100:.1f} points and self-training)"
    )


# ------------------------------------------------------------------------------------------------ data
def make_split(data: Path, seed: int, labeled: int, validation: int, unlabeled: int) -> dict:
    from nnunet_rndpo.demo.splits import labeled_case_ids, split_cases

    sizes = [("labeled", labeled), ("validation", validation), ("unlabeled", unlabeled)]
    return {"seed": seed, "source": str(data), **split_cases(labeled_case_ids(data), seed, sizes, rest="test")}


def write_raw(data: Path, raw_root: Path, split: dict) -> None:
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.demo.splits import link_parts

    dataset_json = json.loads((data / "dataset.json").read_text())
    low = raw_root / f"Dataset{DATASET_ID}_HippoLowLabel"
    link_parts(data, low, {part: split[part] for part in ("labeled", "validation", "unlabeled", "test")})
    save_json(
        {**dataset_json, "name": "HippoLowLabel", "numTraining": len(split["labeled"]) + len(split["validation"])},
        low / "dataset.json",
    )
    upper = raw_root / f"Dataset{UPPER_ID}_HippoUpperBound"
    link_parts(data, upper, {"labeled": split["labeled"] + split["validation"] + split["unlabeled"]})
    save_json(
        {
            **dataset_json,
            "name": "HippoUpperBound",
            "numTraining": len(split["labeled"]) + len(split["validation"]) + len(split["unlabeled"]),
        },
        upper / "dataset.json",
    )


def prepare(work: Path, data: Path, seed: int, protocol: Protocol) -> dict:
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.splits import link_parts

    features = protocol.features
    split_file = work / "split.json"
    sizes = {"labeled": protocol.labeled, "validation": protocol.validation, "unlabeled": protocol.unlabeled}
    if split_file.is_file():
        split = json.loads(split_file.read_text())
        found = {part: len(split[part]) for part in sizes}
        if found != sizes:
            raise SystemExit(
                f"{split_file} holds a split of {found}, protocol {protocol.name} needs {sizes}: "
                "give each protocol its own --work folder"
            )
    else:
        split = make_split(data, seed, **sizes)
        save_json(split, split_file)
    raw_root = Path(os.environ["nnUNet_raw"])
    write_raw(data, raw_root, split)
    for dataset_id, train in ((DATASET_ID, split["labeled"]), (UPPER_ID, split["labeled"] + split["unlabeled"])):
        base = Path(os.environ["nnUNet_preprocessed"]) / nnunet_paths.find_dataset_name(dataset_id)
        if not (base / "nnUNetPlans.json").is_file():
            os.environ.pop("nnUNet_n_proc_DA", None)
            nnunet_steps.plan_and_preprocess(dataset_id, num_processes=2)
        plans = json.loads((base / "nnUNetPlans.json").read_text())
        patch = plans["configurations"]["3d_fullres"]["patch_size"]
        nnunet_steps.add_configuration(
            dataset_id, CONFIGURATION, patch_size=patch, batch_size=2, features_per_stage=features
        )
        # one fold: train on the training cases, validate on the validation cases (never on test)
        save_json([{"train": sorted(train), "val": sorted(split["validation"])}], base / "splits_final.json")
    # the validation cases as a test-like folder (imagesTs/labelsTs), so that checkpoints are scored on them
    # exactly as on the test split
    link_parts(data, validation_folder(work), {"test": split["validation"]})
    os.environ["nnUNet_n_proc_DA"] = "0"
    return split


def prepare_once(work: Path, data: Path, seed: int, protocol: Protocol, poll_seconds: float = 20.0) -> None:
    """`prepare`, one process at a time: two parts started together on a fresh work folder both planned and
    preprocessed, and nnU-Net's preprocessing of one removed the files the other had written (seen 2026-12-01).
    A later process still runs `prepare`, which then finds the plans and only rewrites the small files."""
    work.mkdir(parents=True, exist_ok=True)
    while True:
        with claim(work, "prepare") as claimed:
            if claimed:
                prepare(work, data, seed, protocol)
                return
        print("waiting for another part to prepare the datasets", flush=True)
        time.sleep(poll_seconds)


def validation_folder(work: Path) -> Path:
    return work / "validation_cases"


def score_validation(work: Path, name: str, result: dict, device: str = "cpu") -> dict:
    """Adds the final checkpoint's Dice on the whole validation cases to a finished arm's result (once)."""
    if "validation" not in result:
        checkpoint = Path(result["folder"]) / "checkpoint_final.pth"
        predictions = work / "predictions" / name / "validation_final"
        scores = evaluate_checkpoint(checkpoint, predictions, device, validation_folder(work))
        result["validation"] = {"checkpoint_final": scores}
    return result


# ------------------------------------------------------------------------------------------------ runs
def unique_trainer(base_class, arm_name: str):
    """A subclass named after the arm, so each arm has its own nnU-Net output folder."""
    name = "Bench_" + arm_name
    return type(name, (base_class,), {"__module__": __name__})


def base_folder(seed: int) -> Path:

    return nnunet_paths.trainer_output_folder(DATASET_ID, CONFIGURATION, 0, trainer_name=f"Bench_base_s{seed}")


# The preference settings every arm of these protocols was measured with, where a default has moved since: an arm's
# result stays what its name and BENCHMARKS.md say it is (the SFT weight default became 3 on these measurements).
MEASURED_WITH = {"sft_weight": 1.0}


def fine_tuning_settings(arm: Arm, schedule: Schedule) -> dict:
    """The RNDPO_SETTINGS of a fine-tuning arm: its base, judge, mining, seed and schedule, MEASURED_WITH, then the
    arm's own settings (a preference variant's change wins)."""
    judge, options = JUDGES[arm.judge]
    return {
        "base_checkpoint": str(base_folder(arm.seed) / "checkpoint_final.pth"),
        "judge": judge,
        "judge_options": options,
        "mining": arm.mining,
        "seed": arm.seed,
        "num_epochs": schedule.tune_epochs,
        "iterations_per_epoch": schedule.tune_iterations,
        "val_iterations_per_epoch": schedule.val_iterations,
        "initial_lr": schedule.tune_lr,
        **MEASURED_WITH,
        **arm.settings,
    }


def run_arm(arm: Arm, schedule: Schedule, work: Path, threads: int, device: str = "cpu") -> dict:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.training.settings import SETTINGS_ENV_VARIABLE
    from nnunet_rndpo.training.trainers import nnUNetTrainerDPO, nnUNetTrainerRNDPO, nnUNetTrainerSelfTrain

    torch.set_num_threads(threads)
    started = time.perf_counter()
    if arm.kind in ("base", "upper"):
        dataset_id = DATASET_ID if arm.kind == "base" else UPPER_ID
        epochs = schedule.base_epochs
        folder = nnunet_steps.train_supervised(
            dataset_id,
            CONFIGURATION,
            0,
            num_epochs=epochs,
            iterations_per_epoch=schedule.base_iterations,
            val_iterations=schedule.val_iterations,
            trainer_class=unique_trainer(nnUNetTrainer, arm.name),
            initial_lr=schedule.base_lr,
            seed=arm.seed,
            num_threads=threads,
            device=device,
        )
        phases = {"training_s": time.perf_counter() - started}
    else:
        trainer_class = {"rn_dpo": nnUNetTrainerRNDPO, "dpo": nnUNetTrainerDPO, "self_train": nnUNetTrainerSelfTrain}[
            arm.kind
        ]
        settings = fine_tuning_settings(arm, schedule)
        settings_file = work / "settings" / f"{arm.name}.json"
        settings_file.parent.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=2))
        os.environ[SETTINGS_ENV_VARIABLE] = str(settings_file)
        folder = nnunet_steps.train_supervised(
            DATASET_ID,
            CONFIGURATION,
            0,
            num_epochs=settings["num_epochs"],
            iterations_per_epoch=settings["iterations_per_epoch"],
            val_iterations=settings["val_iterations_per_epoch"],
            trainer_class=unique_trainer(trainer_class, arm.name),
            initial_lr=settings["initial_lr"],  # an arm's own (e.g. the step-matched self-training) wins
            seed=arm.seed,
            num_threads=threads,
            device=device,
        )
        os.environ.pop(SETTINGS_ENV_VARIABLE, None)
        phases = {"total_s": time.perf_counter() - started}
    result = {"arm": asdict(arm), "folder": str(folder), "seconds": phases, "schedule": asdict(schedule)}
    result["validation_curve"] = _validation_curve(folder)
    result["test"] = {}
    for checkpoint in ("checkpoint_final.pth", "checkpoint_best.pth"):
        predictions = work / "predictions" / arm.name / checkpoint.split(".")[0]
        result["test"][checkpoint.split(".")[0]] = evaluate_checkpoint(folder / checkpoint, predictions, device)
    if arm.kind not in ("base", "upper"):
        result["pairs"] = json.loads((folder / "rndpo_pairs.json").read_text())["summary"]
        result["log_timings"] = phase_seconds(folder)
    return result


def _validation_curve(folder: Path) -> list[float]:
    import torch

    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    return [float(v) for v in checkpoint["logging"]["mean_fg_dice"]]


_PROPOSALS_LINE = re.compile(r"proposals: (\d+) cases \((\d+) generated.*?, ([\d.]+) s \(")


def _stamp(line: str) -> Optional[float]:
    """Seconds since the epoch of an nnU-Net log line ('2026-11-23 19:24:36.844298: ...'), None if it has none."""
    try:
        return datetime.strptime(line[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None


def phase_seconds(folder: Path) -> dict:
    """Wall seconds of a fine-tuning arm's phases, from the timestamps of its last nnU-Net training log.

    proposals_generated / proposals_s: cases generated in this run and the seconds it took (an arm that finds
    its seed's store filled pays 0); judging_s: scoring and mining (a judge's scores are cached in the store,
    so the second arm with the same judge pays about 1 s); fine_tuning_s: first epoch to 'Training done'."""
    for log in sorted(folder.glob("training_log_*.txt"), reverse=True):
        lines = log.read_text().splitlines()
        marks = {}
        for line in lines:
            if ": proposals: " in line and "proposals" not in marks:
                match = _PROPOSALS_LINE.search(line)
                marks["proposals"] = (_stamp(line), match)
            elif ": training items: " in line:
                marks["items"] = (_stamp(line), None)
            elif line[28:].startswith("Training done"):
                marks["done"] = (_stamp(line), None)
        if {"proposals", "items", "done"} <= set(marks):
            match = marks["proposals"][1]
            return {
                "proposals_generated": int(match.group(2)) if match else None,
                "proposals_s": float(match.group(3)) if match else None,
                "judging_s": marks["items"][0] - marks["proposals"][0],
                "fine_tuning_s": marks["done"][0] - marks["items"][0],
            }
    return {}


def evaluate_checkpoint(checkpoint: Path, predictions: Path, device: str = "cpu", cases: Optional[Path] = None) -> dict:
    """Predict the test images (or those of `cases`/imagesTs) with a checkpoint (no trainer look-up) and compute
    Dice per class."""
    from nnunet_rndpo.demo import nnunet_steps

    raw = cases or Path(os.environ["nnUNet_raw"]) / nnunet_paths.find_dataset_name(DATASET_ID)
    return nnunet_steps.evaluate_checkpoint(checkpoint, raw, predictions, device)


def audit_on_validation(
    work: Path,
    seed: int,
    threads: int,
    device: str = "cpu",
    label_free: tuple[str, ...] = LABEL_FREE,
    proposals: Optional[dict] = None,
    folder: str = "audit",
) -> dict:
    """The judge audit on the validation split: picks the best label-free judge (never the test set). `proposals`
    (a ProposalSettings dict, e.g. `cross_seed_proposals`) audits other proposals than the mirror members, into
    <work>/<folder>."""
    import torch

    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.pipeline import run_audit
    from nnunet_rndpo.proposals.members import ProposalSettings
    from nnunet_rndpo.proposals.model import load_model

    torch.set_num_threads(threads)
    output = work / folder
    if (output / "judge_audit.json").is_file():
        return json.loads((output / "judge_audit.json").read_text())
    location = locate(DATASET_ID, CONFIGURATION, 0)
    model = load_model(
        base_folder(seed) / "checkpoint_final.pth",
        device,
        expected_plans=location.plans,
        expected_configuration=CONFIGURATION,
        expected_dataset_json=location.dataset_json,
    )
    # every label-free judge and every oracle level of the sweep, each under its benchmark name: the oracles'
    # measured reliability is the x axis of the reliability curve
    specs = [(name, *JUDGES[name]) for name in (*label_free, *ORACLE_SWEEP) if name in JUDGES] + ["oracle"]
    settings = ProposalSettings.from_dict(proposals or {})
    store = work / "audit_proposals" / folder if proposals else None  # the default store holds mirror members
    return run_audit(
        model, location, specs, settings, output, device=device, margin=0.02, seed=seed, store_folder=store
    )


# ------------------------------------------------------------------------------------------------ report
@contextlib.contextmanager
def claim(folder: Path, arm_name: str):
    """Yields whether this process may run the arm: a claim file made exclusively (O_EXCL), holding the pid, so
    two runner processes over one work folder (e.g. a shard and an --only run) never train the same arm into
    the same output folder. A claim left by a process that died is taken over."""
    from nnunet_rndpo.atomic import process_is_alive

    path = folder / f"{arm_name}.claim"
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and process_is_alive(owner):
                yield False
                return
            path.unlink(missing_ok=True)  # its owner died: take over
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def _wait_for(path: Path, poll_seconds: float = 20.0) -> Path:
    """Another part of the run makes this file (a base model, the audit): wait for it."""
    while not path.is_file():
        print(f"waiting for {path} (made by another part)", flush=True)
        time.sleep(poll_seconds)
    return path


def reliability_points(audit_judges: dict, gains: dict, metric: str) -> list[tuple[str, float, float]]:
    """(judge, reliability, gain) of each oracle level that has both an audit figure and a measured gain, sorted
    by reliability; two levels of equal reliability keep the first (a curve takes one gain per reliability)."""
    points, seen = [], set()
    for judge in ORACLE_SWEEP:
        reliability = audit_judges.get(judge, {}).get(metric)
        if reliability is None or judge not in gains or reliability in seen:
            continue
        seen.add(reliability)
        points.append((judge, float(reliability), float(gains[judge])))
    return sorted(points, key=lambda point: point[1])


def reliability_arms(judge: str, ensemble: Optional[str] = None, variant: Optional[str] = None) -> dict[str, str]:
    """The seed-0 arm of each method in RELIABILITY_METHODS with `judge`: on the base's mirror members, or on the
    cross-seed proposals of `ensemble` (e.g. `seeds_0_1_2`, as `cross_seed_arms` names them); with `variant`, RN-DPO's
    arm under that PREFERENCE_VARIANTS setting (`cross_seed_preference_arms`; self-training has no preference term,
    so its arm is the same)."""
    if ensemble is None:
        return {method: f"{pattern.format(judge=judge)}_s0" for method, pattern in RELIABILITY_METHODS.items()}
    return {
        method: cross_seed_arm_name(method, judge, ensemble, 0, variant if method == "rn_dpo" else None)
        for method in RELIABILITY_METHODS
    }


def reliability_curves(
    work: Path,
    results: dict,
    figures: Optional[Path] = None,
    ensemble: Optional[str] = None,
    variant: Optional[str] = None,
) -> list[str]:
    """Gain over the base (test Dice points, seed 0, final checkpoint) of RN-DPO and self-training with the oracle
    at each noise level, against that oracle's reliability measured by the validation audit of the same proposals
    (the base's mirror members, or `ensemble`'s cross-seed proposals). Writes one curve file per method and metric
    (<work>/reliability/[<ensemble>/], the audit's `--reliability_curve` format), a PNG into `figures`, and
    returns a markdown table. Label-free judges trained on the same proposals get a row too: the gain the curve
    expects from their measured top-1 lift beside the gain they brought, which tests the curve. `variant` (cross-seed
    proposals only): RN-DPO under that PREFERENCE_VARIANTS setting (<work>/reliability/<ensemble>/<variant>/)."""
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.audit import expected_gain

    audit_file = work / ("audit" if ensemble is None else f"audit_{ensemble}") / "judge_audit.json"
    base = results.get("base_s0")
    if base is None or not audit_file.is_file():
        return []
    audit_judges = json.loads(audit_file.read_text())["judges"]
    base_dice = base["test"]["checkpoint_final"]["foreground_mean"]
    gains = {
        method: {
            judge: (results[arm]["test"]["checkpoint_final"]["foreground_mean"] - base_dice) * 100
            for judge in (*ORACLE_SWEEP, *audit_judges)
            if (arm := reliability_arms(judge, ensemble, variant)[method]) in results
        }
        for method in RELIABILITY_METHODS
    }
    if not any(judge in ORACLE_SWEEP for method_gains in gains.values() for judge in method_gains):
        return []
    folder = work / "reliability" / (ensemble or "") / (variant or "")
    curves = {}
    for method in RELIABILITY_METHODS:
        for metric in ("spearman", "top1_lift"):
            points = reliability_points(audit_judges, gains[method], metric)
            if points:
                curves[method, metric] = [[reliability, gain] for _, reliability, gain in points]
                curve = {
                    "metric": metric,
                    "points": curves[method, metric],
                    "gain_unit": "test Dice points over the base",
                    "source": f"benchmarks/low_label.py {work.name} ({ensemble or 'mirror members'}): {method} "
                    f"{'under ' + variant + ' ' if variant and method == 'rn_dpo' else ''}"
                    f"with the oracle at {', '.join(judge for judge, _, _ in points)} (seed 0)",
                }
                save_json(curve, folder / f"reliability_curve_{method}_{metric}.json")

    def cell(value, pattern):
        return "" if value is None else format(value, pattern)

    lines = [
        "| judge | noise_std | Spearman (validation audit) | top-1 lift (validation audit) | RN-DPO gain (pts) | self-training gain (pts) | the curve expects from the top-1 lift: RN-DPO / self-training (pts) |",  # noqa: E501
        "|---|---|---|---|---|---|---|",
    ]
    label_free = [judge for judge in audit_judges if judge not in ORACLE_SWEEP and judge != "oracle"]
    for judge in (*ORACLE_SWEEP, *(judge for judge in label_free if any(judge in g for g in gains.values()))):
        figures_of = audit_judges.get(judge, {})
        lift = figures_of.get("top1_lift")
        measured = [cell(gains[method].get(judge), "+.2f") for method in RELIABILITY_METHODS]
        expected = ""
        if judge not in ORACLE_SWEEP:
            expected = " / ".join(
                cell(expected_gain(lift, curve), "+.2f")
                if len(curve := curves.get((method, "top1_lift"), [])) > 1
                else ""
                for method in RELIABILITY_METHODS
            )  # one level is no curve yet: it would "expect" its own gain at any reliability
        noise = JUDGES[judge][1].get("noise_std") if judge in ORACLE_SWEEP else "label-free"
        lines.append(
            f"| {judge} | {noise} | {cell(figures_of.get('spearman'), '.3f')} | {cell(lift, '.4f')} | "
            f"{' | '.join(measured)} | {expected} |"
        )
    if figures is not None:
        name = "reliability_curve.png" if ensemble is None else f"reliability_curve_{ensemble}.png"
        if variant:
            name = name.replace(".png", f"_{variant}.png")
        proposals = ensemble or "mirror members"
        _plot_reliability(
            audit_judges, gains, figures / name, f"{proposals}, RN-DPO {variant}" if variant else proposals
        )
    return lines


def _plot_reliability(audit_judges: dict, gains: dict, path: Path, proposals: str) -> None:
    """Each method's gain against the oracle's reliability (a line), with the label-free judges trained on the same
    proposals as single points of the method's colour: on the line where the reliability tells the gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_rndpo.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("spearman", "top1_lift")):
        for method in RELIABILITY_METHODS:
            points = reliability_points(audit_judges, gains[method], metric)
            (line,) = axis.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=f"{method}, oracle")
            for judge, gain in gains[method].items():
                reliability = audit_judges.get(judge, {}).get(metric)
                if judge in ORACLE_SWEEP or reliability is None:
                    continue
                axis.scatter([reliability], [gain], marker="x", s=60, color=line.get_color(), zorder=3)
                axis.annotate(judge, (reliability, gain), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.axhline(0.0, color="k", lw=0.8)
        axis.set_xlabel(f"judge's {metric} (validation audit)")
        axis.set_ylabel("test Dice gain over the base (points)")
        axis.legend(loc="best", fontsize=8)
    figure.suptitle(f"Gain against the judge's reliability (oracle noise sweep, seed 0, {proposals}; x: label-free)")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)
    plt.close(figure)


def summarise(work: Path, figures: Optional[Path] = None) -> str:
    """A markdown table of every finished arm (and validation-curve PNGs per judge into `figures`)."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted((work / "arms").glob("*.json"))}
    if not results:
        return "no finished arms"
    split = json.loads((work / "split.json").read_text())

    def dice(result, which, label=None):
        block = result["test"][which]
        if label is None:
            return block["foreground_mean"]
        return block["mean"][str(label)] if str(label) in block["mean"] else block["mean"][label]

    grouped: dict[str, list] = {}
    for name, result in results.items():
        grouped.setdefault(name.rsplit("_s", 1)[0], []).append(result)
    base_runs, upper_runs = grouped.get("base", []), grouped.get("upper", [])
    # every fine-tuning arm continues from its seed's base: differences are paired by seed
    base_by_seed = {r["arm"]["seed"]: dice(r, "checkpoint_final") for r in base_runs}
    upper_by_seed = {r["arm"]["seed"]: dice(r, "checkpoint_final") for r in upper_runs}
    gaps = [upper_by_seed[s] - base_by_seed[s] for s in upper_by_seed if s in base_by_seed]
    gap = float(np.mean(gaps)) if gaps else None
    base_seconds = float(np.mean([r["seconds"].get("training_s", 0) for r in base_runs])) if base_runs else None
    lines = [
        f"Split (seed {split['seed']}): {len(split['labeled'])} labeled training, {len(split['validation'])} labeled validation, "  # noqa: E501
        f"{len(split['unlabeled'])} unlabeled (pool), {len(split['test'])} test cases; lists in `split.json`.",
        "",
        "| arm | seeds | validation Dice, final (whole cases) | test mean Dice, final (sustained) | test mean Dice, best-val checkpoint (peak) | class 1 / class 2 (final) | vs base (final, paired by seed) | gap to upper bound closed | pairs | wall time (s) |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = lambda item: ({"base": 0, "upper": 1}.get(item[0], 2), item[0])  # noqa: E731
    for name, runs in sorted(grouped.items(), key=order):
        finals = np.array([dice(r, "checkpoint_final") for r in runs])
        peaks = np.array([dice(r, "checkpoint_best") for r in runs])
        classes = [np.mean([dice(r, "checkpoint_final", c) for r in runs]) for c in (1, 2)]
        spread = lambda values: f" ± {values.std():.4f}" if len(values) > 1 else ""  # noqa: E731
        paired = [
            dice(r, "checkpoint_final") - base_by_seed[r["arm"]["seed"]]
            for r in runs
            if r["arm"]["seed"] in base_by_seed
        ]
        versus = f"{np.mean(paired) * 100:+.2f} pts" if paired and name != "base" else ""
        closed = ""
        if gap is not None and paired and name not in ("base", "upper"):
            # a gap within the base's own seed-to-seed spread makes any fraction of it noise
            closed = f"{np.mean(paired) / gap:+.0%}" if gap >= MEANINGFUL_GAP else f"n/a (gap {gap * 100:.2f} pts)"
        seconds = np.mean([r["seconds"].get("training_s", r["seconds"].get("total_s", 0)) for r in runs])
        pairs = runs[0].get("pairs", {}).get("pairs", "")
        scored = np.array([validation_dice(r) for r in runs if "validation" in r])
        validation = f"{scored.mean():.4f}{spread(scored)}" if len(scored) == len(runs) else ""
        lines.append(
            f"| {name} | {len(runs)} | {validation} | {finals.mean():.4f}{spread(finals)} | "
            f"{peaks.mean():.4f}{spread(peaks)} | "
            f"{classes[0]:.4f} / {classes[1]:.4f} | {versus} | {closed} | {pairs} | {seconds:.0f} |"
        )
    if base_seconds:
        lines += ["", f"Base training wall time: {base_seconds:.0f} s per seed (mean)."]
        lines += ["", *_wall_time_table(results, base_seconds)]
    paired = paired_by_case_lines(results)
    if paired:
        lines += [
            "",
            "Against the base of the same seed, paired by case (mean ± standard error of the per-case difference):",
            "",
        ]
        lines += paired
    against = against_self_training_lines(grouped)
    if against:
        lines += [
            "",
            "RN-DPO against self-training with the same judge on the same proposals, paired by case and seed "
            "(each case's difference averaged over the seeds both have; mean ± standard error over cases):",
            "",
        ]
        lines += against
    # one curve per set of proposals the judges were audited on: the mirror members, each cross-seed ensemble
    # and, on cross-seed proposals, RN-DPO's curve under each preference setting the oracle sweep was run with
    ensembles = [None, *sorted(path.name.removeprefix("audit_") for path in work.glob("audit_seeds_*"))]
    for ensemble in ensembles:
        variants = [None]
        if ensemble is not None:
            variants += [
                v for v in PREFERENCE_VARIANTS if reliability_arms(ORACLE_SWEEP[0], ensemble, v)["rn_dpo"] in results
            ]
        for variant in variants:
            reliability = reliability_curves(work, results, figures, ensemble, variant)
            if reliability:
                where = "/".join(["reliability", *(part for part in (ensemble, variant) if part)]) + "/"
                proposals = f"cross-seed proposals of {ensemble}" if ensemble else "mirror members"
                setting = f", RN-DPO with {json.dumps(PREFERENCE_VARIANTS[variant])}" if variant else ""
                lines += ["", f"Gain against the judge's reliability, {proposals}{setting} (files: `{where}`):", ""]
                lines += reliability
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        _plot_curves(grouped, figures)
    return "\n".join(lines)


def _per_case_dice(result: dict, split: str) -> dict[str, float]:
    """Final checkpoint's mean foreground Dice of each case on `split`."""
    cases = result[split]["checkpoint_final"]["per_case"]
    return {case: float(np.mean(list(dice.values()))) for case, dice in cases.items()}


def _case_differences(arm: dict, other: dict, split: str) -> np.ndarray:
    """`arm`'s final per-case Dice minus `other`'s on `split`, in Dice points, over `other`'s cases sorted."""
    mine, theirs = _per_case_dice(arm, split), _per_case_dice(other, split)
    return np.array([mine[case] - theirs[case] for case in sorted(theirs)]) * 100


def _difference_figures(differences: np.ndarray) -> dict:
    """Mean and standard error (Dice points) of per-case differences, and how many cases got better."""
    error = differences.std(ddof=1) / np.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    return {
        "mean": float(differences.mean()),
        "standard_error": float(error),
        "better": int(np.sum(differences > 0)),
        "cases": len(differences),
    }


def paired_case_difference(arm: dict, base: dict, split: str) -> Optional[dict]:
    """Final checkpoint minus base, per case (mean foreground Dice of each case), on `split` ("test" or
    "validation"): mean and standard error in Dice points, and how many cases got better. None when either lacks
    the split."""
    if split not in arm or split not in base:
        return None
    return _difference_figures(_case_differences(arm, base, split))


def paired_seed_difference(runs: list[dict], others: list[dict], split: str) -> Optional[dict]:
    """`runs` minus `others` of the same seed, per case, each case's difference averaged over the seeds both
    have: mean and standard error over cases (Dice points), cases better, and the seeds. The error is the cases'
    only (the seeds' own spread is in the summary table). None when no seed has the split on both sides."""
    theirs_by_seed = {other["arm"]["seed"]: other for other in others if split in other}
    matched = [
        (run, theirs_by_seed[run["arm"]["seed"]])
        for run in runs
        if split in run and run["arm"]["seed"] in theirs_by_seed
    ]
    if not matched:
        return None
    figures = _difference_figures(np.mean([_case_differences(run, other, split) for run, other in matched], axis=0))
    return {**figures, "seeds": sorted(run["arm"]["seed"] for run, _ in matched)}


def self_training_counterparts(name: str, runs: list[dict]) -> list[str]:
    """The self-training groups an RN-DPO cross-seed group (`rn_dpo_<judge>_[<tag>_]<ensemble>`) is judged
    against: self-training with the same judge on the same proposals and, where RN-DPO's SFT weight w is not 1,
    self-training at w times the learning rate (`step_matched_self_training`). Empty for other groups."""
    arm = runs[0]["arm"]
    if arm["kind"] != "rn_dpo" or "_seeds_" not in name:
        return []
    ensemble = "seeds_" + name.rsplit("_seeds_", 1)[1]
    plain = cross_seed_group_name("self_train", arm["judge"], ensemble)
    sft_weight = arm.get("settings", {}).get("sft_weight", MEASURED_WITH["sft_weight"])
    if sft_weight == MEASURED_WITH["sft_weight"]:
        return [plain]
    return [plain, cross_seed_group_name("self_train", arm["judge"], ensemble, f"lr{sft_weight:g}x")]


def against_self_training_lines(grouped: dict[str, list[dict]]) -> list[str]:
    """One line per RN-DPO cross-seed group and self-training counterpart that share seeds: what issue 12's
    "at least self-training + 0.5" reads, paired by case and seed (`paired_seed_difference`)."""
    lines = []
    for name, runs in sorted(grouped.items()):
        for counterpart in self_training_counterparts(name, runs):
            others = grouped.get(counterpart, [])
            cells = _difference_cells(lambda split: paired_seed_difference(runs, others, split))
            if cells:
                lines.append(f"- {name} − {counterpart}: " + "; ".join(cells))
    return lines


def paired_by_case_lines(results: dict) -> list[str]:
    """One line per finished arm against its seed's base, on validation and test (`paired_case_difference`)."""
    lines = []
    for name, result in sorted(results.items()):
        base = results.get(f"base_s{result['arm']['seed']}")
        if base is None or result is base:
            continue
        cells = _difference_cells(lambda split: paired_case_difference(result, base, split))
        if cells:
            lines.append(f"- {name}: " + "; ".join(cells))
    return lines


def _difference_cells(figures_of_split) -> list[str]:
    """One report cell per split a paired difference has (`figures_of_split(split)` is None where it has not)."""
    cells = []
    for split in ("validation", "test"):
        figures = figures_of_split(split)
        if figures is not None:
            seeds = f"; seeds {', '.join(str(seed) for seed in figures['seeds'])}" if "seeds" in figures else ""
            cells.append(
                f"{split} {figures['mean']:+.2f} ± {figures['standard_error']:.2f} pts "
                f"({figures['better']}/{figures['cases']} cases better{seeds})"
            )
    return cells


def _arm_phases(result: dict) -> dict:
    """Phase seconds of a finished fine-tuning arm: from its JSON, else from its log when that log is this
    arm's (arms sharing an output folder overwrite each other's logs: the phases must add up to the total)."""
    if "fine_tuning_s" in result.get("log_timings", {}):
        return result["log_timings"]
    phases = phase_seconds(Path(result["folder"]))
    total = result["seconds"].get("total_s")
    if (
        phases
        and total
        and abs(phases["fine_tuning_s"] + phases["judging_s"] + (phases["proposals_s"] or 0) - total) <= 0.1 * total
    ):
        return phases
    return {}


def _wall_time_table(results: dict, base_seconds: float) -> list[str]:
    """Wall time per fine-tuning arm by phase, and what one arm costs on its own (generating its seed's
    proposals + scoring with its judge + fine-tuning) against training the base."""
    phases = {name: _arm_phases(r) for name, r in results.items() if r["arm"]["kind"] not in ("base", "upper")}
    # every seed's store holds the same pool with the same network size and K, so one generation time (the
    # mean of those measured) stands for all; a judge's scoring cost is the largest measured for it
    generations = [p["proposals_s"] for p in phases.values() if p.get("proposals_generated")]
    generation = float(np.mean(generations)) if generations else None
    judging: dict = {}
    for name, phase in phases.items():
        if phase:
            judge = results[name]["arm"]["judge"]
            judging[judge] = max(judging.get(judge, 0.0), phase["judging_s"])
    lines = [
        "| arm | proposals generated in this run (s) | judging + mining in this run (s) | fine-tuning (s) | on its own: proposals + judging + fine-tuning (s) | on its own / base training |",  # noqa: E501
        "|---|---|---|---|---|---|",
    ]
    for name, phase in sorted(phases.items()):
        if not phase:
            lines.append(
                f"| {name} | | | | (log overwritten by a later arm in the same folder; total {results[name]['seconds'].get('total_s', 0):.0f} s) | |"  # noqa: E501
            )
            continue
        arm = results[name]["arm"]
        generated = (
            f"{phase['proposals_s']:.0f} ({phase['proposals_generated']} cases)"
            if phase.get("proposals_generated")
            else "0 (store reused)"
        )
        own = " | "
        if generation is not None:
            total = generation + judging[arm["judge"]] + phase["fine_tuning_s"]
            own = f"{total:.0f} | {total / base_seconds:.2f}"
        lines.append(f"| {name} | {generated} | {phase['judging_s']:.1f} | {phase['fine_tuning_s']:.0f} | {own} |")
    lines += [
        "",
        "Arms of one seed share one proposal store and a judge's scores are cached in it, so only the first "
        "arm of a seed pays for the proposals and the first arm with a judge pays for scoring; 'on its own' adds "
        "those costs back: the mean generation time measured over seeds (same pool, network and K) and the "
        "largest scoring time measured for the arm's judge.",
    ]
    return lines


def _plot_curves(grouped: dict, figures: Path) -> None:
    """Validation pseudo Dice against fine-tuning epoch, base/DPO/RN-DPO, one PNG per judge (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_rndpo.atomic import atomic_path

    base = grouped.get("base", [])
    for judge in JUDGES:
        arms = {kind: grouped.get(f"{kind}_{judge}_top_bottom") for kind in ("rn_dpo", "dpo")}
        if not any(arms.values()):
            continue
        figure, axis = plt.subplots(figsize=(7, 4))
        for run in base:
            if run["arm"]["seed"] == 0:
                axis.axhline(run["validation_curve"][-1], color="k", ls="--", label="base (final validation)")
        for kind, runs in arms.items():
            for run in runs or []:
                if run["arm"]["seed"] == 0:
                    axis.plot(
                        range(1, len(run["validation_curve"]) + 1), run["validation_curve"], marker="o", label=kind
                    )
        axis.set_xlabel("fine-tuning epoch")
        axis.set_ylabel("validation pseudo Dice")
        axis.set_title(f"judge: {judge} (mining top_bottom, seed 0)")
        axis.legend(loc="best")
        figure.tight_layout()
        with atomic_path(figures / f"validation_curves_{judge}.png") as temporary:
            figure.savefig(temporary, format="png", dpi=90)
        plt.close(figure)


def audit_mining(audit: dict, judge: str) -> Optional[str]:
    """The mining strategy the audit recommends (`audit.recommend`) if it recommends `judge`, else None."""
    recommendation = audit.get("recommendation") or {}
    return recommendation.get("mining") if recommendation.get("judge") == judge else None


def best_label_free(audit: dict, label_free: tuple[str, ...]) -> str:
    """The label-free judge whose pick beats a typical proposal by most on validation (its top-1 lift)."""
    audited = [judge for judge in label_free if judge in audit["judges"]]
    return max(audited, key=lambda judge: audit["judges"][judge].get("top1_lift") or -1)


def run_cross_seed(work: Path, args, protocol: Protocol, schedule: Schedule, run, seeds=(0, 1, 2)) -> int:
    """`--cross_seed`: the seeds' bases (one ensemble), the judge audit on seed 0's cross-seed proposals
    (validation split), then RN-DPO (each of CROSS_SEED_MININGS) and self-training with the best label-free judge
    there on seed 0's cross-seed proposals, the same on the other seeds' with the mining seed 0's validation
    preferred, with the reliable oracle on seed 0's (the ceiling), then with the oracle at each level of
    ORACLE_SWEEP on seed 0's (the reliability curve); with --preference_sweep, RN-DPO with the label-free judge
    under each PREFERENCE_VARIANTS setting on seed 0's, the one its validation prefers on the other seeds', the
    step-matched self-training where that setting is an SFT weight (`step_matched_self_training`), then RN-DPO under
    that setting with the oracle at each level on seed 0's (its reliability curve); last, the reliable
    oracle's arms on the other seeds' (the ceiling beyond seed 0, with its step-matched control), then RN-DPO with
    the label-free judge under the chosen setting with each of SPREAD_MININGS on seed 0's and, when validation
    prefers one, on the other seeds' and with the reliable oracle on seed 0's."""
    wanted = (lambda arm: arm.name in args.only) if args.only else (lambda arm: True)
    for arm in [Arm(f"base_s{seed}", "base", seed) for seed in seeds][args.part_id :: args.num_parts]:
        if wanted(arm):
            run(arm)
    for seed in seeds:
        _wait_for(base_folder(seed) / "checkpoint_final.pth")
    label_free = (*protocol.label_free, *CROSS_MODEL_JUDGES)
    folder = "audit_" + ensemble_name(seeds)  # one audit per ensemble
    if args.part_id == 0:
        proposals = cross_seed_proposals(0, seeds)
        audit_on_validation(work, 0, args.threads, args.device, label_free, proposals, folder)
    audit = json.loads(_wait_for(work / folder / "judge_audit.json").read_text())
    best = best_label_free(audit, label_free)
    lift = audit["judges"][best]["top1_lift"]
    print(f"best label-free judge on the cross-seed proposals: {best} (top-1 lift {lift})", flush=True)
    stores = work / "proposals"

    def run_all(arms: list[Arm]) -> dict[str, dict]:
        """Runs this part's wanted arms, waits for the other parts' ones; returns every finished arm's result."""
        chosen = [arm for arm in arms if wanted(arm)]
        for arm in chosen[args.part_id :: args.num_parts]:
            run(arm)
        for arm in chosen:
            _wait_for(work / "arms" / f"{arm.name}.json")
        files = [work / "arms" / f"{arm.name}.json" for arm in arms]
        return {file.stem: json.loads(file.read_text()) for file in files if file.is_file()}

    # seed 0 first, with each mining strategy; the other seeds then take the one validation preferred
    mining = best_mining(run_all(cross_seed_arms(0, (best,), seeds, stores, CROSS_SEED_MININGS)))
    print(f"RN-DPO mining chosen on seed 0's validation: {mining}", flush=True)
    others = [seed for seed in seeds if seed != 0]
    run_all([arm for seed in others for arm in cross_seed_arms(seed, (best,), seeds, stores, (mining,))])
    run_all(cross_seed_arms(0, ("oracle_reliable",), seeds, stores))  # the ceiling
    run_all(cross_seed_arms(0, ORACLE_SWEEP[1:], seeds, stores))  # the reliability curve on these proposals
    variants, sft_weight = {}, MEASURED_WITH["sft_weight"]
    if args.preference_sweep:  # the preference term's settings with the label-free judge, read on validation
        swept = run_all(cross_seed_preference_arms(0, best, seeds, stores))
        if swept:  # the setting seed 0's validation prefers, on the other seeds, then RN-DPO's curve under it
            variant = best_preference_variant(swept)
            print(f"preference setting chosen on seed 0's validation: {variant}", flush=True)
            variants = {variant: PREFERENCE_VARIANTS[variant]}
            run_all([arm for seed in others for arm in cross_seed_preference_arms(seed, best, seeds, stores, variants)])
            sft_weight = variants[variant].get("sft_weight", MEASURED_WITH["sft_weight"])
            if sft_weight != MEASURED_WITH["sft_weight"]:  # self-training at RN-DPO's step on its pseudo-labels
                controls = [(0, best), (0, "oracle_reliable"), *((seed, best) for seed in others)]
                run_all([step_matched_self_training(s, j, sft_weight, schedule, seeds, stores) for s, j in controls])
            run_all(
                [arm for judge in ORACLE_SWEEP for arm in cross_seed_preference_arms(0, judge, seeds, stores, variants)]
            )
    # last, the ceiling on the other seeds (and under the chosen setting): is the reliable oracle's margin over
    # self-training more than seed 0's?
    ceiling = [arm for seed in others for arm in cross_seed_arms(seed, ("oracle_reliable",), seeds, stores)]
    if variants:
        ceiling += [
            arm
            for seed in others
            for arm in cross_seed_preference_arms(seed, "oracle_reliable", seeds, stores, variants)
        ]
        if sft_weight != MEASURED_WITH["sft_weight"]:  # and the ceiling's step-matched control beyond seed 0
            ceiling += [
                step_matched_self_training(s, "oracle_reliable", sft_weight, schedule, seeds, stores) for s in others
            ]
    run_all(ceiling)
    if variants:  # the label-free judge's pairs spread over its halves, under the chosen setting: seed 0's
        # validation chooses between them and top_bottom, the other seeds follow
        candidates = run_all(cross_seed_preference_arms(0, best, seeds, stores, variants))
        for spread in SPREAD_MININGS:
            candidates.update(run_all(cross_seed_preference_arms(0, best, seeds, stores, variants, spread)))
        mining = best_mining(candidates)
        print(f"RN-DPO mining under {next(iter(variants))} chosen on seed 0's validation: {mining}", flush=True)
        if mining != "top_bottom":  # the other seeds, then the reliable oracle with it: does it cost the ceiling?
            run_all(
                [
                    arm
                    for seed in others
                    for arm in cross_seed_preference_arms(seed, best, seeds, stores, variants, mining)
                ]
            )
            run_all(cross_seed_preference_arms(0, "oracle_reliable", seeds, stores, variants, mining))
    print(summarise(work))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench_output/low_label"))
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset004_Hippocampus"
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--only", nargs="*", default=None, help="run only these arms")
    parser.add_argument(
        "--core",
        action="store_true",
        help="seed 0 only: RN-DPO and DPO with the best label-free judge and the weak and reliable oracles, self-training, upper bound",  # noqa: E501
    )
    parser.add_argument("--part_id", type=int, default=0)
    parser.add_argument("--num_parts", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="device for training, proposals and evaluation"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny schedule to check the runner")
    parser.add_argument("--report", type=Path, default=None, help="write the summary table of finished arms here")
    parser.add_argument(
        "--protocol",
        default="v2",
        choices=sorted(PROTOCOLS),
        help="v2 (default): built to see a gain; v3: v2 with 5 labeled and 20 validation cases; v1: the first",
    )
    parser.add_argument(
        "--ignore_gate", action="store_true", help="v2, v3: run the judge arms even when the sanity gate fails"
    )
    parser.add_argument(
        "--cross_seed",
        action="store_true",
        help="v2, v3: the bases of --ensemble_seeds as one ensemble: audit the judges on seed 0's cross-seed "
        "proposals (audit_seeds_<seeds>/), then RN-DPO and self-training with the best label-free judge there on "
        "each seed's cross-seed proposals (arms *_seeds_<seeds>_s<seed>), then with the oracle at each level on seed "
        "0's (the reliability curve); last, with the reliable oracle on the other seeds'",
    )
    parser.add_argument(
        "--ensemble_seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="--cross_seed: the seeds whose bases make the ensemble, each fine-tuned with the others as its "
        "ensemble (at least two, seed 0 among them)",
    )
    parser.add_argument(
        "--preference_sweep",
        action="store_true",
        help="v2, v3: after the gate arms, RN-DPO with the reliable oracle under each PREFERENCE_VARIANTS setting "
        "(beta, IPO target margin, SFT weight); prints their validation table and stops. With --cross_seed: RN-DPO "
        "with the best label-free judge under each setting on seed 0's cross-seed proposals, after the other arms; "
        "the setting seed 0's validation prefers on the other seeds, the step-matched self-training where it is an "
        "SFT weight, and RN-DPO under it with the oracle at each level (its curve)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.part_id < args.num_parts:
        parser.error(f"--part_id {args.part_id} must be between 0 and --num_parts - 1 ({args.num_parts - 1})")

    work = args.work.resolve()
    nnunet_paths.set_nnunet_folders(work)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    import torch

    torch.set_flush_denormal(True)
    from nnunet_rndpo.atomic import save_json

    if args.report:
        table = summarise(work, figures=args.report.parent / "figures")
        args.report.write_text(table + "\n")
        print(table)
        return 0
    protocol = PROTOCOLS[args.protocol]
    schedule = QUICK_SCHEDULE if args.quick else protocol.schedule
    prepare_once(work, args.data, args.seed, protocol)
    (work / "arms").mkdir(exist_ok=True)

    def run(arm: Arm) -> None:
        if arm.kind not in ("base", "upper"):  # a fine-tuning arm starts from its seed's base
            _wait_for(base_folder(arm.seed) / "checkpoint_final.pth")
        target = work / "arms" / f"{arm.name}.json"
        if target.is_file():
            print(f"skip {arm.name} (finished)", flush=True)
            return
        with claim(work / "arms", arm.name) as claimed:
            if not claimed:
                print(f"skip {arm.name} (another process is running it)", flush=True)
                return
            print(f"=== {arm.name}", flush=True)
            result = score_validation(work, arm.name, run_arm(arm, schedule, work, args.threads, args.device))
            result["machine"] = {
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": args.threads,
                "device": args.device,
            }
            result["date"] = time.strftime("%Y-%m-%d")
            save_json(result, target)
        print(
            f"    test Dice final {result['test']['checkpoint_final']['foreground_mean']:.4f}, best {result['test']['checkpoint_best']['foreground_mean']:.4f}",  # noqa: E501
            flush=True,
        )

    seeds = (0, 1, 2)
    if args.cross_seed:
        if 0 not in args.ensemble_seeds or len(set(args.ensemble_seeds)) < 2:
            parser.error(f"--ensemble_seeds {args.ensemble_seeds}: give seed 0 and at least one other seed")
        return run_cross_seed(work, args, protocol, schedule, run, tuple(sorted(set(args.ensemble_seeds))))
    # Bases first: part 0 trains the seed-0 base and runs the judge audit on the validation split (which picks
    # the best label-free judge for the other arms); the other parts train the other seeds' bases meanwhile.
    # v2 trains the other seeds' bases after the gate and the seed-0 arms (build_arms_v2)
    bases = [Arm(f"base_s{s}", "base", s) for s in (seeds if not protocol.gated else (0,))]
    for arm in bases[args.part_id :: args.num_parts] if args.num_parts > 1 else bases:
        if (args.only is None and not args.core) or (args.only and arm.name in args.only) or arm.seed == 0:
            run(arm)
    if protocol.gated and args.num_parts > 1 and args.part_id == 1 and (args.only is None or "upper_s0" in args.only):
        run(Arm("upper_s0", "upper", 0))  # it needs no base: part 1 trains it while part 0 trains the base
    audit_file = work / "audit" / "judge_audit.json"
    if args.part_id == 0:
        audit_on_validation(work, 0, args.threads, args.device, protocol.label_free)
    audit = json.loads(_wait_for(audit_file).read_text())
    if protocol.name == "v1":
        audited = [judge for judge in protocol.label_free if judge in audit["judges"]]
        best = max(audited, key=lambda j: audit["judges"][j]["spearman"] or -1)
        print(
            f"best label-free judge on validation: {best} (Spearman {audit['judges'][best]['spearman']:.3f})",
            flush=True,
        )
    else:  # what decides the gain is whether the judge's pick beats a typical proposal (its top-1 lift)
        best = best_label_free(audit, protocol.label_free)
        print(
            f"best label-free judge on validation: {best} (top-1 lift {audit['judges'][best].get('top1_lift')})",
            flush=True,
        )
    if protocol.gated:
        arms = build_arms_v2(best, protocol.label_free, seeds, audit_mining(audit, best))
        gate = [a for a in arms if a.name in GATE_ARMS and (args.only is None or a.name in args.only)]
        rest = [a for a in arms if a.name not in GATE_ARMS]
        for arm in gate:
            run(arm)
        results = scored_results(work, args.device)
        passed, verdict = gate_verdict(results)
        print(verdict, flush=True)
        if args.preference_sweep:  # the sweep itself on seed 0; any seed's variant or control when --only names it
            swept = preference_sweep_arms(seeds, protocol.label_free, best, audit_mining(audit, best), schedule)
            for arm in swept:
                named = args.only is not None and arm.name in args.only
                if named or (args.only is None and arm.judge == "oracle_reliable" and arm.seed == 0):
                    run(arm)
            print("\n".join(preference_sweep_table(scored_results(work, args.device))), flush=True)
            return 0
        if not passed and not args.ignore_gate:
            print(
                "fix the benchmark (or find the bug) before judging judges; --ignore_gate runs the rest anyway",
                flush=True,
            )
            return 2
        arms = rest
    else:
        arms = [a for a in build_arms(best, seeds) if a.kind != "base"]
    if args.core:
        core = [f"{kind}_{judge}_top_bottom_s0" for judge in (best, "oracle_weak") for kind in ("rn_dpo", "dpo")]
        core += (
            ["self_train_agreement_s0"]
            + [f"{kind}_oracle_reliable_top_bottom_s0" for kind in ("rn_dpo", "dpo")]
            + ["upper_s0"]
        )
        arms = sorted((a for a in arms if a.name in core), key=lambda a: core.index(a.name))
    if args.only:
        arms = [a for a in arms if a.name in set(args.only)]
    arms = arms[args.part_id :: args.num_parts]
    for arm in arms:
        run(arm)
    print(summarise(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
