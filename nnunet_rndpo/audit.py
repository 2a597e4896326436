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

What decides the gain of preference training (figures beyond the rank correlations):
- top-1 lift: true Dice of the judge's pick minus the case's mean proposal's true Dice, averaged over
  cases; the oracle's lift (best minus mean) is the ceiling. A judge with Spearman 0.8 and lift ~0 (the
  agreement judge on mirror members) picks typical masks: it knows nothing the model does not;
- chosen minus rejected true Dice of the mined pairs, per mining strategy
  (`chosen_minus_rejected_true_dice`): what training is told to prefer, measured;
- what it is told voxel by voxel (`mining.<strategy>.chosen_right_in_disagreement`, when the cases carry their
  true label maps): RN-DPO pushes every voxel where the two masks disagree towards the chosen mask's label, so
  the fraction of those voxels where the chosen label is the true one is the share of the push that is right
  (pooled over the pairs' voxels; the rejected mask's share beside it, the rest is neither); the same shares
  on the voxels each other `preference_region` keeps (`mining.<strategy>.preference_regions.<region>`: the
  part of the disagreeing voxels kept, and the shares there; `judge_voxels` only for a judge whose per-voxel
  probabilities the case carries, `AuditCase.judge_voxel_probabilities`, else its figures are None);
- the rank curve: true Dice relative to the case mean at each judge rank (1 = the judge's top; tied
  proposals share their mean), averaged over cases; a perfect ranking is a monotone decreasing curve, the
  oracle's curve is drawn beside it (`judge_audit_ranks.png`);
- a montage of mined pairs (`judge_audit_pairs.png`): per judge, the first few pairs of one strategy, each
  on the axial (first spatial axis) slice with the most disagreeing voxels, cropped around the two masks;
- expected gain: the judge's reliability read off a reliability-to-gain curve measured elsewhere (an oracle
  noise sweep), when one is given (`reliability_curve`, format in `load_reliability_curve`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import numpy as np
from scipy import stats

from nnunet_rndpo.atomic import atomic_path, save_json
from nnunet_rndpo.mining import MINING_STRATEGIES, PairMiner, disagreement_matrix
from nnunet_rndpo.preference_region import PREFERENCE_REGIONS, kept_voxels, ranked_halves

RELIABLE_SPEARMAN = 0.6
_NARROW_REGIONS = tuple(region for region in PREFERENCE_REGIONS if region != "disagreement")
# A reliable judge's pick must also beat a typical proposal by this fraction of what the oracle's pick gains:
# measured on Hippocampus, agreement over mirror members had Spearman 0.80 but a top-1 lift of 0 (ceiling
# +0.015), and RN-DPO with it lost 0.3 Dice points.
MIN_TOP1_LIFT_FRACTION = 0.25
MAX_WRONG_ROLE_FRACTION = 0.25
AUDIT_JSON_NAME = "judge_audit.json"
AUDIT_PNG_NAME = "judge_audit.png"
AUDIT_RANKS_PNG_NAME = "judge_audit_ranks.png"
AUDIT_PAIRS_PNG_NAME = "judge_audit_pairs.png"
# A judge's reliability figures that a reliability-to-gain curve may be expressed in.
RELIABILITY_METRICS = ("spearman", "kendall", "top1_hit_rate", "top1_lift")
# Strategies the montage shows, in order of preference: top_bottom is the judge's most confident pair.
_MONTAGE_STRATEGIES = ("top_bottom", "top_rest", "margin", "random")
_MONTAGE_CROP_MARGIN = 6
_TIE_TOLERANCE = 1e-12
# Preferred strategies: top_rest first because it keeps pairs between plausible masks (good-vs-broken
# pairs teach little, docs/measured-proposals.md); margin is the only option left for a weak judge.
_RELIABLE_JUDGE_STRATEGIES = ("top_rest", "top_bottom", "margin")
_WEAK_JUDGE_STRATEGIES = ("margin",)


@dataclass
class AuditCase:
    """One labeled case: true Dice and every judge's scores of its K proposals.

    image: optional (C, *spatial) or (*spatial) image on the proposals' grid; the pair montage shows its first
    channel under the masks (without it, the masks alone)."""

    case_id: str
    true_dice: np.ndarray
    judge_scores: dict[str, np.ndarray]
    proposals: np.ndarray
    image: np.ndarray | None = None
    true_labels: np.ndarray | None = None  # the true label map on the proposals' grid (voxel-level pair figures)
    # per judge that has them: its own (num_classes, *spatial) voxel probabilities (the judge_voxels region)
    judge_voxel_probabilities: dict[str, np.ndarray] = field(default_factory=dict)


def disagreement_correctness(chosen: np.ndarray, rejected: np.ndarray, true_labels: np.ndarray) -> tuple[int, int, int]:
    """(voxels where the two masks disagree, of those where the chosen mask has the true label, where the
    rejected one has it). RN-DPO pushes every disagreeing voxel towards the chosen label: the second count is
    the part of that push that is right."""
    if chosen.shape != rejected.shape or chosen.shape != true_labels.shape:
        raise ValueError(
            f"chosen {chosen.shape}, rejected {rejected.shape} and true labels {true_labels.shape} must have one shape"
        )
    disagreement = chosen != rejected
    return (
        int(np.count_nonzero(disagreement)),
        int(np.count_nonzero(disagreement & (chosen == true_labels))),
        int(np.count_nonzero(disagreement & (rejected == true_labels))),
    )


@dataclass(frozen=True)
class ReliabilityCurve:
    """Expected gain of preference training as a function of a judge's measured reliability.

    metric: one of RELIABILITY_METRICS; points: (reliability, gain) sorted by reliability, distinct
    reliabilities; gain_unit and source: free text for the report."""

    metric: str
    points: tuple[tuple[float, float], ...]
    gain_unit: str = ""
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "points": [list(point) for point in self.points],
            "gain_unit": self.gain_unit,
            "source": self.source,
        }


