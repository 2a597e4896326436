"""Anatomy judge: how plausible a proposal's anatomy is under a density fitted on the labeled cases' TRUE labels.

Where its information comes from: the reference label maps of the labeled cases, read only in `fit`. The
segmentation model saw them too, but only voxel by voxel through a patch-wise loss; it never measured a
whole structure's volume, its number of pieces, its cavities, which classes touch, or where one class sits
relative to another. Those global descriptors are what this judge scores, so it can prefer a proposal that
the model's own members cannot tell apart from the others (a spurious blob, a cavity, a swapped class).

Features (per foreground class c; all in voxels, which is fine because nnU-Net preprocesses every case of a
dataset to one spacing, so a voxel is the same physical size in every case of one configuration):
- volume: log(1 + voxel count);
- components: number of connected components (full connectivity, as in `mask_features`);
- cavities: background components (face connectivity, the digital-topology complement of full
  connectivity) not connected to the volume's border, i.e. holes enclosed by the class in 3D;
- roughness: surface voxels / volume^(2/3) (`mask_features.roughness`);
- opening loss: fraction of the class removed by a morphological opening with a 3x3x3 cross (spikes and
  one-voxel-thin parts);
- adjacency (c -> d for every other foreground class d): fraction of c's surface voxels with a face
  neighbour in class d;
- centroid offset (c < d): centroid of d minus centroid of c, per axis (an offset, not a distance, so a
  proposal with two classes swapped moves it to the other side).
Groups can be switched off with `features`.

Density: each feature is standardised by the references' median and a robust scale, 1.4826 * MAD, floored
at a per-feature resolution (`FEATURE_SCALE_FLOORS`: e.g. 10% of volume, half a component, one voxel of
centroid offset), so a feature that never varies in the references (one component, no cavity) still has a
finite scale. In these units the model is a Gaussian centred at 0 (the median) with covariance
    (1 - s) * S + s * I,
S the second moment of the standardised references and s the Ledoit-Wolf shrinkage coefficient (scikit-learn),
at least `min_shrinkage`. The identity target is the natural one here: by construction a feature's robust
spread is 1. With fewer cases than features S is singular and the shrinkage keeps the covariance invertible;
with a single labeled case s = 1 (independent robust z-scores around that case). Score = log-density of the
proposal's standardised features (higher = more plausible), one joint density over all classes' features
rather than the per-class average other judges use (class contacts and offsets belong to no single class);
it is unbounded below, which is intended: rankings are what matters, and the combination judge
rank-normalises.

Cost: fit reads each labeled reference once; scoring computes the features of each proposal (a few
connected-component labellings and morphological operations per class on the class's bounding box), about
the cost of the virtual annotator; no model, no GPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .base import Judge, JudgeError, JudgeInput
from .mask_features import component_sizes, roughness

FEATURE_GROUPS = ("volume", "components", "cavities", "roughness", "opening_loss", "adjacency", "centroid_offset")
# Smallest standardisation scale per feature kind, in the feature's own units: below it a difference is
# treated as resolution noise, not as evidence (and a constant feature gets a finite scale).
FEATURE_SCALE_FLOORS = {
    "volume": 0.10,  # log-volume: 10%
    "components": 0.5,
    "cavities": 0.5,
    "roughness": 0.25,  # a ball is ~4.84
    "opening_loss": 0.02,
    "adjacency": 0.02,
    "centroid_offset": 1.0,  # voxels
}
MAD_TO_STD = 1.4826
_PER_CLASS_GROUPS = ("volume", "components", "cavities", "roughness", "opening_loss")
_CROSS = ndimage.generate_binary_structure(3, 1)


class AnatomyJudge(Judge):
    """Score = log-density of the proposal's anatomical features under a shrunk Gaussian fitted on the
    labeled cases' true label maps (module docstring: features, standardisation, shrinkage)."""

    name = "anatomy"

    def __init__(self, features: Sequence[str] = FEATURE_GROUPS, min_shrinkage: float = 0.1) -> None:
        features = tuple(features)
        unknown = [group for group in features if group not in FEATURE_GROUPS]
        if unknown or not features:
            raise JudgeError(
                f"anatomy option 'features' must be a non-empty subset of {', '.join(FEATURE_GROUPS)}; "
                f"got {list(features)}"
            )
        if not 0.0 <= float(min_shrinkage) <= 1.0:
            raise JudgeError(f"anatomy option 'min_shrinkage' must be in [0, 1], got {min_shrinkage}")
        self.features = tuple(group for group in FEATURE_GROUPS if group in features)
        self.min_shrinkage = float(min_shrinkage)
        self.labels: tuple[int, ...] | None = None
        self.centre: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.precision: np.ndarray | None = None
        self.log_normaliser = 0.0
        self.shrinkage = 1.0
        self.training_cases = 0

    def options(self) -> dict[str, Any]:
        return {"features": list(self.features), "min_shrinkage": self.min_shrinkage}

    def fitted_state(self) -> dict[str, Any]:
        if self.centre is None:
            return {}
        return {
            "labels": list(self.labels or ()),
            "centre": self.centre,
            "scale": self.scale,
            "precision": self.precision,
            "log_normaliser": self.log_normaliser,
            "shrinkage": self.shrinkage,
            "training_cases": self.training_cases,
        }

    def load_fitted_state(self, fitted: dict[str, Any]) -> None:
        if not fitted:
            return
        self.labels = tuple(int(label) for label in fitted["labels"])
        self.centre = np.asarray(fitted["centre"], dtype=np.float64)
        self.scale = np.asarray(fitted["scale"], dtype=np.float64)
        self.precision = np.asarray(fitted["precision"], dtype=np.float64)
        self.log_normaliser = float(fitted["log_normaliser"])
        self.shrinkage = float(fitted["shrinkage"])
        self.training_cases = int(fitted["training_cases"])

    def describe(self) -> str:
        if self.centre is None:
            return f"{super().describe()}, not fitted"
        return (
            f"{super().describe()}, fitted on {self.training_cases} reference label maps, "
            f"{len(self.centre)} features, shrinkage {self.shrinkage:.2f}"
        )

    @property
    def feature_names(self) -> list[str]:
        if self.labels is None:
            raise JudgeError("anatomy judge is not fitted: feature names depend on the fitted labels")
        return [name for name, _ in feature_layout(self.labels, self.features)]

    def fit_from(self, examples) -> None:
        """Learns from the labeled training cases' true label maps (no model prediction needed)."""
        self.fit(examples.true_label_maps())

    def fit(self, labeled_cases: Sequence[JudgeInput]) -> None:
        """Fit the density on the cases' references (their proposals are not used)."""
        labeled_cases = list(labeled_cases)
        if not labeled_cases:
            raise JudgeError("anatomy judge: fit needs at least one labeled case, got none")
        labels = labeled_cases[0].labels
        rows = []
        for case in labeled_cases:
            if case.true_labels is None:
                raise JudgeError(f"anatomy judge: fit needs true labels; case {case.case_id!r} has no true labels")
            if case.labels != labels:
                raise JudgeError(
                    f"anatomy judge: case {case.case_id!r} has labels {case.labels}, the first case had {labels}"
                )
            rows.append(anatomy_features(case.true_labels, labels, self.features))
        references = np.stack(rows)
        floors = np.array([FEATURE_SCALE_FLOORS[kind] for _, kind in feature_layout(labels, self.features)])
        centre = np.median(references, axis=0)
        scale = np.maximum(MAD_TO_STD * np.median(np.abs(references - centre), axis=0), floors)
        standardised = (references - centre) / scale
        shrinkage = max(self.min_shrinkage, _ledoit_wolf_shrinkage(standardised))
        second_moment = standardised.T @ standardised / len(standardised)
        covariance = (1.0 - shrinkage) * second_moment + shrinkage * np.eye(len(centre))
        sign, log_determinant = np.linalg.slogdet(covariance)
        if sign <= 0:  # cannot happen with shrinkage > 0; guards min_shrinkage = 0 with n < p
            raise JudgeError(
                f"anatomy judge: covariance of {len(references)} cases x {len(centre)} features is singular; "
                "use min_shrinkage > 0"
            )
        self.labels = labels
        self.centre, self.scale = centre, scale
        self.precision = np.linalg.inv(covariance)
        self.log_normaliser = -0.5 * (log_determinant + len(centre) * np.log(2.0 * np.pi))
        self.shrinkage = float(shrinkage)
        self.training_cases = len(references)

    def score(self, case: JudgeInput) -> np.ndarray:
        if self.centre is None or self.precision is None or self.scale is None:
            raise JudgeError(
                "anatomy judge is not fitted: call fit() on labeled cases (or load a fitted judge) before scoring"
            )
        if case.labels != self.labels:
            raise JudgeError(
                f"case {case.case_id!r} has labels {case.labels}, the anatomy judge was fitted on {self.labels}"
            )
        features = np.stack([anatomy_features(proposal, case.labels, self.features) for proposal in case.proposals])
        return self.log_density(features)

    def log_density(self, features: np.ndarray) -> np.ndarray:
        """(N,) log-density of (N, F) raw feature rows in standardised units."""
        standardised = (np.asarray(features, dtype=np.float64) - self.centre) / self.scale
        mahalanobis = np.einsum("nf,fg,ng->n", standardised, self.precision, standardised)
        return self.log_normaliser - 0.5 * mahalanobis


