"""Agreement judge: a proposal that the other proposals agree with is probably good.

Measured on Hippocampus (docs/measured-proposals.md): Spearman 0.80 with true Dice, but its top pick is a
typical mask rather than the best one: mirror members of one model mostly agree on what that model already
knows. `to="other_models"` asks models trained on other data instead (nnU-Net's other folds, proposal sources
`checkpoint`/`checkpoint_tta` with `other_folds`): each proposal is scored against the consensus of every
model but the one that made it, each model's members voting as one, so a model cannot vote for itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nnunet_rndpo.segmentation_metrics import dice_per_class, pairwise_dice_per_class

from .base import Judge, JudgeError, JudgeInput

AGREEMENT_TARGETS = ("others", "consensus", "other_models")
ENSEMBLE = "ensemble"  # the proposal_models entry of nnU-Net's ensemble member: every model's, so none's own


class AgreementJudge(Judge):
    """Score = Dice (per class, averaged) to the other K-1 proposals (`to="others"`, the mean of K-1 Dice
    values), to their per-voxel majority vote (`to="consensus"`, the proposal itself included in the vote), or
    to the other models (`to="other_models"`: the mean Dice to each other model's majority vote; needs
    `JudgeInput.proposal_models` with at least two models).

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
        if self.to == "other_models":
            return other_models_agreement(case)
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


def other_models_agreement(case: JudgeInput) -> np.ndarray:
    """Each proposal's mean Dice (per class, averaged) to the majority vote of each model that did not make it."""
    models = case.proposal_models
    voting = sorted({model for model in (models or ()) if model != ENSEMBLE}, key=str)
    if len(voting) < 2:
        raise JudgeError(
            f"case {case.case_id!r}: agreement to other_models needs proposals of at least two models, got "
            f"{voting or 'no model names'}; add proposal sources checkpoint or checkpoint_tta with other_folds "
            "(the base's other nnU-Net folds) or extra_checkpoints"
        )
    votes = {
        model: majority_vote(case.proposals[[i for i, m in enumerate(models) if m == model]], case.labels)
        for model in voting
    }
    return np.array(
        [
            np.mean([dice_per_class(proposal, votes[m], case.labels).mean() for m in voting if m != own])
            for proposal, own in zip(case.proposals, models)
        ]
    )