@dataclass(frozen=True)
class PairExample:
    """One mined pair on its most disagreeing axial slice, for the montage (arrays are 2D crops)."""

    judge: str
    strategy: str
    case_id: str
    chosen: int
    rejected: int
    chosen_true_dice: float
    rejected_true_dice: float
    slice_index: int
    crop_origin: tuple[int, ...]
    chosen_slice: np.ndarray
    rejected_slice: np.ndarray
    image_slice: np.ndarray | None

    def to_json(self) -> dict[str, Any]:
        """The pair without its arrays (the JSON report keeps which pairs and slices the montage shows)."""
        return {
            "judge": self.judge,
            "strategy": self.strategy,
            "case_id": self.case_id,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_true_dice": self.chosen_true_dice,
            "rejected_true_dice": self.rejected_true_dice,
            "axis": 0,
            "slice_index": self.slice_index,
            "crop_origin": list(self.crop_origin),
            "disagreeing_voxels_in_slice": int(np.count_nonzero(self.chosen_slice != self.rejected_slice)),
        }


class _JudgeTally:
    """Running figures of one judge over the cases."""

    def __init__(self, name: str, strategies: Sequence[str], margin: float, seed: int, montage_pairs: int) -> None:
        self.name = name
        self.spearman: list[float] = []
        self.kendall: list[float] = []
        self.cases_skipped_constant = 0
        self.top1_hits: list[float] = []
        self.top1_dice: list[float] = []
        self.top1_lifts: list[float] = []
        self.rank_curves: list[np.ndarray] = []
        self.miners = {strategy: PairMiner(strategy, margin=margin, seed=seed) for strategy in strategies}
        self.pair_true_dice: dict[str, list[tuple[float, float]]] = {strategy: [] for strategy in strategies}
        # per strategy: summed (disagreeing voxels, chosen right, rejected right) over pairs with true labels
        self.pair_voxels: dict[str, np.ndarray] = {strategy: np.zeros(3, dtype=np.int64) for strategy in strategies}
        # the same on the voxels each narrower preference_region keeps (kept, chosen right, rejected right)
        self.region_voxels = {s: {r: np.zeros(3, dtype=np.int64) for r in _NARROW_REGIONS} for s in strategies}
        self.has_voxel_probabilities = False  # the judge_voxels region is measured only for such a judge
        self.montage_strategy = next((s for s in _MONTAGE_STRATEGIES if s in strategies), None)
        self.montage_pairs = montage_pairs
        self.pair_examples: list[PairExample] = []

    def add(
        self,
        case_id: str,
        true_dice: np.ndarray,
        scores: np.ndarray,
        proposals: np.ndarray,
        disagreement: np.ndarray,
        image: np.ndarray | None,
        true_labels: np.ndarray | None = None,
        judge_probabilities: np.ndarray | None = None,
    ) -> None:
        self.has_voxel_probabilities |= judge_probabilities is not None
        if scores.size < 2 or np.ptp(scores) == 0 or np.ptp(true_dice) == 0:
            self.cases_skipped_constant += 1
        else:
            self.spearman.append(float(stats.spearmanr(scores, true_dice).statistic))
            self.kendall.append(float(stats.kendalltau(scores, true_dice).statistic))
        top = np.flatnonzero(scores >= scores.max() - _TIE_TOLERANCE)
        self.top1_hits.append(float(np.mean(true_dice[top] >= true_dice.max() - _TIE_TOLERANCE)))
        self.top1_dice.append(float(true_dice[top].mean()))
        self.top1_lifts.append(float(true_dice[top].mean() - true_dice.mean()))
        self.rank_curves.append(rank_curve(scores, true_dice))
        for strategy, miner in self.miners.items():
            pairs = miner.add_case(case_id, scores, proposals, disagreement=disagreement)
            for pair in pairs:
                self.pair_true_dice[strategy].append((float(true_dice[pair.chosen]), float(true_dice[pair.rejected])))
                if true_labels is not None:
                    self.pair_voxels[strategy] += disagreement_correctness(
                        proposals[pair.chosen], proposals[pair.rejected], true_labels
                    )
                    top, bottom = ranked_halves(scores, pair.chosen, pair.rejected)
                    for region in _NARROW_REGIONS:
                        if region == "judge_voxels" and judge_probabilities is None:
                            continue
                        kept = kept_voxels(
                            proposals, pair.chosen, pair.rejected, region, top, bottom, judge_probabilities
                        )
                        self.region_voxels[strategy][region] += (
                            np.count_nonzero(kept),
                            np.count_nonzero(kept & (proposals[pair.chosen] == true_labels)),
                            np.count_nonzero(kept & (proposals[pair.rejected] == true_labels)),
                        )
            # One pair per case (the first mined) until the montage has its pairs.
            if strategy == self.montage_strategy and pairs and len(self.pair_examples) < self.montage_pairs:
                pair = pairs[0]
                self.pair_examples.append(
                    pair_example(self.name, strategy, case_id, pair.chosen, pair.rejected, true_dice, proposals, image)
                )

    def figures(
        self, uses_labels: bool, mean_proposal_dice: float, best_dice: float, curve: ReliabilityCurve | None
    ) -> dict[str, Any]:
        mining = {strategy: self._mining_figures(strategy) for strategy in self.miners}
        figures = {
            "uses_labels": uses_labels,
            "spearman": _mean_or_none(self.spearman),
            "kendall": _mean_or_none(self.kendall),
            "cases_ranked": len(self.spearman),
            "cases_skipped_constant": self.cases_skipped_constant,
            "top1_hit_rate": _mean_or_none(self.top1_hits),
            "top1_true_dice": _mean_or_none(self.top1_dice),
            "top1_lift": _mean_or_none(self.top1_lifts),
            "mean_proposal_true_dice": mean_proposal_dice,
            "best_true_dice": best_dice,
            "oracle_top1_lift": best_dice - mean_proposal_dice,
            "chosen_minus_rejected_true_dice": {
                strategy: figures["chosen_minus_rejected_true_dice"] for strategy, figures in mining.items()
            },
            "rank_curve": mean_rank_curve(self.rank_curves),
            "mining": mining,
        }
        figures["expected_gain"] = expected_gain(figures[curve.metric], curve.points) if curve is not None else None
        return figures

    def _mining_figures(self, strategy: str) -> dict[str, Any]:
        summary = self.miners[strategy].result().summary()
        pair_dice = np.asarray(self.pair_true_dice[strategy], dtype=np.float64).reshape(-1, 2)
        chosen, rejected = pair_dice[:, 0], pair_dice[:, 1]
        gaps = chosen - rejected
        gap = float(gaps.mean()) if gaps.size else None
        disagreeing, chosen_right, rejected_right = (int(count) for count in self.pair_voxels[strategy])
        return {
            "pairs": summary["pairs"],
            "cases_without_pair": summary["cases_without_pair"],
            "cases_all_identical": summary["cases_all_identical"],
            "identical_pairs_skipped": summary["identical_pairs_skipped"],
            "tied_pairs_skipped": summary["tied_pairs_skipped"],
            "mean_disagreement_voxels": summary["mean_disagreement_voxels"],
            "mean_chosen_true_dice": float(chosen.mean()) if chosen.size else None,
            "mean_rejected_true_dice": float(rejected.mean()) if rejected.size else None,
            "chosen_minus_rejected_true_dice": gap,
            "mean_true_dice_gap": gap,  # the same figure under its earlier name
            "wrong_role_fraction": float(np.mean(gaps < -_TIE_TOLERANCE)) if gaps.size else None,
            "tied_truth_fraction": float(np.mean(np.abs(gaps) <= _TIE_TOLERANCE)) if gaps.size else None,
            "disagreement_voxels_with_truth": disagreeing,
            "chosen_right_in_disagreement": chosen_right / disagreeing if disagreeing else None,
            "rejected_right_in_disagreement": rejected_right / disagreeing if disagreeing else None,
            "preference_regions": {
                region: _region_figures(
                    self.region_voxels[strategy][region],
                    disagreeing if region != "judge_voxels" or self.has_voxel_probabilities else 0,
                )
                for region in _NARROW_REGIONS
            },
        }


