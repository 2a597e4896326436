"""Judge audit: how well each judge's scores track the true Dice of the proposals on labeled cases.

Input per case: each judge's scores (K,) and the true mean Dice (K,) of the K proposals (plus the proposals,
which mining needs to skip identical masks). Output: a JSON-ready report dict, a recommendation of judge and
mining strategy, a PNG (one panel per judge), and a text table. Users should run it before trusting a judge:
a plausible-looking judge can be useless or harmful (docs/measured-proposals.md).

Conventions:
- rank correlations (Spearman, Kendall tau-b) are computed per case and averaged; a case where the
  judge's scores or the true Dice are constant has no ranking to compare and is skipped (counted);
- when several proposals tie for the judge's top score, top-1 figures are the expectation over a random
  pick among them; a top proposal whose true Dice equals the best true Dice counts as a hit;
- a mined pair has the wrong roles when the chosen proposal's true Dice is strictly lower than the
  rejected one's; equal true Dice counts as neither right nor wrong.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import numpy as np
from scipy import stats

from nnunet_rndpo.atomic import atomic_path, save_json
from nnunet_rndpo.mining import MINING_STRATEGIES, PairMiner, disagreement_matrix

RELIABLE_SPEARMAN = 0.6
MAX_WRONG_ROLE_FRACTION = 0.25
AUDIT_JSON_NAME = "judge_audit.json"
AUDIT_PNG_NAME = "judge_audit.png"
_TIE_TOLERANCE = 1e-12
# Preferred strategies: top_rest first because it keeps pairs between plausible masks (good-vs-broken
# pairs teach little, docs/measured-proposals.md); margin is the only option left for a weak judge.
_RELIABLE_JUDGE_STRATEGIES = ("top_rest", "top_bottom", "margin")
_WEAK_JUDGE_STRATEGIES = ("margin",)


@dataclass
class AuditCase:
    """One labeled case: true Dice and every judge's scores of its K proposals."""

    case_id: str
    true_dice: np.ndarray
    judge_scores: dict[str, np.ndarray]
    proposals: np.ndarray


class _JudgeTally:
    """Running figures of one judge over the cases."""

    def __init__(self, strategies: Sequence[str], margin: float, seed: int) -> None:
        self.spearman: list[float] = []
        self.kendall: list[float] = []
        self.cases_skipped_constant = 0
        self.top1_hits: list[float] = []
        self.top1_dice: list[float] = []
        self.miners = {strategy: PairMiner(strategy, margin=margin, seed=seed) for strategy in strategies}
        self.true_gaps: dict[str, list[float]] = {strategy: [] for strategy in strategies}

    def add(
        self, case_id: str, true_dice: np.ndarray, scores: np.ndarray, proposals: np.ndarray, disagreement: np.ndarray
    ) -> None:
        if scores.size < 2 or np.ptp(scores) == 0 or np.ptp(true_dice) == 0:
            self.cases_skipped_constant += 1
        else:
            self.spearman.append(float(stats.spearmanr(scores, true_dice).statistic))
            self.kendall.append(float(stats.kendalltau(scores, true_dice).statistic))
        top = np.flatnonzero(scores >= scores.max() - _TIE_TOLERANCE)
        self.top1_hits.append(float(np.mean(true_dice[top] >= true_dice.max() - _TIE_TOLERANCE)))
        self.top1_dice.append(float(true_dice[top].mean()))
        for strategy, miner in self.miners.items():
            for pair in miner.add_case(case_id, scores, proposals, disagreement=disagreement):
                self.true_gaps[strategy].append(float(true_dice[pair.chosen] - true_dice[pair.rejected]))

    def figures(self, uses_labels: bool, mean_proposal_dice: float, best_dice: float) -> dict[str, Any]:
        return {
            "uses_labels": uses_labels,
            "spearman": _mean_or_none(self.spearman),
            "kendall": _mean_or_none(self.kendall),
            "cases_ranked": len(self.spearman),
            "cases_skipped_constant": self.cases_skipped_constant,
            "top1_hit_rate": _mean_or_none(self.top1_hits),
            "top1_true_dice": _mean_or_none(self.top1_dice),
            "mean_proposal_true_dice": mean_proposal_dice,
            "best_true_dice": best_dice,
            "mining": {strategy: self._mining_figures(strategy) for strategy in self.miners},
        }

    def _mining_figures(self, strategy: str) -> dict[str, Any]:
        summary = self.miners[strategy].result().summary()
        gaps = np.asarray(self.true_gaps[strategy])
        return {
            "pairs": summary["pairs"],
            "cases_without_pair": summary["cases_without_pair"],
            "cases_all_identical": summary["cases_all_identical"],
            "identical_pairs_skipped": summary["identical_pairs_skipped"],
            "tied_pairs_skipped": summary["tied_pairs_skipped"],
            "mean_disagreement_voxels": summary["mean_disagreement_voxels"],
            "mean_true_dice_gap": float(gaps.mean()) if gaps.size else None,
            "wrong_role_fraction": float(np.mean(gaps < -_TIE_TOLERANCE)) if gaps.size else None,
            "tied_truth_fraction": float(np.mean(np.abs(gaps) <= _TIE_TOLERANCE)) if gaps.size else None,
        }


