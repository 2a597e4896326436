"""Learned quality control: a regressor that predicts a proposal's true mean Dice from label-free features.

`fit` learns on labeled cases (their proposals and references give the Dice targets); `score` computes the
same features from the proposals, the image and the mean probabilities only — the feature code never
receives the reference. Which optional inputs (image, probabilities) feed the features is fixed by the
first fitted case; every later case must bring the same ones.

Where its information comes from: examples of (proposal, true Dice). Fitted on the base model's proposals
for its own training cases, the examples would be in-sample: the model has memorised those cases, its masks
there are better and more alike than on new cases, and the regressor learns the wrong relation. So the
pipeline (`pipeline.FittingExamples.held_out`) gives `fit` honest examples only: each fold model's proposals
for the labeled cases held out of its training (nnU-Net's cross-validation). `fit_on_held_out_predictions`
does the same for predictions made elsewhere, and refuses in-sample ones.
Cost: the fold models' predictions on their validation cases (which nnU-Net's cross-validation makes anyway)
and a small tree ensemble; scoring is feature computation plus a regressor call, no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Hashable, Mapping, Sequence

import numpy as np

from nnunet_rndpo.segmentation_metrics import pairwise_dice_per_class, proposal_dice, soft_dice

from .base import Judge, JudgeError, JudgeInput
from .mask_features import (
    boundary_band,
    component_sizes,
    mean_inside,
    normalised_entropy,
    roughness,
    surrounding_ring,
)

QC_MODELS = ("gradient_boosting", "random_forest")

SHAPE_FEATURES = (
    "empty",
    "log_volume_to_case_mean",
    "log_volume",
    "agreement_dice",
    "case_mean_agreement",
    "components",
    "largest_component_fraction",
    "roughness",
)
PROBABILITY_FEATURES = ("soft_dice", "missed_probability_fraction", "entropy_inside", "entropy_boundary")
IMAGE_FEATURES = ("contrast_to_ring", "relative_std_inside")


class LearnedQCJudge(Judge):
    """Score = predicted true mean Dice of each proposal (scikit-learn regressor, fixed random_state)."""

    name = "learned_qc"

    def __init__(self, model: str = "gradient_boosting", random_state: int = 0) -> None:
        if model not in QC_MODELS:
            raise ValueError(f"unknown learned_qc model {model!r}; valid: {', '.join(QC_MODELS)}")
        self.model = model
        self.random_state = int(random_state)
        self.regressor: Any = None
        self.labels: tuple[int, ...] | None = None
        self.uses_probabilities = False
        self.uses_image = False
        self.training_samples = 0
        self.training_source = ""

    def options(self) -> dict[str, Any]:
        return {"model": self.model, "random_state": self.random_state}

    def fitted_state(self) -> dict[str, Any]:
        if self.regressor is None:
            return {}
        return {
            "regressor": self.regressor,
            "labels": self.labels,
            "uses_probabilities": self.uses_probabilities,
            "uses_image": self.uses_image,
            "training_samples": self.training_samples,
            "training_source": self.training_source,
        }

    def load_fitted_state(self, fitted: dict[str, Any]) -> None:
        if not fitted:
            return
        self.regressor = fitted["regressor"]
        self.labels = tuple(fitted["labels"])
        self.uses_probabilities = bool(fitted["uses_probabilities"])
        self.uses_image = bool(fitted["uses_image"])
        self.training_samples = int(fitted["training_samples"])
        self.training_source = str(fitted.get("training_source", ""))

    def describe(self) -> str:
        source = f" ({self.training_source})" if self.training_source else ""
        state = f"fitted on {self.training_samples} proposals{source}" if self.regressor is not None else "not fitted"
        return f"{super().describe()}, {state}"

    @property
    def feature_names(self) -> list[str]:
        if self.labels is None:
            raise RuntimeError("learned_qc is not fitted: feature names depend on the fitted labels")
        names = list(SHAPE_FEATURES)
        if self.uses_probabilities:
            names += PROBABILITY_FEATURES
        return [f"class{label}_{name}" for label in self.labels for name in names] + (
            [f"image_{name}" for name in IMAGE_FEATURES] if self.uses_image else []
        )

    def fit(self, labeled_cases: Sequence[JudgeInput]) -> None:
        labeled_cases = list(labeled_cases)
        if not labeled_cases:
            raise ValueError("learned_qc.fit needs at least one labeled case")
        targets = []
        for case in labeled_cases:
            if case.true_labels is None:
                raise ValueError(f"learned_qc.fit needs labeled cases; case {case.case_id!r} has no true labels")
            targets.append(proposal_dice(case.proposals, case.true_labels, case.labels))
        self.fit_examples(labeled_cases, targets, source="labeled cases' proposals")

    def fit_examples(self, cases: Sequence[JudgeInput], targets: Sequence[np.ndarray], source: str = "") -> None:
        """Fit on the proposals of `cases` with the given true Dice targets ((K,) per case)."""
        cases = list(cases)
        first = cases[0]
        self.labels = first.labels
        self.uses_probabilities = first.mean_probabilities is not None
        self.uses_image = first.image is not None
        feature_matrix = np.concatenate([self._features(case) for case in cases])
        target_vector = np.concatenate([np.asarray(target, dtype=np.float64) for target in targets])
        if feature_matrix.shape[0] < 2:
            raise ValueError(f"learned_qc.fit needs at least 2 proposals, got {feature_matrix.shape[0]}")
        regressor = _build_regressor(self.model, self.random_state)
        regressor.fit(feature_matrix, target_vector)
        self.regressor = regressor
        self.training_samples = int(feature_matrix.shape[0])
        self.training_source = source

    def score(self, case: JudgeInput) -> np.ndarray:
        if self.regressor is None:
            raise RuntimeError(
                "learned_qc is not fitted: call fit() on labeled cases (or load a fitted judge) before scoring"
            )
        return np.asarray(self.regressor.predict(self._features(case)), dtype=np.float64)

    def _features(self, case: JudgeInput) -> np.ndarray:
        where = f"case {case.case_id!r}"
        if case.labels != self.labels:
            raise ValueError(f"{where} has labels {case.labels}, learned_qc was fitted on {self.labels}")
        if self.uses_probabilities and case.mean_probabilities is None:
            raise ValueError(f"{where} has no mean_probabilities; learned_qc was fitted with them")
        if self.uses_image and case.image is None:
            raise ValueError(f"{where} has no image; learned_qc was fitted with one")
        return proposal_features(
            case.proposals,
            case.labels,
            mean_probabilities=case.mean_probabilities if self.uses_probabilities else None,
            image=case.image if self.uses_image else None,
        )


@dataclass(frozen=True)
class HeldOutPrediction:
    """One fold model's proposals for one labeled case, with their true Dice.

    case: the proposals (and image, mean probabilities) as a judge sees them; true_dice: (K,) mean Dice of
    each proposal, or None to compute it from `case.true_labels`; fold: which fold model made them;
    in_sample: True when the case was in that fold model's training set (such examples are refused)."""

    case: JudgeInput
    fold: Hashable
    true_dice: np.ndarray | None = None
    in_sample: bool = False


