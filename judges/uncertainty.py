"""Uncertainty judge: how well a proposal matches the base model's own predictive distribution.

Why not "confidence inside the mask": measured on Hippocampus it was useless (Spearman -0.01) because a
broken mask with a small foreground keeps only confident voxels and looks certain. And why not "low entropy
at the boundary": the true boundary lies where the model hesitates (p ~ 0.5, maximal entropy), so a boundary
in a confident region is a misplaced one.

The sound core is the Dice the model itself expects: if the reference is drawn voxel-wise from the mean
probabilities p_c, then E[TP] = sum_mask p, E[FP] = sum_mask (1 - p), E[FN] = sum_outside p, and
    2 E[TP] / (2 E[TP] + E[FP] + E[FN]) = 2 sum(m p) / (sum m + sum p) = soft Dice(mask, p_c).
It charges the probability mass the mask leaves out (an empty or tiny mask scores ~0 when the model sees a
structure) as well as the improbable voxels it adds, and it is maximised by thresholding p near half the
achievable Dice, i.e. by masks that follow the probabilities. For an empty mask the expected Dice is the
probability that the reference is empty too, prod(1 - p) ~ exp(-sum p), consistent with empty-vs-empty = 1.

`entropy_weight` (default 0) subtracts w * mean normalised entropy inside the mask, for users who want to
favour masks that stay out of uncertain regions; it pulls towards under-segmentation, hence off by default.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nnunet_rndpo.segmentation_metrics import soft_dice

from .base import Judge, JudgeInput
from .mask_features import mean_inside, normalised_entropy


def expected_dice(mask: np.ndarray, probability: np.ndarray) -> float:
    """Dice the model expects for `mask` when the reference follows `probability` voxel-wise (see module doc)."""
    if not mask.any():
        return float(np.exp(-float(np.asarray(probability, dtype=np.float64).sum())))
    return soft_dice(mask, probability)


class UncertaintyJudge(Judge):
    """Score = expected Dice of each class mask under the mean probabilities, averaged over classes,
    minus `entropy_weight` * mean normalised entropy inside the proposal's foreground."""

    name = "uncertainty"

    def __init__(self, entropy_weight: float = 0.0) -> None:
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        self.entropy_weight = float(entropy_weight)

    def options(self) -> dict[str, Any]:
        return {"entropy_weight": self.entropy_weight}

    def score(self, case: JudgeInput) -> np.ndarray:
        if case.mean_probabilities is None:
            raise ValueError(
                f"the uncertainty judge needs mean_probabilities for case {case.case_id!r}; "
                "store the base model's softmax with the proposals"
            )
        probabilities = case.mean_probabilities
        entropy = normalised_entropy(probabilities) if self.entropy_weight > 0 else None
        scores = np.empty(case.proposal_count)
        for index, proposal in enumerate(case.proposals):
            class_scores = [expected_dice(proposal == label, probabilities[label]) for label in case.labels]
            scores[index] = float(np.mean(class_scores))
            if entropy is not None:
                scores[index] -= self.entropy_weight * mean_inside(entropy, np.isin(proposal, case.labels))
        return scores