def _region_figures(counts: np.ndarray, disagreeing: int) -> dict[str, Any]:
    kept, chosen_right, rejected_right = (int(count) for count in counts)
    return {
        "kept_fraction": kept / disagreeing if disagreeing else None,
        "chosen_right": chosen_right / kept if kept else None,
        "rejected_right": rejected_right / kept if kept else None,
    }


def rank_curve(scores: np.ndarray, true_dice: np.ndarray) -> np.ndarray:
    """(K,) true Dice minus the case mean, ordered by the judge's rank (index 0 = highest score); proposals
    tied in score share the mean of their true Dice (the expectation over a random order among them)."""
    scores = np.asarray(scores, dtype=np.float64)
    relative = np.asarray(true_dice, dtype=np.float64) - float(np.mean(true_dice))
    order = np.argsort(-scores, kind="stable")
    curve = relative[order].copy()
    sorted_scores = scores[order]
    start = 0
    while start < len(curve):
        end = start + 1
        while end < len(curve) and sorted_scores[start] - sorted_scores[end] <= _TIE_TOLERANCE:
            end += 1
        curve[start:end] = curve[start:end].mean()
        start = end
    return curve


def mean_rank_curve(curves: Sequence[np.ndarray]) -> list[float]:
    """Mean of per-case rank curves at each rank, over the cases that have that many proposals."""
    length = max((len(curve) for curve in curves), default=0)
    return [float(np.mean([curve[rank] for curve in curves if len(curve) > rank])) for rank in range(length)]


