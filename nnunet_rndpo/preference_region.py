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

Outside the kept voxels the rejected mask takes the chosen label, so they leave the pair's disagreement region
(and RN-DPO's normalisation); the SFT term on the chosen mask still sees them. Pure: arrays in, arrays out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PREFERENCE_REGIONS = ("disagreement", "ranked_consensus", "majority")


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
    agreeing = np.count_nonzero(masks == label_map[None], axis=0)
    return 2 * agreeing > masks.shape[0]


def kept_voxels(
    proposals: np.ndarray,
    chosen: int,
    rejected: int,
    region: str = "disagreement",
    top: Sequence[int] = (),
    bottom: Sequence[int] = (),
) -> np.ndarray:
    """The disagreeing voxels of the pair that `region` keeps (`top` and `bottom`: the judge's halves, from
    `ranked_halves`, which "ranked_consensus" needs)."""
    check_region(region)
    chosen_mask, rejected_mask = proposals[chosen], proposals[rejected]
    disagreement = chosen_mask != rejected_mask
    if region == "majority":
        return disagreement & holds_majority(proposals, chosen_mask)
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
) -> np.ndarray:
    """The rejected mask a pair trains on: the rejected proposal on the voxels `region` keeps, the chosen label
    elsewhere ("disagreement": the rejected proposal itself)."""
    if region == "disagreement":
        return proposals[rejected]
    kept = kept_voxels(proposals, chosen, rejected, region, top, bottom)
    return np.where(kept, proposals[rejected], proposals[chosen])
