"""Virtual annotator: the shape checks an annotator would make at a glance, in the spirit of the CVPR 2025
SAM+DPO "virtual annotator" (fragments, ragged borders, implausible size, missing structure).

Per class the score is a product of factors in [0, 1], so one gross defect cannot be bought back by the
others:
- fragments: 1 / (1 + extra components), extra = components beyond the expected count (the references'
  median, 1 without fit);
- smoothness: min(1, reference roughness / roughness), roughness = surface voxels / volume^(2/3)
  (references' median; a ball's 4.84 without fit). Only rougher-than-reference is a defect: predictions
  are usually smoother than manual labels;
- volume: exp(-z^2 / 8), z = the log-volume's z-score against the references (a log scale because volumes
  are positive and skewed; exp(-z^2/8) halves the factor at |z| ~ 2.4). Without fit the centre is the
  median volume of the case's non-empty proposals with a 25% spread: a consensus size, not a learned one.
  Volumes are voxel counts, comparable because nnU-Net preprocesses all cases to one spacing;
- empty class: 0 when the class is expected (present in at least half the references; without fit, in at
  least half the proposals), otherwise an empty mask is right and scores 1 (a non-empty one is then judged
  by the factors above with the fallback statistics).
The case score is the mean over classes; `weights` raise each factor to a power (0 turns a check off).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .base import Judge, JudgeInput
from .mask_features import BALL_ROUGHNESS, component_sizes, roughness

FACTORS = ("fragments", "smoothness", "volume")
DEFAULT_LOG_VOLUME_STD = np.log(1.25)
# A floor on the learned spread: a handful of labeled cases can agree on a volume more tightly than the
# population does.
MIN_LOG_VOLUME_STD = np.log(1.10)


@dataclass(frozen=True)
class ClassShapeStatistics:
    """What the labeled references say about one class."""

    presence_rate: float
    log_volume_mean: float
    log_volume_std: float
    expected_components: int
    roughness: float


class VirtualAnnotatorJudge(Judge):
    name = "virtual_annotator"

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        weights = dict(weights or {})
        unknown = set(weights) - set(FACTORS)
        if unknown:
            raise ValueError(f"unknown virtual annotator weights {sorted(unknown)}; valid: {', '.join(FACTORS)}")
        if any(value < 0 for value in weights.values()):
            raise ValueError(f"virtual annotator weights must be >= 0, got {weights}")
        self.weights = {factor: float(weights.get(factor, 1.0)) for factor in FACTORS}
        self.class_statistics: dict[int, ClassShapeStatistics] = {}

    def options(self) -> dict[str, Any]:
        return {"weights": dict(self.weights)}

    def fitted_state(self) -> dict[str, Any]:
        return {"class_statistics": {label: asdict(stats) for label, stats in self.class_statistics.items()}}

    def load_fitted_state(self, fitted: dict[str, Any]) -> None:
        self.class_statistics = {
            int(label): ClassShapeStatistics(**stats) for label, stats in fitted.get("class_statistics", {}).items()
        }

    def fit_from(self, examples) -> None:
        """Learns from the labeled training cases' true label maps (no model prediction needed)."""
        self.fit(examples.true_label_maps())

    def fit(self, labeled_cases: Sequence[JudgeInput]) -> None:
        """Learn per-class presence, log-volume, component count and roughness from the references."""
        references = []
        for case in labeled_cases:
            if case.true_labels is None:
                raise ValueError(f"virtual_annotator.fit needs labeled cases; case {case.case_id!r} has no true labels")
            references.append((case.true_labels, case.labels))
        if not references:
            raise ValueError("virtual_annotator.fit needs at least one labeled case")
        all_labels = sorted({label for _, labels in references for label in labels})
        statistics = {}
        for label in all_labels:
            masks = [reference == label for reference, labels in references if label in labels]
            present = [mask for mask in masks if mask.any()]
            if not present:
                statistics[label] = ClassShapeStatistics(0.0, 0.0, DEFAULT_LOG_VOLUME_STD, 0, BALL_ROUGHNESS)
                continue
            log_volumes = np.log([mask.sum() for mask in present])
            spread = float(np.std(log_volumes, ddof=1)) if len(present) > 1 else DEFAULT_LOG_VOLUME_STD
            statistics[label] = ClassShapeStatistics(
                presence_rate=len(present) / len(masks),
                log_volume_mean=float(log_volumes.mean()),
                log_volume_std=max(spread, MIN_LOG_VOLUME_STD),
                expected_components=int(round(np.median([component_sizes(mask).size for mask in present]))),
                roughness=float(np.median([roughness(mask) for mask in present])),
            )
        self.class_statistics = statistics

    def score(self, case: JudgeInput) -> np.ndarray:
        per_class = np.stack([self.class_scores(case, label) for label in case.labels], axis=1)
        return per_class.mean(axis=1)

    def class_scores(self, case: JudgeInput, label: int) -> np.ndarray:
        """(K,) scores of one class."""
        masks = [proposal == label for proposal in case.proposals]
        fallback = _fallback_statistics(masks)
        fitted = self.class_statistics.get(label)
        class_expected = (fitted or fallback).presence_rate >= 0.5
        # References that never contain the class say nothing about its shape: use the case's own masks.
        shape_statistics = fitted if fitted is not None and fitted.presence_rate > 0 else fallback
        scores = np.empty(len(masks))
        for index, mask in enumerate(masks):
            if not mask.any():
                scores[index] = 0.0 if class_expected else 1.0
                continue
            factors = self.factors(mask, shape_statistics)
            scores[index] = float(np.prod([factors[name] ** self.weights[name] for name in FACTORS]))
        return scores

    @staticmethod
    def factors(mask: np.ndarray, statistics: ClassShapeStatistics) -> dict[str, float]:
        """The three factors in [0, 1] for a non-empty mask."""
        extra_components = max(0, component_sizes(mask).size - max(statistics.expected_components, 1))
        z_score = (np.log(mask.sum()) - statistics.log_volume_mean) / statistics.log_volume_std
        return {
            "fragments": 1.0 / (1.0 + extra_components),
            "smoothness": min(1.0, statistics.roughness / roughness(mask)),
            "volume": float(np.exp(-(z_score**2) / 8.0)),
        }


def _fallback_statistics(masks: list[np.ndarray]) -> ClassShapeStatistics:
    volumes = [int(mask.sum()) for mask in masks if mask.any()]
    presence_rate = len(volumes) / len(masks)
    log_volume_mean = float(np.log(np.median(volumes))) if volumes else 0.0
    return ClassShapeStatistics(presence_rate, log_volume_mean, DEFAULT_LOG_VOLUME_STD, 1, BALL_ROUGHNESS)