def expected_gain(reliability: float | None, curve: Sequence[Sequence[float]] | None) -> float | None:
    """The gain a judge of this reliability should bring, read off a curve of (reliability, gain) points:
    linear interpolation between points, the end values beyond them; None without a curve or a reliability."""
    if curve is None or reliability is None:
        return None
    points = _checked_points(curve, "curve")
    reliabilities, gains = (np.array(values, dtype=np.float64) for values in zip(*points))
    return float(np.interp(float(reliability), reliabilities, gains))


def load_reliability_curve(source: str | os.PathLike | dict | ReliabilityCurve) -> ReliabilityCurve:
    """A reliability-to-gain curve from a JSON file (or its parsed dict). Format:

    {"metric": "spearman",                      # one of RELIABILITY_METRICS
     "points": [[0.0, -0.3], [0.6, 0.2], [1.0, 1.0]],   # (reliability, gain), any order
     "gain_unit": "Dice points",                # optional
     "source": "oracle noise sweep, Hippocampus, 2026-12"}   # optional
    """
    if isinstance(source, ReliabilityCurve):
        return source
    where = "reliability curve"
    if not isinstance(source, dict):
        where = f"reliability curve {str(source)!r}"
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{where}: cannot read it as JSON: {error}") from error
    if not isinstance(source, dict):
        raise ValueError(f"{where}: expected a JSON object with 'metric' and 'points'")
    metric = source.get("metric")
    if metric not in RELIABILITY_METRICS:
        raise ValueError(f"{where}: 'metric' must be one of {', '.join(RELIABILITY_METRICS)}, got {metric!r}")
    points = _checked_points(source.get("points"), f"{where}: 'points'")
    return ReliabilityCurve(metric, points, str(source.get("gain_unit", "")), str(source.get("source", "")))


