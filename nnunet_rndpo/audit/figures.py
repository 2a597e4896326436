"""The audit's figures: each judge's scores against the true Dice of the proposals, case by case (rank
correlations, top-1 figures, rank curves, mined pairs' true-Dice gaps and voxel-level correctness, pair examples for
the montage). Conventions: nnunet_rndpo/audit/__init__.py."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Sequence

import numpy as np
from scipy import stats

from nnunet_rndpo.audit.recommendation import MAX_WRONG_ROLE_FRACTION, MIN_TOP1_LIFT_FRACTION, RELIABLE_SPEARMAN
from nnunet_rndpo.audit.reliability import ReliabilityCurve, expected_gain, load_reliability_curve
from nnunet_rndpo.mining import MINING_STRATEGIES, PairMiner, disagreement_matrix
from nnunet_rndpo.preference_region import PREFERENCE_REGIONS, kept_voxels, majority_labels, ranked_halves

TIE_TOLERANCE = 1e-12
_NARROW_REGIONS = tuple(region for region in PREFERENCE_REGIONS if region != "disagreement")
# Strategies the montage shows, in order of preference: top_bottom is the judge's most confident pair.
_MONTAGE_STRATEGIES = ("top_bottom", "top_rest", "margin", "random")
_MONTAGE_CROP_MARGIN = 6


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
        majority: np.ndarray | None = None,
    ) -> None:
        self.has_voxel_probabilities |= judge_probabilities is not None
        if scores.size < 2 or np.ptp(scores) == 0 or np.ptp(true_dice) == 0:
            self.cases_skipped_constant += 1
        else:
            self.spearman.append(float(stats.spearmanr(scores, true_dice).statistic))
            self.kendall.append(float(stats.kendalltau(scores, true_dice).statistic))
        top = np.flatnonzero(scores >= scores.max() - TIE_TOLERANCE)
        self.top1_hits.append(float(np.mean(true_dice[top] >= true_dice.max() - TIE_TOLERANCE)))
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
                            proposals, pair.chosen, pair.rejected, region, top, bottom, judge_probabilities, majority
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
            "wrong_role_fraction": float(np.mean(gaps < -TIE_TOLERANCE)) if gaps.size else None,
            "tied_truth_fraction": float(np.mean(np.abs(gaps) <= TIE_TOLERANCE)) if gaps.size else None,
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
        while end < len(curve) and sorted_scores[start] - sorted_scores[end] <= TIE_TOLERANCE:
            end += 1
        curve[start:end] = curve[start:end].mean()
        start = end
    return curve


def mean_rank_curve(curves: Sequence[np.ndarray]) -> list[float]:
    """Mean of per-case rank curves at each rank, over the cases that have that many proposals."""
    length = max((len(curve) for curve in curves), default=0)
    return [float(np.mean([curve[rank] for curve in curves if len(curve) > rank])) for rank in range(length)]


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
        majority = majority_labels(proposals) if case.true_labels is not None else None  # once for every pair
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
                majority,
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


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