def _ledoit_wolf_shrinkage(standardised: np.ndarray) -> float:
    """Ledoit-Wolf coefficient towards a scaled identity; 1.0 when fewer than 2 cases (no covariance to learn)."""
    if standardised.shape[0] < 2 or not np.any(standardised):
        return 1.0
    from sklearn.covariance import ledoit_wolf_shrinkage

    return float(ledoit_wolf_shrinkage(standardised, assume_centered=True))


def feature_layout(labels: Sequence[int], groups: Sequence[str] = FEATURE_GROUPS) -> list[tuple[str, str]]:
    """(feature name, feature kind) in the order `anatomy_features` returns them."""
    layout: list[tuple[str, str]] = []
    for label in labels:
        for group in _PER_CLASS_GROUPS:
            if group in groups:
                layout.append((f"class{label}_{group}", group))
        if "adjacency" in groups:
            layout += [(f"class{label}_touches_class{other}", "adjacency") for other in labels if other != label]
    if "centroid_offset" in groups:
        for first_index, first in enumerate(labels):
            for second in labels[first_index + 1 :]:
                names = [f"centroid_class{second}_minus_class{first}_axis{axis}" for axis in range(3)]
                layout += [(name, "centroid_offset") for name in names]
    return layout


def anatomy_features(
    label_map: np.ndarray, labels: Sequence[int], groups: Sequence[str] = FEATURE_GROUPS
) -> np.ndarray:
    """(F,) anatomical features of one 3D label map, in the order of `feature_layout` (values outside
    `labels`, e.g. nnU-Net's -1 outside the crop, count as background)."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 3:
        raise JudgeError(f"anatomy features need a 3D label map, got shape {label_map.shape}")
    values: list[float] = []
    centroids = {}
    for label in labels:
        mask = label_map == label
        volume = int(mask.sum())
        if volume == 0:
            # An empty class: no pieces, cavities, surface or contacts; its volume feature condemns it when the
            # references have the class. Its centroid is put at the array's centre.
            values += [0.0] * sum(group in groups for group in _PER_CLASS_GROUPS)
            values += [0.0] * ((len(labels) - 1) if "adjacency" in groups else 0)
            centroids[label] = (np.array(label_map.shape) - 1) / 2.0
            continue
        cropped, cropped_labels, offset = _crop_around(mask, label_map, margin=2)
        if "volume" in groups:
            values.append(float(np.log1p(volume)))
        if "components" in groups:
            values.append(float(component_sizes(cropped).size))
        if "cavities" in groups:
            values.append(float(cavity_count(cropped)))
        if "roughness" in groups:
            values.append(roughness(cropped))
        if "opening_loss" in groups:
            values.append(opening_loss(cropped))
        if "adjacency" in groups:
            fractions = surface_contact_fractions(cropped, cropped_labels)
            values += [fractions.get(other, 0.0) for other in labels if other != label]
        centroids[label] = np.array(ndimage.center_of_mass(cropped)) + offset
    if "centroid_offset" in groups:
        for first_index, first in enumerate(labels):
            for second in labels[first_index + 1 :]:
                values += list(centroids[second] - centroids[first])
    return np.asarray(values, dtype=np.float64)


def cavity_count(mask: np.ndarray) -> int:
    """Background components (face connectivity) of the mask that do not reach the array's border."""
    if not mask.any():
        return 0
    # A one-voxel background frame joins every border-touching background component into one.
    framed = np.pad(~mask, 1, constant_values=True)
    _, count = ndimage.label(framed, structure=_CROSS)
    return int(count - 1)