def _checked_points(points: Any, where: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = [(float(reliability), float(gain)) for reliability, gain in points]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} must be a list of [reliability, gain] number pairs, got {points!r}") from error
    if not pairs or not all(np.isfinite(pairs).all(axis=1)):
        raise ValueError(f"{where} must hold at least one point of finite numbers, got {points!r}")
    pairs.sort()
    reliabilities = [reliability for reliability, _ in pairs]
    if len(set(reliabilities)) != len(reliabilities):
        raise ValueError(f"{where} gives two gains for one reliability: {pairs}")
    return tuple(pairs)


def pair_example(
    judge: str,
    strategy: str,
    case_id: str,
    chosen: int,
    rejected: int,
    true_dice: np.ndarray,
    proposals: np.ndarray,
    image: np.ndarray | None,
) -> PairExample:
    """The pair on the slice along the first spatial axis with the most disagreeing voxels, cropped to the two
    masks' foreground (plus a margin); 2D proposals are their own slice."""
    chosen_map, rejected_map = np.asarray(proposals[chosen]), np.asarray(proposals[rejected])
    image_map = _first_channel(image, chosen_map.shape, case_id)
    slice_index = 0
    if chosen_map.ndim == 3:
        per_slice = (chosen_map != rejected_map).reshape(chosen_map.shape[0], -1).sum(axis=1)
        slice_index = int(np.argmax(per_slice))
        chosen_map, rejected_map = chosen_map[slice_index], rejected_map[slice_index]
        image_map = image_map[slice_index] if image_map is not None else None
    elif chosen_map.ndim != 2:
        raise ValueError(f"case {case_id!r}: the pair montage needs 2D or 3D proposals, got {chosen_map.ndim}D")
    box = _crop_box((chosen_map > 0) | (rejected_map > 0) | (chosen_map != rejected_map), _MONTAGE_CROP_MARGIN)
    return PairExample(
        judge=judge,
        strategy=strategy,
        case_id=case_id,
        chosen=int(chosen),
        rejected=int(rejected),
        chosen_true_dice=float(true_dice[chosen]),
        rejected_true_dice=float(true_dice[rejected]),
        slice_index=slice_index,
        crop_origin=tuple(int(part.start) for part in box),
        chosen_slice=chosen_map[box].copy(),
        rejected_slice=rejected_map[box].copy(),
        image_slice=np.asarray(image_map[box], dtype=np.float32).copy() if image_map is not None else None,
    )


def _first_channel(image: np.ndarray | None, spatial: tuple[int, ...], case_id: str) -> np.ndarray | None:
    if image is None:
        return None
    image = np.asarray(image)
    if image.shape == spatial:
        return image
    if image.ndim == len(spatial) + 1 and image.shape[1:] == spatial:
        return image[0]
    raise ValueError(f"case {case_id!r}: image of shape {image.shape} is neither {spatial} nor (C, *{spatial})")