def audit_judges(
    cases: Iterable[AuditCase],
    *,
    strategies: Sequence[str] = MINING_STRATEGIES,
    margin: float = 0.05,
    seed: int = 0,
    label_using_judges: Collection[str] = ("oracle",),
) -> dict[str, Any]:
    """Compare every judge's scores with the true Dice, case by case (cases may be a generator).

    `label_using_judges` names the judges that read the true labels (the research oracle): they are
    reported, marked, and never recommended.
    """
    strategies = tuple(strategies)
    judge_names: tuple[str, ...] | None = None
    tallies: dict[str, _JudgeTally] = {}
    per_case: list[dict[str, Any]] = []
    mean_proposal_dice: list[float] = []
    best_dice: list[float] = []
    for case in cases:
        true_dice = np.asarray(case.true_dice, dtype=np.float64)
        count = true_dice.shape[0] if true_dice.ndim == 1 else -1
        if count < 1 or np.asarray(case.proposals).shape[0] != count:
            raise ValueError(
                f"case {case.case_id!r}: true_dice of shape {true_dice.shape} does not match "
                f"{np.asarray(case.proposals).shape[0]} proposals"
            )
        if judge_names is None:
            judge_names = tuple(case.judge_scores)
            if not judge_names:
                raise ValueError("audit needs at least one judge's scores")
            tallies = {name: _JudgeTally(strategies, margin, seed) for name in judge_names}
        if set(case.judge_scores) != set(judge_names):
            raise ValueError(
                f"case {case.case_id!r} has scores of judges {sorted(case.judge_scores)}, "
                f"the first case had {sorted(judge_names)}"
            )
        proposals = np.asarray(case.proposals)
        disagreement = disagreement_matrix(proposals)
        scores_of_case = {}
        for name in judge_names:
            scores = np.asarray(case.judge_scores[name], dtype=np.float64)
            if scores.shape != (count,) or not np.all(np.isfinite(scores)):
                raise ValueError(f"case {case.case_id!r}: judge {name!r} scores must be {count} finite numbers")
            tallies[name].add(str(case.case_id), true_dice, scores, proposals, disagreement)
            scores_of_case[name] = scores.tolist()
        mean_proposal_dice.append(float(true_dice.mean()))
        best_dice.append(float(true_dice.max()))
        per_case.append({"case_id": str(case.case_id), "true_dice": true_dice.tolist(), "scores": scores_of_case})
    if judge_names is None:
        raise ValueError("audit needs at least one case")

    mean_proposal = float(np.mean(mean_proposal_dice))
    best = float(np.mean(best_dice))
    counts = [len(entry["true_dice"]) for entry in per_case]
    return {
        "settings": {
            "strategies": list(strategies),
            "margin": margin,
            "seed": seed,
            "reliable_spearman": RELIABLE_SPEARMAN,
            "max_wrong_role_fraction": MAX_WRONG_ROLE_FRACTION,
        },
        "cases": len(per_case),
        "proposals_per_case": {"min": min(counts), "max": max(counts)},
        "true_dice": {"mean_proposal": mean_proposal, "oracle_best": best},
        "judges": {
            name: tallies[name].figures(name in label_using_judges, mean_proposal, best) for name in judge_names
        },
        "per_case": per_case,
    }


