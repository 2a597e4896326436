"""The report of a work folder's finished arms (`--report`), read from their result JSONs only: the summary table
(arms grouped over seeds), the wall times, each arm against its seed's base paired by case, RN-DPO against its
self-training on the same proposals, the reliability curves, and the validation-curve figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.low_label.arms import BASE_KINDS, Arm
from benchmarks.low_label.catalogue import (
    JUDGES,
    MEASURED_WITH,
    ORACLE_SWEEP,
    PREFERENCE_VARIANTS,
    sft_weight_of,
    variant_applies,
)
from benchmarks.low_label.reliability import reliability_arms, reliability_curves
from benchmarks.low_label.results import late_validation, load_results, validation_dice
from benchmarks.low_label.statistics import (
    difference_cells,
    paired_case_difference,
    paired_seed_difference,
)
from benchmarks.low_label.timings import arm_phases

MEANINGFUL_GAP = 0.01  # 1 Dice point between base and upper bound, below which "gap closed" is not reported


def _plain(arm: Arm, kind: str) -> bool:
    """Whether the arm is the plain `kind` model of its seed (the base, the upper bound)."""
    return arm == Arm(kind, arm.seed)


def _dice(result: dict, which: str, label=None) -> float:
    block = result["test"][which]
    if label is None:
        return block["foreground_mean"]
    return block["mean"][str(label)] if str(label) in block["mean"] else block["mean"][label]


def summarise(work: Path, figures: Optional[Path] = None) -> str:
    """A markdown table of every finished arm (and validation-curve PNGs per judge into `figures`); the folds
    protocol's own report for a work folder of fold models."""
    results = load_results(work)
    if not results:
        return "no finished arms"
    if any(arm.fold is not None for arm in results):
        from benchmarks.low_label.report_folds import folds_report

        return folds_report(work, results)
    split = json.loads((work / "split.json").read_text())
    grouped: dict[str, list[tuple[Arm, dict]]] = {}
    for arm, result in results.items():
        grouped.setdefault(arm.group, []).append((arm, result))
    # every fine-tuning arm continues from its seed's base: differences are paired by seed
    base_runs = [result for arm, result in results.items() if _plain(arm, "base")]
    base_by_seed = {
        arm.seed: _dice(result, "checkpoint_final") for arm, result in results.items() if _plain(arm, "base")
    }
    upper_by_seed = {arm.seed: _dice(r, "checkpoint_final") for arm, r in results.items() if _plain(arm, "upper")}
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

    def order(item):
        arm = item[1][0][0]
        return (0 if _plain(arm, "base") else 1 if _plain(arm, "upper") else 2, item[0])

    for name, runs in sorted(grouped.items(), key=order):
        first = runs[0][0]
        finals = np.array([_dice(r, "checkpoint_final") for _, r in runs])
        peaks = np.array([_dice(r, "checkpoint_best") for _, r in runs])
        classes = [np.mean([_dice(r, "checkpoint_final", c) for _, r in runs]) for c in (1, 2)]
        spread = lambda values: f" ± {values.std():.4f}" if len(values) > 1 else ""  # noqa: E731
        paired = [_dice(r, "checkpoint_final") - base_by_seed[arm.seed] for arm, r in runs if arm.seed in base_by_seed]
        versus = f"{np.mean(paired) * 100:+.2f} pts" if paired and not _plain(first, "base") else ""
        closed = ""
        if gap is not None and paired and not (_plain(first, "base") or _plain(first, "upper")):
            # a gap within the base's own seed-to-seed spread makes any fraction of it noise
            closed = f"{np.mean(paired) / gap:+.0%}" if gap >= MEANINGFUL_GAP else f"n/a (gap {gap * 100:.2f} pts)"
        seconds = np.mean([r["seconds"].get("training_s", r["seconds"].get("total_s", 0)) for _, r in runs])
        pairs = runs[0][1].get("pairs", {}).get("pairs", "")
        scored = np.array([validation_dice(r) for _, r in runs if "validation" in r])
        validation = f"{scored.mean():.4f}{spread(scored)}" if len(scored) == len(runs) else ""
        lines.append(
            f"| {name} | {len(runs)} | {validation} | {finals.mean():.4f}{spread(finals)} | "
            f"{peaks.mean():.4f}{spread(peaks)} | "
            f"{classes[0]:.4f} / {classes[1]:.4f} | {versus} | {closed} | {pairs} | {seconds:.0f} |"
        )
    if base_seconds:
        lines += ["", f"Base training wall time: {base_seconds:.0f} s per seed (mean)."]
        lines += ["", *wall_time_table(results, base_seconds)]
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


def paired_by_case_lines(results: dict) -> list[str]:
    """One line per finished arm against its seed's base, on validation and test (`paired_case_difference`)."""
    lines = []
    for arm, result in sorted(results.items(), key=lambda item: item[0].name):
        base = results.get(Arm("base", arm.seed))
        if base is None or result is base:
            continue
        cells = difference_cells(lambda split: paired_case_difference(result, base, split))
        if cells:
            lines.append(f"- {arm.name}: " + "; ".join(cells))
    return lines


def self_training_counterparts(arm: Arm) -> list[Arm]:
    """The self-training arms (of the same seed) an RN-DPO arm on cross-seed proposals is judged against:
    self-training with the same judge on the same proposals and, where RN-DPO's SFT weight w is not 1,
    self-training at w times the learning rate (`plans.step_matched_self_training`). Empty for other arms."""
    if arm.kind != "rn_dpo" or arm.proposals is None:
        return []
    plain = Arm("self_train", arm.seed, arm.judge, proposals=arm.proposals)
    sft_weight = sft_weight_of(arm.variant)
    if sft_weight == MEASURED_WITH["sft_weight"]:
        return [plain]
    return [plain, Arm("self_train", arm.seed, arm.judge, step=sft_weight, proposals=arm.proposals)]