def _crop_box(region: np.ndarray, margin: int) -> tuple[slice, ...]:
    if not region.any():
        return tuple(slice(0, size) for size in region.shape)
    where = np.nonzero(region)
    return tuple(
        slice(max(int(axis.min()) - margin, 0), min(int(axis.max()) + margin + 1, size))
        for axis, size in zip(where, region.shape)
    )


def audit_judges(
    cases: Iterable[AuditCase],
    *,
    strategies: Sequence[str] = MINING_STRATEGIES,
    margin: float = 0.05,
    seed: int = 0,
    label_using_judges: Collection[str] = ("oracle",),
    reliability_curve: str | os.PathLike | dict | ReliabilityCurve | None = None,
    montage_pairs_per_judge: int = 3,
) -> dict[str, Any]:
    """Compare every judge's scores with the true Dice, case by case (cases may be a generator).

    `label_using_judges` names the judges that read the true labels (the research oracle): they are
    reported, marked, and never recommended. `reliability_curve` (a JSON file, see `load_reliability_curve`)
    adds each judge's expected gain. The report's "pair_examples" holds `PairExample` objects (with arrays)
    for the montage; `write_audit` writes them to JSON without their arrays.
    """
    strategies = tuple(strategies)
    curve = load_reliability_curve(reliability_curve) if reliability_curve is not None else None
    if montage_pairs_per_judge < 0:
        raise ValueError(f"montage_pairs_per_judge must be >= 0, got {montage_pairs_per_judge}")
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
            tallies = {
                name: _JudgeTally(name, strategies, margin, seed, montage_pairs_per_judge) for name in judge_names
            }
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
            tallies[name].add(
                str(case.case_id),
                true_dice,
                scores,
                proposals,
                disagreement,
                case.image,
                case.true_labels,
                case.judge_voxel_probabilities.get(name),
            )
            scores_of_case[name] = scores.tolist()
        mean_proposal_dice.append(float(true_dice.mean()))
        best_dice.append(float(true_dice.max()))
        per_case.append({"case_id": str(case.case_id), "true_dice": true_dice.tolist(), "scores": scores_of_case})
    if judge_names is None:
        raise ValueError("audit needs at least one case")

    mean_proposal = float(np.mean(mean_proposal_dice))
    best = float(np.mean(best_dice))
    counts = [len(entry["true_dice"]) for entry in per_case]
    oracle_curves = [rank_curve(np.asarray(entry["true_dice"]), np.asarray(entry["true_dice"])) for entry in per_case]
    return {
        "settings": {
            "strategies": list(strategies),
            "margin": margin,
            "seed": seed,
            "reliable_spearman": RELIABLE_SPEARMAN,
            "min_top1_lift_fraction": MIN_TOP1_LIFT_FRACTION,
            "max_wrong_role_fraction": MAX_WRONG_ROLE_FRACTION,
            "reliability_curve": curve.to_json() if curve is not None else None,
        },
        "cases": len(per_case),
        "proposals_per_case": {"min": min(counts), "max": max(counts)},
        "true_dice": {
            "mean_proposal": mean_proposal,
            "oracle_best": best,
            "oracle_top1_lift": best - mean_proposal,
            "oracle_rank_curve": mean_rank_curve(oracle_curves),
        },
        "judges": {
            name: tallies[name].figures(name in label_using_judges, mean_proposal, best, curve) for name in judge_names
        },
        "per_case": per_case,
        "pair_examples": [example for name in judge_names for example in tallies[name].pair_examples],
    }