def recommend(report: dict[str, Any]) -> dict[str, Any]:
    """Pick a label-free judge and a mining strategy, or advise against preference fine-tuning.

    Rule: the label-free judge with the highest mean Spearman is "reliable" when Spearman >= 0.6 and its
    top pick's mean true Dice is at least that of a typical proposal. A reliable judge gets the first of
    top_rest, top_bottom, margin whose pairs have a positive mean true-Dice gap and at most 25% wrong roles; a
    weak judge only margin under the same test. Without such a strategy: no preference pairs.
    """
    candidates = [
        (name, figures)
        for name, figures in report["judges"].items()
        if not figures["uses_labels"] and figures["spearman"] is not None
    ]
    if not candidates:
        return {
            "judge": None,
            "mining": None,
            "reliable": False,
            "reason": "no label-free judge could be evaluated (none given, or every case had constant scores "
            "or constant true Dice); audit on more or more varied labeled cases before fine-tuning",
        }
    name, figures = max(candidates, key=lambda item: (item[1]["spearman"], item[1]["top1_true_dice"]))
    spearman, top1 = figures["spearman"], figures["top1_true_dice"]
    typical, best = figures["mean_proposal_true_dice"], figures["best_true_dice"]
    reliable = spearman >= RELIABLE_SPEARMAN and top1 >= typical
    judgement = (
        f"judge {name!r}: mean Spearman {spearman:.2f} with true Dice "
        f"({'>=' if spearman >= RELIABLE_SPEARMAN else '<'} {RELIABLE_SPEARMAN}); its top pick has true Dice "
        f"{top1:.3f} against {typical:.3f} for a typical proposal and {best:.3f} for the best one"
    )
    for strategy in _RELIABLE_JUDGE_STRATEGIES if reliable else _WEAK_JUDGE_STRATEGIES:
        mining = figures["mining"].get(strategy)
        if not mining or not mining["pairs"]:
            continue
        if mining["mean_true_dice_gap"] > 0 and mining["wrong_role_fraction"] <= MAX_WRONG_ROLE_FRACTION:
            pair_figures = (
                f"{strategy} mining gave {mining['pairs']} pairs with a mean true-Dice gap of "
                f"{mining['mean_true_dice_gap']:+.3f} and wrong roles in {mining['wrong_role_fraction']:.0%}"
            )
            if reliable:
                reason = f"{judgement}, so it is reliable; {pair_figures}."
            else:
                reason = (
                    f"WARNING: {judgement}, so it is weak; only pairs with a clear score gap are usable: "
                    f"{pair_figures} (margin {report['settings']['margin']}). Compare against self-training "
                    "or no fine-tuning: a weak judge can amplify its own errors."
                )
            return {"judge": name, "mining": strategy, "reliable": reliable, "reason": reason}
    tried = _WEAK_JUDGE_STRATEGIES if not reliable else _RELIABLE_JUDGE_STRATEGIES
    wrong = ", ".join(
        f"{strategy}: {_percent(figures['mining'][strategy]['wrong_role_fraction'])} wrong roles"
        for strategy in tried
        if strategy in figures["mining"]
    )
    return {
        "judge": name,
        "mining": None,
        "reliable": reliable,
        "reason": (
            f"{judgement}; no mining strategy gives pairs with a positive true-Dice gap and at most "
            f"{MAX_WRONG_ROLE_FRACTION:.0%} wrong roles ({wrong or 'none mined'}). Preference pairs would teach "
            "the judge's errors: prefer self-training on the plain prediction, or no fine-tuning."
        ),
    }


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width text table of the report, for printing."""
    header = (
        f"{'judge':<22}{'Spearman':>9}{'Kendall':>9}{'top-1 hit':>11}{'top-1 Dice':>12}"
        f"{'mean Dice':>11}{'best Dice':>11}"
    )
    lines = [
        f"Judge audit on {report['cases']} labeled cases "
        f"({report['proposals_per_case']['min']}-{report['proposals_per_case']['max']} proposals per case)",
        header,
        "-" * len(header),
    ]
    for name, figures in report["judges"].items():
        label = f"{name} (uses labels)" if figures["uses_labels"] else name
        lines.append(
            f"{label:<22}{_number(figures['spearman'], '.2f'):>9}{_number(figures['kendall'], '.2f'):>9}"
            f"{_number(figures['top1_hit_rate'], '.2f'):>11}{_number(figures['top1_true_dice'], '.3f'):>12}"
            f"{figures['mean_proposal_true_dice']:>11.3f}{figures['best_true_dice']:>11.3f}"
        )
    strategies = report["settings"]["strategies"]
    lines += ["", "Mined pairs: mean true-Dice gap (chosen - rejected) / wrong roles / pairs"]
    mining_header = f"{'judge':<22}" + "".join(f"{strategy:>24}" for strategy in strategies)
    lines += [mining_header, "-" * len(mining_header)]
    for name, figures in report["judges"].items():
        cells = []
        for strategy in strategies:
            mining = figures["mining"][strategy]
            cells.append(
                f"{_number(mining['mean_true_dice_gap'], '+.3f')} / {_percent(mining['wrong_role_fraction'])}"
                f" / {mining['pairs']}"
            )
        lines.append(f"{name:<22}" + "".join(f"{cell:>24}" for cell in cells))
    return "\n".join(lines)


def write_audit(report: dict[str, Any], folder: str | os.PathLike) -> dict[str, Path]:
    """Write the report with its recommendation as JSON and the score-vs-true-Dice figure as PNG, atomically."""
    folder = Path(folder)
    json_path = folder / AUDIT_JSON_NAME
    png_path = folder / AUDIT_PNG_NAME
    save_json({**report, "recommendation": recommend(report)}, json_path)
    import matplotlib

    # nnU-Net's logger imports seaborn, which enlarges every font globally; draw with matplotlib's defaults
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figure = _score_figure(report)
        with atomic_path(png_path) as temp:
            figure.savefig(temp, format="png", dpi=110)
    return {"json": json_path, "png": png_path}


def _score_figure(report: dict[str, Any]) -> Any:
    # The object-oriented API with an Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report["judges"])
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    colours = _case_colours(len(report["per_case"]))
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        for colour, entry in zip(colours, report["per_case"]):
            scores = np.asarray(entry["scores"][name], dtype=np.float64)
            spread = np.ptp(scores)
            scaled = (scores - scores.min()) / spread if spread > 0 else np.full_like(scores, 0.5)
            axes.scatter(scaled, entry["true_dice"], s=10, color=colour, alpha=0.7, linewidths=0)
        figures = report["judges"][name]
        marker = " (uses labels)" if figures["uses_labels"] else ""
        title = f"{name}{marker}\nSpearman {_number(figures['spearman'], '.2f')}"
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("judge score, scaled to [0, 1] within each case", fontsize=9)
        axes.set_ylabel("true Dice", fontsize=9)
        axes.tick_params(labelsize=8)
        axes.set_xlim(-0.05, 1.05)
    return figure


def _case_colours(case_count: int) -> list[Any]:
    from matplotlib import colormaps

    colour_map = colormaps["viridis"]
    return [colour_map(index / max(case_count - 1, 1)) for index in range(case_count)]


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
