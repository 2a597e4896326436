"""The report's reliability curves: the gain over the base (test Dice points, seed 0, final checkpoint) of RN-DPO and
self-training with the oracle at each noise level, against that oracle's reliability measured by the validation
audit of the same proposals; the label-free judges trained on the same proposals test the curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from benchmarks.low_label.arms import Arm
from benchmarks.low_label.catalogue import JUDGES, ORACLE_SWEEP
from benchmarks.low_label.results import dice_on_test

RELIABILITY_METHODS = ("rn_dpo", "self_train")


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


def reliability_arms(judge: str, ensemble: Optional[str] = None, variant: Optional[str] = None) -> dict[str, Arm]:
    """The seed-0 arm of each method in RELIABILITY_METHODS with `judge`: on the base's mirror members, or on the
    cross-seed proposals of `ensemble` (e.g. `seeds_0_1_2`); with `variant`, RN-DPO's arm under that
    PREFERENCE_VARIANTS setting (self-training has no preference term, so its arm is the same)."""
    return {
        method: Arm(method, 0, judge, variant=variant if method == "rn_dpo" else None, proposals=ensemble)
        for method in RELIABILITY_METHODS
    }


def reliability_curves(
    work: Path,
    results: dict,
    figures: Optional[Path] = None,
    ensemble: Optional[str] = None,
    variant: Optional[str] = None,
) -> list[str]:
    """Gain over the base of each method with the oracle at each noise level, against that oracle's reliability
    (the base's mirror members, or `ensemble`'s cross-seed proposals). Writes one curve file per method and metric
    (<work>/reliability/[<ensemble>/], the audit's `--reliability_curve` format), a PNG into `figures`, and
    returns a markdown table. Label-free judges trained on the same proposals get a row too: the gain the curve
    expects from their measured top-1 lift beside the gain they brought, which tests the curve. `variant`
    (cross-seed proposals only): RN-DPO under that PREFERENCE_VARIANTS setting (<work>/reliability/<ensemble>/
    <variant>/). `results`: by Arm."""
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.audit import expected_gain

    audit_file = work / ("audit" if ensemble is None else f"audit_{ensemble}") / "judge_audit.json"
    base = results.get(Arm("base", 0))
    if base is None or not audit_file.is_file():
        return []
    audit_judges = json.loads(audit_file.read_text())["judges"]
    base_dice = dice_on_test(base)
    gains = {
        method: {
            judge: (dice_on_test(results[arm]) - base_dice) * 100
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
                    "source": f"benchmarks/low_label {work.name} ({ensemble or 'mirror members'}): {method} "
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
