"""Oracle judge (RESEARCH ONLY, USES THE TRUE LABELS): scores proposals by their true Dice.

It answers "what would a judge of known reliability do?": noise_std and flip_probability degrade it on
purpose, from exact (both 0) to a random ranking (flip_probability 1). Never a judge for unlabeled data.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from nnunet_rndpo.segmentation_metrics import proposal_dice

from .base import Judge, JudgeInput

RESEARCH_ONLY_NOTE = "research-only judge that reads the TRUE labels (reference); never usable on unlabeled data"


class OracleJudge(Judge):
    """Score = true mean Dice to `reference`, then optionally degraded:

    1. `noise_std`: Gaussian noise with this standard deviation is added to each score.
    2. `flip_probability` q: each proposal independently joins, with probability q, a set whose ranks are
       shuffled among themselves (a random permutation of a fraction q of the ranking); the score values stay
       the same multiset, only who gets which value changes. q = 0 keeps the ranking, q = 1 makes it uniformly
       random.

    The random stream of a case depends only on `seed` and the case id, so scores do not depend on the order
    in which cases are judged.
    """

    name = "oracle"
    needs_labels = True

    def __init__(self, noise_std: float = 0.0, flip_probability: float = 0.0, seed: int = 0) -> None:
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        self.noise_std = float(noise_std)
        self.flip_probability = float(flip_probability)
        self.seed = int(seed)

    def options(self) -> dict[str, Any]:
        return {"noise_std": self.noise_std, "flip_probability": self.flip_probability, "seed": self.seed}

    def describe(self) -> str:
        return f"{super().describe()}: {RESEARCH_ONLY_NOTE}"

    def __repr__(self) -> str:
        return f"{super().__repr__()}  # {RESEARCH_ONLY_NOTE}"

    def score(self, case: JudgeInput) -> np.ndarray:
        if case.true_labels is None:
            raise ValueError(
                f"the oracle judge ({RESEARCH_ONLY_NOTE}) needs the reference labels of case {case.case_id!r}, "
                "which were not given"
            )
        scores = proposal_dice(case.proposals, case.true_labels, case.labels)
        rng = np.random.default_rng([self.seed, _stable_case_number(case.case_id)])
        if self.noise_std > 0:
            scores = scores + rng.normal(0.0, self.noise_std, size=scores.shape)
        if self.flip_probability > 0:
            scores = _shuffle_fraction_of_ranks(scores, self.flip_probability, rng)
        return scores


def _shuffle_fraction_of_ranks(scores: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    chosen = np.flatnonzero(rng.random(scores.size) < fraction)
    shuffled = scores.copy()
    shuffled[chosen] = scores[rng.permutation(chosen)]
    return shuffled


def _stable_case_number(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode("utf-8")).digest()[:8], "little")