def opening_loss(mask: np.ndarray) -> float:
    """Fraction of the mask removed by a binary opening with a 3x3x3 cross; 0.0 for an empty mask."""
    volume = int(mask.sum())
    if volume == 0:
        return 0.0
    padded = np.pad(mask, 1)
    opened = ndimage.binary_opening(padded, structure=_CROSS)
    return float(volume - int(opened.sum())) / volume


def surface_contact_fractions(mask: np.ndarray, label_map: np.ndarray) -> dict[int, float]:
    """For each label value touching the mask: fraction of the mask's surface voxels with a face neighbour of
    that value (the mask's own value excluded)."""
    surface = mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)
    surface_count = int(surface.sum())
    if surface_count == 0:
        return {}
    fractions = {}
    for value in np.unique(label_map[ndimage.binary_dilation(mask, structure=_CROSS) & ~mask]):
        touching = surface & ndimage.binary_dilation(label_map == value, structure=_CROSS)
        fractions[int(value)] = float(touching.sum()) / surface_count
    return fractions


def _crop_around(mask: np.ndarray, label_map: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mask's bounding box grown by `margin` (clipped to the array), the label map on it, and its origin.

    Cropping keeps every feature identical to the full-array one (the border still counts as outside) while
    making large volumes with small structures cheap."""
    where = np.nonzero(mask)
    low = [max(int(axis.min()) - margin, 0) for axis in where]
    high = [min(int(axis.max()) + margin + 1, size) for axis, size in zip(where, mask.shape)]
    box = tuple(slice(a, b) for a, b in zip(low, high))
    return mask[box], label_map[box], np.array(low, dtype=np.float64)
