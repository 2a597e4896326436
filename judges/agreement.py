"""Agreement judge: a proposal that the other proposals agree with is probably good.

Measured on Hippocampus (shared/notes/proposals-measured.md): Spearman 0.80 with true Dice, but its top pick
is a typical mask rather than the best one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nnunet_rndpo.segmentation_metrics import dice_per_class, pairwise_dice_per_class

from .base import Judge, JudgeInput

AGREEMENT_TARGETS = ("others", "consensus")


class AgreementJudge(Judge):
    """Score = Dice (per class, averaged) to the other K-1 proposals (`to="others"`, the mean of K-1 Dice
    values) or to their per-voxel majority vote (`to="consensus"`, the proposal itself included in the vote).

    With a single proposal there is nothing to agree with: its score is 1.0.
    """

    name = "agreement"

    def __init__(self, to: str = "others") -> None:
        if to not in AGREEMENT_TARGETS:
            raise ValueError(f"unknown agreement target {to!r}; valid: {', '.join(AGREEMENT_TARGETS)}")
        self.to = to

    def options(self) -> dict[str, Any]:
        return {"to": self.to}

    def score(self, case: JudgeInput) -> np.ndarray:
        count = case.proposal_count
        if count == 1:
            return np.ones(1)
        if self.to == "consensus":
            consensus = majority_vote(case.proposals, case.labels)
            return np.array([dice_per_class(proposal, consensus, case.labels).mean() for proposal in case.proposals])
        class_mean_dice = pairwise_dice_per_class(case.proposals, case.labels).mean(axis=2)
        # The diagonal (self-Dice = 1) is excluded: only the other K-1 proposals vote.
        return (class_mean_dice.sum(axis=1) - np.diag(class_mean_dice)) / (count - 1)


def majority_vote(proposals: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    """Per-voxel most frequent value among background and `labels`; ties go to the earlier value (background
    first), so a voxel enters the consensus only with a strict plurality over background."""
    candidates = (0,) + tuple(labels)
    votes = np.stack([(proposals == value).sum(axis=0) for value in candidates])
    return np.asarray(candidates)[votes.argmax(axis=0)].astype(proposals.dtype)