def fit_on_held_out_predictions(
    examples: Sequence[HeldOutPrediction],
    *,
    fold_training_cases: Mapping[Hashable, Collection[str]] | None = None,
    model: str = "gradient_boosting",
    random_state: int = 0,
) -> LearnedQCJudge:
    """A learned_qc judge fitted only on honest (held-out) examples of several fold models.

    Refuses, with a JudgeError naming the case and the fold, any example marked `in_sample`, and, when
    `fold_training_cases` ({fold: training case ids}) is given, any example whose case was in its fold's
    training set or whose fold is not listed."""
    examples = list(examples)
    if not examples:
        raise JudgeError("fit_on_held_out_predictions needs at least one held-out example, got none")
    cases, targets = [], []
    for example in examples:
        case_id, fold = example.case.case_id, example.fold
        where = f"case {case_id!r} of fold {fold!r}"
        if example.in_sample:
            raise JudgeError(f"{where} is marked in-sample (the fold model trained on it): only held-out examples")
        if fold_training_cases is not None:
            check_held_out(case_id, fold, fold_training_cases)
        if example.true_dice is not None:
            target = np.asarray(example.true_dice, dtype=np.float64)
        elif example.case.true_labels is not None:
            target = proposal_dice(example.case.proposals, example.case.true_labels, example.case.labels)
        else:
            raise JudgeError(f"{where}: neither true_dice nor the case's reference is given")
        if target.shape != (example.case.proposal_count,) or not np.all(np.isfinite(target)):
            raise JudgeError(
                f"{where}: true_dice must be {example.case.proposal_count} finite numbers, got shape {target.shape}"
            )
        cases.append(example.case)
        targets.append(target)
    folds = sorted({str(example.fold) for example in examples})
    judge = LearnedQCJudge(model=model, random_state=random_state)
    try:
        judge.fit_examples(cases, targets, source=f"held-out predictions of folds {', '.join(folds)}")
    except ValueError as error:
        raise JudgeError(f"fit_on_held_out_predictions: {error}") from error
    return judge


