"""Which voxels of a mined pair carry the judge's preference (the `preference_region` setting).

A judge ranks whole masks; RN-DPO pushes every voxel where the chosen and rejected masks differ towards the
chosen label. A better mask is not better everywhere: on one model's mirror members even the exact oracle's
top_bottom pairs have the true label on the chosen side at only 64-66% of those voxels (BENCHMARKS.md, the v2
and v3 audits), so a third of the push is wrong whatever the judge.

- "disagreement" (the default): every voxel where the two masks differ.
- "ranked_consensus": only the voxels where the preference is shared by the judge's ranking rather than a
  quirk of the two masks: the chosen label is held by a strict majority of the judge's top half of proposals
  and the rejected label by a strict majority of its bottom half. With two proposals the halves are the pair
  itself and nothing is dropped.
- "majority": only the voxels where the chosen label is held by a strict majority of all the case's
  proposals: the push goes where the judge and the proposals' vote agree. The vote carries information of its
  own (an ensemble of mirror members beats a typical member), which no judge of single masks sees.
- "judge_voxels": only the voxels where the judge's own per-voxel class probabilities give the chosen label
  more than the rejected one (judges that have them, `Judge.gives_voxel_probabilities`: atlas). A judge ranks
  whole masks, but its information is often local: the atlas's fused labels are right in some places and wrong
  in others, and where they side with the rejected mask the chosen one is right less often than not. Measured
  on Hippocampus (BENCHMARKS.md, "The atlas's own voxels"): the atlas's top_bottom pairs are right on 62% of
  their disagreeing voxels, on 73% of the two thirds this region keeps; yet in training (one seed) the same pairs
  gained 0.41 test points less than on every disagreeing voxel.

Outside the kept voxels the rejected mask takes the chosen label, so they leave the pair's disagreement region
(and RN-DPO's normalisation); the SFT term on the chosen mask still sees them. Pure: arrays in, arrays out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PREFERENCE_REGIONS = ("disagreement", "ranked_consensus", "majority", "judge_voxels")


def check_region(region: str) -> None:
    if region not in PREFERENCE_REGIONS:
        raise ValueError(f"unknown preference_region {region!r}; valid: {', '.join(PREFERENCE_REGIONS)}")


def ranked_halves(scores: np.ndarray, chosen: int, rejected: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(top half, bottom half) of the proposals by the judge's scores, K // 2 each (the middle one of an odd K
    in neither); the chosen proposal always in the top half and the rejected one in the bottom half, so that
    tied scores cannot put the pair's own masks on the wrong side."""
    scores = np.asarray(scores, dtype=np.float64)
    count = scores.shape[0]
    if not (0 <= chosen < count and 0 <= rejected < count) or chosen == rejected:
        raise ValueError(f"chosen {chosen} and rejected {rejected} must be two different indices below {count}")
    half = max(count // 2, 1)
    # best first; equal scores keep index order (a pure function: no rng)
    order = [int(index) for index in np.argsort(-scores, kind="stable") if index not in (chosen, rejected)]
    top = (chosen, *order[: half - 1])
    bottom = (rejected, *order[::-1][: half - 1])
    return tuple(sorted(top)), tuple(sorted(bottom))


def holds_majority(masks: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """Where `label_map`'s label is held by more than half of `masks` (G, *spatial)."""
    # the narrowest counter that holds G: summing bools into it is several times faster than count_nonzero's intp
    agreeing = (masks == label_map[None]).sum(axis=0, dtype=np.min_scalar_type(masks.shape[0]))
    return agreeing > masks.shape[0] // 2  # for whole counts, a > G // 2 is 2a > G


NO_MAJORITY = -1  # majority_labels where no label has more than half of the masks


def majority_labels(masks: np.ndarray) -> np.ndarray:
    """At each voxel the label held by more than half of `masks` (G, *spatial), else NO_MAJORITY: computed once
    per case, it answers `holds_majority(masks, label_map)` for every pair as `label_map == majority_labels`.
    Boyer and Moore's majority vote (one candidate per voxel, then one count to confirm it), so two passes over
    the masks whatever the number of classes."""
    masks = np.asarray(masks)
    candidate = masks[0].astype(np.int32)
    lead = np.ones(candidate.shape, dtype=np.int32)
    for mask in masks[1:]:
        empty = lead == 0
        candidate[empty] = mask[empty]
        lead += np.where(mask == candidate, 1, -1).astype(np.int32)
    return np.where(holds_majority(masks, candidate), candidate, NO_MAJORITY).astype(np.int32)


def judge_favours(judge_probabilities: np.ndarray, chosen_mask: np.ndarray, rejected_mask: np.ndarray) -> np.ndarray:
    """Where the judge's per-voxel class probabilities (num_classes, *spatial; channel index = label value) give
    the chosen mask's label more than the rejected mask's label."""
    highest_label = int(max(chosen_mask.max(), rejected_mask.max()))
    if judge_probabilities.shape[1:] != chosen_mask.shape or judge_probabilities.shape[0] <= highest_label:
        raise ValueError(
            f"judge probabilities of shape {judge_probabilities.shape} do not cover masks of shape "
            f"{chosen_mask.shape} with labels up to {highest_label}"
        )

    def probability_of(mask: np.ndarray) -> np.ndarray:
        return np.take_along_axis(judge_probabilities, mask[None].astype(np.intp), axis=0)[0]

    return probability_of(chosen_mask) > probability_of(rejected_mask)


def kept_voxels(
    proposals: np.ndarray,
    chosen: int,
    rejected: int,
    region: str = "disagreement",
    top: Sequence[int] = (),
    bottom: Sequence[int] = (),
    judge_probabilities: np.ndarray | None = None,
    majority: np.ndarray | None = None,
) -> np.ndarray:
    """The disagreeing voxels of the pair that `region` keeps (`top` and `bottom`: the judge's halves, from
    `ranked_halves`, which "ranked_consensus" needs; `judge_probabilities`: the judge's per-voxel class
    probabilities of the case, which "judge_voxels" needs; `majority`: the case's `majority_labels(proposals)`,
    which "majority" computes when not given: a caller with many pairs of one case gives it once)."""
    check_region(region)
    chosen_mask, rejected_mask = proposals[chosen], proposals[rejected]
    disagreement = chosen_mask != rejected_mask
    if region == "judge_voxels":
        if judge_probabilities is None:
            raise ValueError("preference_region 'judge_voxels' needs the judge's per-voxel class probabilities")
        return disagreement & judge_favours(np.asarray(judge_probabilities), chosen_mask, rejected_mask)
    if region == "majority":
        if majority is None:  # one pass over the masks, where majority_labels takes two
            return disagreement & holds_majority(proposals, chosen_mask)
        return disagreement & (chosen_mask == majority)
    if region == "ranked_consensus":
        if not top or not bottom:
            raise ValueError("preference_region 'ranked_consensus' needs the judge's top and bottom halves")
        return (
            disagreement
            & holds_majority(proposals[list(top)], chosen_mask)
            & holds_majority(proposals[list(bottom)], rejected_mask)
        )
    return disagreement


def preference_rejected(
    proposals: np.ndarray,
    chosen: int,
    rejected: int,
    region: str = "disagreement",
    top: Sequence[int] = (),
    bottom: Sequence[int] = (),
    judge_probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """The rejected mask a pair trains on: the rejected proposal on the voxels `region` keeps, the chosen label
    elsewhere ("disagreement": the rejected proposal itself)."""
    if region == "disagreement":
        return proposals[rejected]
    kept = kept_voxels(proposals, chosen, rejected, region, top, bottom, judge_probabilities)
    return np.where(kept, proposals[rejected], proposals[chosen])
