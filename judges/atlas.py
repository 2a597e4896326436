"""Atlas judge: each proposal's overlap with the labeled cases' true labels, registered onto the case's image.

Where its information comes from: the labeled cases, used at judging time by a route that does not go through
the segmentation network. Each labeled image (an atlas) is registered onto the case's image (affine, then
optionally a deformable demons step), its true label map is carried along, and the atlases' warped labels are
averaged into a per-voxel probability of each class (multi-atlas label fusion by equal-weight voting). An
atlas is wrong in other places than the network (it knows nothing of texture, only of shape and position
relative to the image's intensities), so it can tell apart proposals that the network's own members agree on
(measured on Hippocampus: 5 atlases alone reach 0.83 mean Dice against the expert labels, BENCHMARKS.md).

Score of proposal k = mean over foreground classes c of the soft Dice 2 sum(m_kc p_c) / (sum m_kc + sum p_c),
m_kc the proposal's class-c mask and p_c the fused atlas probability (`soft_dice`). All proposals of a case share p, so
the ranking is decided where they differ.

Space: nnU-Net preprocesses every case of a configuration to one spacing, so images are registered in voxel
units. Intensities: the preprocessed (normalised) images, compared by correlation (affine) and after matching
the atlas's histogram to the case's (demons, which assumes equal intensities).

Cost: `fit` keeps up to `max_atlases` labeled images and label maps (in the fitted state, pickled beside the
proposal store: a few MB for small structures such as Hippocampus, large for whole-body CT). Scoring registers
every kept atlas onto the case once: about 1 s per atlas for a 40 x 56 x 40 volume on one CPU core, more for
large volumes; no model, no GPU. SimpleITK does the registration.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from nnunet_rndpo.segmentation_metrics import soft_dice

from .base import Judge, JudgeError, JudgeInput

REGISTRATIONS = ("affine", "deformable")


class AtlasJudge(Judge):
    """Score = mean per-class soft Dice of the proposal against the labeled cases' label maps, registered onto
    the case's image and fused by voting (module docstring).

    registration: "affine", or "deformable" (affine then demons); max_atlases: how many labeled cases to keep
    (evenly spread over them in case-id order); channel: which image channel to register; demons_iterations and
    demons_smoothing: the deformable step's iterations and the Gaussian smoothing (voxels) of its field.
    """

    name = "atlas"
    fit_reads_proposals = False  # fit reads the labeled images and true label maps only
    fit_reads_images = True
    gives_voxel_probabilities = True  # the fused atlas labels

    def __init__(
        self,
        registration: str = "deformable",
        max_atlases: int = 10,
        channel: int = 0,
        demons_iterations: int = 50,
        demons_smoothing: float = 1.5,
    ) -> None:
        if registration not in REGISTRATIONS:
            raise JudgeError(f"atlas option 'registration' must be one of {REGISTRATIONS}, got {registration!r}")
        if int(max_atlases) < 1:
            raise JudgeError(f"atlas option 'max_atlases' must be >= 1, got {max_atlases}")
        if int(channel) < 0:
            raise JudgeError(f"atlas option 'channel' must be >= 0, got {channel}")
        if int(demons_iterations) < 1 or not float(demons_smoothing) > 0:
            raise JudgeError(
                f"atlas options 'demons_iterations' (>= 1) and 'demons_smoothing' (> 0): got {demons_iterations}, "
                f"{demons_smoothing}"
            )
        self.registration = registration
        self.max_atlases = int(max_atlases)
        self.channel = int(channel)
        self.demons_iterations = int(demons_iterations)
        self.demons_smoothing = float(demons_smoothing)
        self.labels: tuple[int, ...] | None = None
        self.atlases: list[tuple[str, np.ndarray, np.ndarray]] = []  # (case id, image, label map)

    def options(self) -> dict[str, Any]:
        return {
            "registration": self.registration,
            "max_atlases": self.max_atlases,
            "channel": self.channel,
            "demons_iterations": self.demons_iterations,
            "demons_smoothing": self.demons_smoothing,
        }

    def fitted_state(self) -> dict[str, Any]:
        if self.labels is None:
            return {}
        return {"labels": list(self.labels), "atlases": list(self.atlases)}

    def load_fitted_state(self, fitted: dict[str, Any]) -> None:
        if not fitted:
            return
        self.labels = tuple(int(label) for label in fitted["labels"])
        self.atlases = [(str(c), np.asarray(image), np.asarray(labels)) for c, image, labels in fitted["atlases"]]

    def describe(self) -> str:
        if self.labels is None:
            return f"{super().describe()}, not fitted"
        return f"{super().describe()}, {len(self.atlases)} atlases ({', '.join(c for c, _, _ in self.atlases)})"

    def fit(self, labeled_cases: Sequence[JudgeInput]) -> None:
        """Keep up to `max_atlases` labeled cases (image channel and true label map), evenly spread in case-id order."""
        cases = sorted(labeled_cases, key=lambda case: case.case_id)
        if not cases:
            raise JudgeError("atlas judge: fit needs at least one labeled case, got none")
        labels = cases[0].labels
        for case in cases:
            where = f"atlas judge: labeled case {case.case_id!r}"
            if case.true_labels is None or case.image is None:
                missing = "image" if case.image is None else "true labels"
                raise JudgeError(f"{where} needs its image and true labels; it has no {missing}")
            if case.labels != labels:
                raise JudgeError(f"{where} has labels {case.labels}, the first case had {labels}")
            if case.image.shape[0] <= self.channel:
                raise JudgeError(f"{where} has {case.image.shape[0]} channels, option 'channel' is {self.channel}")
        kept = np.unique(np.linspace(0, len(cases) - 1, min(self.max_atlases, len(cases))).round().astype(int))
        self.labels = labels
        self.atlases = [
            (cases[i].case_id, cases[i].image[self.channel].astype(np.float32), cases[i].true_labels.astype(np.uint8))
            for i in kept
        ]

    def score(self, case: JudgeInput) -> np.ndarray:
        return self.score_with_voxels(case)[0]

    def score_with_voxels(self, case: JudgeInput) -> tuple[np.ndarray, np.ndarray]:
        """The scores and the fused atlas labels as (max label + 1, *spatial) class probabilities (channel index =
        label value, background = the atlases that put the voxel in no judged class)."""
        if self.labels is None:
            raise JudgeError("atlas judge is not fitted: call fit() on labeled cases (or load a fitted judge) first")
        if case.labels != self.labels:
            raise JudgeError(f"case {case.case_id!r} has labels {case.labels}, atlases have {self.labels}")
        if case.image is None or case.image.shape[0] <= self.channel:
            raise JudgeError(f"atlas judge needs image channel {self.channel} of case {case.case_id!r}")
        probabilities = fused_atlas_probabilities(
            case.image[self.channel],
            [(image, labels) for _, image, labels in self.atlases],
            self.labels,
            deformable=self.registration == "deformable",
            demons_iterations=self.demons_iterations,
            demons_smoothing=self.demons_smoothing,
        )
        by_label = np.zeros((max(self.labels) + 1, *probabilities.shape[1:]), dtype=np.float32)
        by_label[list(self.labels)] = probabilities
        by_label[0] = np.clip(1.0 - probabilities.sum(axis=0), 0.0, 1.0)
        return soft_dice_scores(case.proposals, probabilities, self.labels), by_label


def soft_dice_scores(proposals: np.ndarray, probabilities: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """(K,) mean over classes of each proposal's `soft_dice` against the class's probability map.

    proposals: (K, *spatial) label maps; probabilities: (len(labels), *spatial), row i for labels[i]."""
    per_class = [
        [soft_dice(proposal == label, probabilities[row]) for row, label in enumerate(labels)] for proposal in proposals
    ]
    return np.asarray(per_class, dtype=np.float64).mean(axis=1)


def fused_atlas_probabilities(
    image: np.ndarray,
    atlases: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: Sequence[int],
    *,
    deformable: bool = True,
    demons_iterations: int = 50,
    demons_smoothing: float = 1.5,
) -> np.ndarray:
    """(len(labels), *image.shape): the fraction of atlases that put each voxel in each class, after registering
    each atlas (image, label map) onto `image` (3D arrays, voxel units) and warping its one-hot labels linearly."""
    import SimpleITK as sitk

    fixed = _as_image(image)
    probabilities = np.zeros((len(labels), *image.shape), dtype=np.float64)
    for atlas_image, atlas_labels in atlases:
        moving = _as_image(atlas_image)
        transform = register_atlas(fixed, moving, deformable, demons_iterations, demons_smoothing)
        for row, label in enumerate(labels):
            one_hot = _as_image((atlas_labels == label).astype(np.float32))
            warped = sitk.Resample(one_hot, fixed, transform, sitk.sitkLinear, 0.0)
            probabilities[row] += sitk.GetArrayFromImage(warped)
    return probabilities / max(len(atlases), 1)


def register_atlas(fixed, moving, deformable: bool, demons_iterations: int, demons_smoothing: float):
    """The transform that maps `fixed` voxels into `moving` (SimpleITK images): affine by correlation from the
    centres' alignment, then, if `deformable`, a symmetric-forces demons field on the histogram-matched atlas."""
    import SimpleITK as sitk

    start = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 200)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(start, inPlace=False)
    affine = method.Execute(fixed, moving)
    if not deformable:
        return affine
    aligned = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
    aligned = sitk.HistogramMatching(aligned, fixed, 128, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(demons_iterations)
    demons.SetStandardDeviations(demons_smoothing)
    field = demons.Execute(fixed, aligned)
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))])


def _as_image(array: np.ndarray):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((1.0,) * image.GetDimension())
    return image