def check_held_out(case_id: str, fold: Hashable, fold_training_cases: Mapping[Hashable, Collection[str]]) -> None:
    """Raise a JudgeError naming the case and the fold unless the case is held out of that fold's training."""
    where = f"case {case_id!r} of fold {fold!r}"
    if fold not in fold_training_cases:
        listed = sorted(map(str, fold_training_cases))
        raise JudgeError(f"{where}: fold {fold!r} is not in fold_training_cases {listed}")
    if case_id in fold_training_cases[fold]:
        raise JudgeError(f"{where}: the case is in that fold's training cases, so the example is in-sample")


def proposal_features(
    proposals: np.ndarray,
    labels: tuple[int, ...],
    mean_probabilities: np.ndarray | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """(K, F) label-free features of each proposal; the reference is deliberately not a parameter."""
    count = proposals.shape[0]
    pairwise = pairwise_dice_per_class(proposals, labels)
    off_diagonal = ~np.eye(count, dtype=bool)
    entropy = normalised_entropy(mean_probabilities) if mean_probabilities is not None else None
    flat = proposals.reshape(count, -1)
    class_volumes = [(flat == label).sum(axis=1) for label in labels]
    rows = []
    for index, proposal in enumerate(proposals):
        row: list[float] = []
        for class_index, label in enumerate(labels):
            class_pairwise = pairwise[:, :, class_index]
            mask = proposal == label
            volume = int(class_volumes[class_index][index])
            sizes = component_sizes(mask)
            row += [
                float(volume == 0),
                float(np.log((volume + 1.0) / (class_volumes[class_index].mean() + 1.0))),
                float(np.log1p(volume)),
                float(class_pairwise[index][off_diagonal[index]].mean()) if count > 1 else 1.0,
                float(class_pairwise[off_diagonal].mean()) if count > 1 else 1.0,
                float(sizes.size),
                float(sizes[0] / volume) if volume else 0.0,
                roughness(mask),
            ]
            if mean_probabilities is not None and entropy is not None:
                probability = mean_probabilities[label]
                total_probability = float(probability.sum())
                row += [
                    soft_dice(mask, probability),
                    float(probability[~mask].sum() / total_probability) if total_probability > 0 else 0.0,
                    mean_inside(entropy, mask),
                    mean_inside(entropy, boundary_band(mask)),
                ]
        if image is not None:
            row += _image_features(image, np.isin(proposal, labels))
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def _image_features(image: np.ndarray, foreground: np.ndarray) -> list[float]:
    """Contrast between the foreground and a ring around it, and texture inside, averaged over channels."""
    ring = surrounding_ring(foreground)
    contrasts, relative_stds = [], []
    for channel in np.asarray(image, dtype=np.float64):
        spread = float(channel.std()) or 1.0
        inside = channel[foreground]
        contrasts.append((mean_inside(channel, foreground) - mean_inside(channel, ring)) / spread)
        relative_stds.append(float(inside.std()) / spread if inside.size else 0.0)
    return [float(np.mean(contrasts)), float(np.mean(relative_stds))]


def _build_regressor(model: str, random_state: int) -> Any:
    # Small labeled sets (tens of cases x K proposals): shallow trees, many of them, fixed seeds.
    if model == "gradient_boosting":
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(
            n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8, random_state=random_state
        )
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=300, min_samples_leaf=2, random_state=random_state, n_jobs=1)
