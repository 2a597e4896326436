"""Overlap metrics between label maps, used by the judges, the audit and the demo.

Convention: a class that is empty in both maps has Dice 1.0 (both agree that it is absent).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_DICE_CHUNK_VOXELS = 1 << 20


def dice_per_class(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Dice of each label value in `labels` between two label maps of the same shape; shape (len(labels),)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    dice = np.empty(len(labels), dtype=np.float64)
    for index, label in enumerate(labels):
        in_a = a == label
        in_b = b == label
        size_sum = int(in_a.sum()) + int(in_b.sum())
        overlap = int(np.logical_and(in_a, in_b).sum())
        dice[index] = 1.0 if size_sum == 0 else 2.0 * overlap / size_sum
    return dice


def mean_dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> float:
    """Dice averaged over the foreground labels."""
    return float(dice_per_class(a, b, labels).mean())


def proposal_dice(proposals: np.ndarray, reference: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Mean Dice of each of K proposals (K, *spatial) to one reference label map; shape (K,)."""
    return np.array([mean_dice(proposal, reference, labels) for proposal in proposals], dtype=np.float64)


def pairwise_dice_per_class(proposals: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Dice between every two of K proposals, per label: shape (K, K, len(labels)), diagonal 1.

    Matrix products over chunks of voxels instead of K^2 comparisons of full volumes; chunks keep memory
    bounded and every float32 partial count below 2^24, where float32 counts exactly.
    """
    proposals = np.asarray(proposals)
    count = proposals.shape[0]
    flat = proposals.reshape(count, -1)
    dice = np.empty((count, count, len(labels)), dtype=np.float64)
    for index, label in enumerate(labels):
        overlap = np.zeros((count, count), dtype=np.float64)
        for start in range(0, flat.shape[1], _DICE_CHUNK_VOXELS):
            members = (flat[:, start : start + _DICE_CHUNK_VOXELS] == label).astype(np.float32)
            overlap += members @ members.T
        sizes = np.diag(overlap)
        size_sums = sizes[:, None] + sizes[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            dice[:, :, index] = np.where(size_sums == 0, 1.0, 2.0 * overlap / size_sums)
    return dice


def soft_dice(mask: np.ndarray, probability: np.ndarray) -> float:
    """Dice between a binary mask and a probability map: 2 sum(m p) / (sum m + sum p); 1.0 when both are empty.

    Under independent voxels this is E[2 TP] / (E[2 TP] + E[FP] + E[FN]) for a reference drawn from
    `probability`, so it charges both the probability mass the mask leaves out and the voxels it adds.
    """
    mask = np.asarray(mask, dtype=bool)
    probability = np.asarray(probability, dtype=np.float64)
    if mask.shape != probability.shape:
        raise ValueError(f"mask and probability map differ in shape: {mask.shape} vs {probability.shape}")
    denominator = float(mask.sum()) + float(probability.sum())
    if denominator == 0.0:
        return 1.0
    return 2.0 * float(probability[mask].sum()) / denominator