def against_self_training_lines(grouped: dict[str, list[tuple[Arm, dict]]]) -> list[str]:
    """One line per RN-DPO cross-seed group and self-training counterpart that share seeds: what issue 12's
    "at least self-training + 0.5" reads, paired by case and seed (`paired_seed_difference`)."""
    lines = []
    for name, runs in sorted(grouped.items()):
        by_seed = {arm.seed: result for arm, result in runs}
        for counterpart in self_training_counterparts(runs[0][0]):
            others = {arm.seed: result for arm, result in grouped.get(counterpart.group, [])}
            cells = difference_cells(lambda split: paired_seed_difference(by_seed, others, split))
            if cells:
                lines.append(f"- {name} − {counterpart.group}: " + "; ".join(cells))
    return lines


def wall_time_table(results: dict, base_seconds: float) -> list[str]:
    """Wall time per fine-tuning arm by phase, and what one arm costs on its own (generating its seed's
    proposals + scoring with its judge + fine-tuning) against training the base."""
    phases = {arm: arm_phases(r) for arm, r in results.items() if arm.kind not in BASE_KINDS}
    # every seed's store holds the same pool with the same network size and K, so one generation time (the
    # mean of those measured) stands for all; a judge's scoring cost is the largest measured for it
    generations = [p["proposals_s"] for p in phases.values() if p.get("proposals_generated")]
    generation = float(np.mean(generations)) if generations else None
    judging: dict = {}
    for arm, phase in phases.items():
        if phase:
            judging[arm.judge] = max(judging.get(arm.judge, 0.0), phase["judging_s"])
    lines = [
        "| arm | proposals generated in this run (s) | judging + mining in this run (s) | fine-tuning (s) | on its own: proposals + judging + fine-tuning (s) | on its own / base training |",  # noqa: E501
        "|---|---|---|---|---|---|",
    ]
    for arm, phase in sorted(phases.items(), key=lambda item: item[0].name):
        if not phase:
            lines.append(
                f"| {arm.name} | | | | (log overwritten by a later arm in the same folder; total {results[arm]['seconds'].get('total_s', 0):.0f} s) | |"  # noqa: E501
            )
            continue
        generated = (
            f"{phase['proposals_s']:.0f} ({phase['proposals_generated']} cases)"
            if phase.get("proposals_generated")
            else "0 (store reused)"
        )
        own = " | "
        if generation is not None:
            total = generation + judging[arm.judge] + phase["fine_tuning_s"]
            own = f"{total:.0f} | {total / base_seconds:.2f}"
        lines.append(f"| {arm.name} | {generated} | {phase['judging_s']:.1f} | {phase['fine_tuning_s']:.0f} | {own} |")
    lines += [
        "",
        "Arms of one seed share one proposal store and a judge's scores are cached in it, so only the first "
        "arm of a seed pays for the proposals and the first arm with a judge pays for scoring; 'on its own' adds "
        "those costs back: the mean generation time measured over seeds (same pool, network and K) and the "
        "largest scoring time measured for the arm's judge.",
    ]
    return lines


def preference_sweep_table(results: dict, seed: int = 0) -> list[str]:
    """Each preference variant beside the base, the default RN-DPO and self-training with the reliable oracle, by
    the final checkpoint's Dice on the whole validation cases (what the choice of defaults reads). `results`: by
    Arm."""
    reliable = "oracle_reliable"
    rows = [
        ("base", Arm("base", seed)),
        ("defaults (sigmoid, beta 0.1, SFT 1)", Arm("rn_dpo", seed, reliable)),
        ("self-training", Arm("self_train", seed, reliable)),
        *(
            (json.dumps(settings), Arm("rn_dpo", seed, reliable, variant=variant))
            for variant, settings in PREFERENCE_VARIANTS.items()
            if variant_applies(reliable, settings)
        ),
    ]
    base = validation_dice(results[Arm("base", seed)]) if Arm("base", seed) in results else None
    lines = [
        "| arm | settings | validation Dice, whole cases (final) | vs base | validation pseudo Dice, last 5 epochs | test Dice, final (not used to choose) |",  # noqa: E501
        "|---|---|---|---|---|---|",
    ]
    for settings, arm in rows:
        if arm not in results:
            lines.append(f"| {arm.name} | {settings} | not run | | | |")
            continue
        value = validation_dice(results[arm])
        versus = f"{(value - base) * 100:+.2f} pts" if base is not None and arm.kind != "base" else ""
        curve = late_validation(results[arm]["validation_curve"])
        test = results[arm]["test"]["checkpoint_final"]["foreground_mean"]
        lines.append(f"| {arm.name} | {settings} | {value:.4f} | {versus} | {curve:.4f} | {test:.4f} |")
    return lines


def _plot_curves(grouped: dict, figures: Path) -> None:
    """Validation pseudo Dice against fine-tuning epoch, base/DPO/RN-DPO, one PNG per judge (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_rndpo.atomic import atomic_path

    base = grouped.get(Arm("base", 0).group, [])
    for judge in JUDGES:
        arms = {kind: grouped.get(Arm(kind, 0, judge).group) for kind in ("rn_dpo", "dpo")}
        if not any(arms.values()):
            continue
        figure, axis = plt.subplots(figsize=(7, 4))
        for arm, run in base:
            if arm.seed == 0:
                axis.axhline(run["validation_curve"][-1], color="k", ls="--", label="base (final validation)")
        for kind, runs in arms.items():
            for arm, run in runs or []:
                if arm.seed == 0:
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