def recommend(report: dict[str, Any]) -> dict[str, Any]:
    """Pick a label-free judge and a mining strategy, or advise against preference fine-tuning.

    Rule: the label-free judge with the highest mean Spearman is "reliable" when Spearman >= 0.6 and its
    top-1 lift (top pick's true Dice minus a typical proposal's) is at least 25% of the oracle pick's. A reliable
    judge gets the first of
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
    # Reports written before the lift existed lack it; it is the same difference.
    lift, ceiling = figures.get("top1_lift", top1 - typical), figures.get("oracle_top1_lift", best - typical)
    lifts = lift >= MIN_TOP1_LIFT_FRACTION * ceiling - _TIE_TOLERANCE
    reliable = spearman >= RELIABLE_SPEARMAN and lifts
    judgement = (
        f"judge {name!r}: mean Spearman {spearman:.2f} with true Dice "
        f"({'>=' if spearman >= RELIABLE_SPEARMAN else '<'} {RELIABLE_SPEARMAN}); its top pick has true Dice "
        f"{top1:.3f} against {typical:.3f} for a typical proposal and {best:.3f} for the best one, a top-1 lift of "
        f"{_number(lift, '+.3f')} ({'>=' if lifts else '<'} {MIN_TOP1_LIFT_FRACTION:.0%} of the oracle's "
        f"{_number(ceiling, '+.3f')})"
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
            f"{label:<22}{_number(figures['spearman'], '.2f'):>9}{_number(figures['kendall'], '.2f'):>9}"
            f"{_number(figures['top1_hit_rate'], '.2f'):>11}{_number(figures['top1_true_dice'], '.3f'):>12}"
            f"{_number(figures['top1_lift'], '+.3f'):>12}"
            f"{figures['mean_proposal_true_dice']:>11.3f}{figures['best_true_dice']:>11.3f}"
            + (f"{_number(figures['expected_gain'], '+.3f'):>11}" if curve else "")
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
                f"{_number(mining['chosen_minus_rejected_true_dice'], '+.3f')} / "
                f"{_percent(mining['wrong_role_fraction'])}"
                f" / {mining['pairs']}" + (f" / {_percent(voxels)}" if voxels is not None else "")
            )
        lines.append(f"{name:<22}" + "".join(f"{cell:>24}" for cell in cells))
    return "\n".join(lines)


def write_audit(report: dict[str, Any], folder: str | os.PathLike) -> dict[str, Path]:
    """Write, atomically, the report with its recommendation as JSON (pair examples without their arrays), the
    score-vs-true-Dice figure, the rank-curve figure and the montage of mined pairs as PNGs."""
    folder = Path(folder)
    paths = {
        "json": folder / AUDIT_JSON_NAME,
        "png": folder / AUDIT_PNG_NAME,
        "ranks_png": folder / AUDIT_RANKS_PNG_NAME,
        "pairs_png": folder / AUDIT_PAIRS_PNG_NAME,
    }
    examples = report.get("pair_examples", [])
    saved = {**report, "recommendation": recommend(report)}
    saved["pair_examples"] = [
        example.to_json() if isinstance(example, PairExample) else example for example in examples
    ]
    save_json(saved, paths["json"])
    import matplotlib

    # nnU-Net's logger imports seaborn, which enlarges every font globally; draw with matplotlib's defaults
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figures = {
            "png": _score_figure(report),
            "ranks_png": _rank_figure(report),
            "pairs_png": _pair_montage([example for example in examples if isinstance(example, PairExample)]),
        }
        for key, figure in figures.items():
            with atomic_path(paths[key]) as temp:
                figure.savefig(temp, format="png", dpi=110)
    return paths


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


def _new_figure(columns: int, rows: int, width: float, height: float) -> Any:
    # The object-oriented API with an Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _rank_figure(report: dict[str, Any]) -> Any:
    """Per judge: true Dice minus the case mean at each judge rank, cases thin, their mean thick, the oracle's
    (perfect) ranking dashed; a useful judge's mean curve falls from left to right like the oracle's."""
    names = list(report["judges"])
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure = _new_figure(columns, rows, 4.2, 3.6)
    oracle_curve = report["true_dice"]["oracle_rank_curve"]
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        for entry in report["per_case"]:
            curve = rank_curve(np.asarray(entry["scores"][name]), np.asarray(entry["true_dice"]))
            axes.plot(np.arange(1, len(curve) + 1), curve, color="0.75", linewidth=0.6)
        figures = report["judges"][name]
        ranks = np.arange(1, len(oracle_curve) + 1)
        axes.plot(ranks, oracle_curve, color="black", linestyle="--", linewidth=1.2, label="oracle ranking")
        axes.plot(ranks, figures["rank_curve"], color="C0", linewidth=2.0, marker="o", markersize=3, label="mean")
        axes.axhline(0.0, color="0.4", linewidth=0.6)
        marker = " (uses labels)" if figures["uses_labels"] else ""
        axes.set_title(
            f"{name}{marker}\ntop-1 lift {_number(figures['top1_lift'], '+.3f')} "
            f"(ceiling {report['true_dice']['oracle_top1_lift']:+.3f})",
            fontsize=10,
        )
        axes.set_xlabel("judge rank (1 = judge's top proposal)", fontsize=9)
        axes.set_ylabel("true Dice - case mean", fontsize=9)
        axes.tick_params(labelsize=8)
        axes.legend(fontsize=7, loc="upper right")
    return figure


def _pair_montage(examples: Sequence[PairExample]) -> Any:
    """Rows = judges, columns = their pairs: image in grey, chosen contour solid blue, rejected dashed orange,
    disagreeing voxels shaded."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    if not examples:
        figure = _new_figure(1, 1, 5.0, 1.5)
        figure.text(0.5, 0.5, "no mined pairs to show", ha="center", va="center")
        return figure
    judges = list(dict.fromkeys(example.judge for example in examples))
    columns = max(sum(example.judge == judge for example in examples) for judge in judges)
    figure = _new_figure(columns, len(judges), 2.8, 3.0)
    shade = ListedColormap(["magenta"])
    for row, judge in enumerate(judges):
        for column, example in enumerate(example for example in examples if example.judge == judge):
            axes = figure.add_subplot(len(judges), columns, row * columns + column + 1)
            if example.image_slice is not None:
                axes.imshow(example.image_slice, cmap="gray", interpolation="nearest")
            else:
                # No image: a light background, on which the shading and both outlines stay visible.
                axes.imshow(np.full(example.chosen_slice.shape, 0.92), cmap="gray", vmin=0, vmax=1)
            disagreement = example.chosen_slice != example.rejected_slice
            shaded = np.ma.masked_where(~disagreement, disagreement)
            axes.imshow(shaded, cmap=shade, alpha=0.35, interpolation="nearest")
            # The chosen outline is drawn wider, so it stays visible where the rejected one runs on top of it.
            outlines = ((example.chosen_slice, "C0", "solid", 2.0), (example.rejected_slice, "C1", "dashed", 1.0))
            for label_map, colour, style, width in outlines:
                for label in np.unique(label_map[label_map > 0]):
                    axes.contour(label_map == label, levels=[0.5], colors=colour, linestyles=style, linewidths=width)
            axes.set_title(
                f"{judge} ({example.strategy})\n{example.case_id} z={example.slice_index}\n"
                f"chosen {example.chosen_true_dice:.3f} / rejected {example.rejected_true_dice:.3f}",
                fontsize=7,
            )
            axes.set_xticks([])
            axes.set_yticks([])
    figure.legend(
        handles=[
            Line2D([], [], color="C0", linestyle="solid", label="chosen"),
            Line2D([], [], color="C1", linestyle="dashed", label="rejected"),
            Line2D([], [], color="magenta", alpha=0.5, linewidth=6, label="disagreement"),
        ],
        loc="outside lower center",
        ncols=3,
        fontsize=8,
    )
    return figure


def _case_colours(case_count: int) -> list[Any]:
    from matplotlib import colormaps

    colour_map = colormaps["viridis"]
    return [colour_map(index / max(case_count - 1, 1)) for index in range(case_count)]


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    text = format(value, spec)
    # A difference that is 0 up to rounding error would print as "-0.000".
    if text.startswith("-") and float(text) == 0:
        return ("+" if "+" in spec else "") + text[1:]
    return text


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
