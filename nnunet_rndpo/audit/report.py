"""The audit's report: the text table printed by `nnunet_rndpo audit`, and the written JSON and PNGs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nnunet_rndpo.atomic import atomic_path, save_json
from nnunet_rndpo.audit.figures import PairExample
from nnunet_rndpo.audit.formatting import format_number, format_percent
from nnunet_rndpo.audit.plots import pair_montage, rank_figure, score_figure

AUDIT_JSON_NAME = "judge_audit.json"
AUDIT_PNG_NAME = "judge_audit.png"
AUDIT_RANKS_PNG_NAME = "judge_audit_ranks.png"
AUDIT_PAIRS_PNG_NAME = "judge_audit_pairs.png"


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width text table of the report, for printing."""
    curve = report["settings"].get("reliability_curve")
    header = (
        f"{'judge':<22}{'Spearman':>9}{'Kendall':>9}{'top-1 hit':>11}{'top-1 Dice':>12}{'top-1 lift':>12}"
        f"{'mean Dice':>11}{'best Dice':>11}" + (f"{'exp. gain':>11}" if curve else "")
    )
    lines = [
        f"Judge audit on {report['cases']} labeled cases "
        f"({report['proposals_per_case']['min']}-{report['proposals_per_case']['max']} proposals per case); "
        f"top-1 lift = top-1 Dice - mean Dice, ceiling (oracle pick) {report['true_dice']['oracle_top1_lift']:+.3f}",
        header,
        "-" * len(header),
    ]
    for name, figures in report["judges"].items():
        label = f"{name} (uses labels)" if figures["uses_labels"] else name
        lines.append(
            f"{label:<22}{format_number(figures['spearman'], '.2f'):>9}{format_number(figures['kendall'], '.2f'):>9}"
            f"{format_number(figures['top1_hit_rate'], '.2f'):>11}{format_number(figures['top1_true_dice'], '.3f'):>12}"
            f"{format_number(figures['top1_lift'], '+.3f'):>12}"
            f"{figures['mean_proposal_true_dice']:>11.3f}{figures['best_true_dice']:>11.3f}"
            + (f"{format_number(figures['expected_gain'], '+.3f'):>11}" if curve else "")
        )
    if curve:
        unit = f" ({curve['gain_unit']})" if curve["gain_unit"] else ""
        source = f"; source: {curve['source']}" if curve["source"] else ""
        lines.append(
            f"exp. gain{unit}: the judge's {curve['metric']} read off the reliability curve "
            f"({len(curve['points'])} points{source})"
        )
    strategies = report["settings"]["strategies"]
    lines += [
        "",
        "Mined pairs: chosen - rejected true Dice (mean) / wrong roles / pairs "
        "[/ share of disagreeing voxels where the chosen label is true]",
    ]
    mining_header = f"{'judge':<22}" + "".join(f"{strategy:>24}" for strategy in strategies)
    lines += [mining_header, "-" * len(mining_header)]
    for name, figures in report["judges"].items():
        cells = []
        for strategy in strategies:
            mining = figures["mining"][strategy]
            voxels = mining.get("chosen_right_in_disagreement")
            cells.append(
                f"{format_number(mining['chosen_minus_rejected_true_dice'], '+.3f')} / "
                f"{format_percent(mining['wrong_role_fraction'])}"
                f" / {mining['pairs']}" + (f" / {format_percent(voxels)}" if voxels is not None else "")
            )
        lines.append(f"{name:<22}" + "".join(f"{cell:>24}" for cell in cells))
    return "\n".join(lines)


def write_audit(report: dict[str, Any], folder: str | os.PathLike) -> dict[str, Path]:
    """Write, atomically, the report as JSON (with the recommendation its caller added; pair examples without their
    arrays), the score-vs-true-Dice figure, the rank-curve figure and the montage of mined pairs as PNGs."""
    folder = Path(folder)
    paths = {
        "json": folder / AUDIT_JSON_NAME,
        "png": folder / AUDIT_PNG_NAME,
        "ranks_png": folder / AUDIT_RANKS_PNG_NAME,
        "pairs_png": folder / AUDIT_PAIRS_PNG_NAME,
    }
    examples = report.get("pair_examples", [])
    saved = dict(report)
    saved["pair_examples"] = [
        example.to_json() if isinstance(example, PairExample) else example for example in examples
    ]
    save_json(saved, paths["json"])
    import matplotlib

    # nnU-Net's logger imports seaborn, which enlarges every font globally; draw with matplotlib's defaults
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figures = {
            "png": score_figure(report),
            "ranks_png": rank_figure(report),
            "pairs_png": pair_montage([example for example in examples if isinstance(example, PairExample)]),
        }
        for key, figure in figures.items():
            with atomic_path(paths[key]) as temp:
                figure.savefig(temp, format="png", dpi=110)
    return paths
