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

Where it registers (`crop_margin`): on a crop of the case around the union of all K proposals' foreground, grown by
`crop_margin` voxels, and on a crop of each atlas around its own labels' foreground, grown likewise. Outside the
case's crop every proposal is background, so the proposals agree there and the fused probabilities are taken as
background: each proposal's overlap term is unchanged, only the atlas mass that lies outside every proposal (and
the margin) leaves the denominators, the same amount for every proposal. With a margin that holds the atlases'
warped labels the scores equal those of the whole volume up to the registration itself, which converges a little
differently on a smaller field of view (tests/test_judge_atlas.py bounds it). `crop_margin=None` registers the whole
volumes. Where a (cropped) volume has more than `max_registration_voxels` voxels, registration runs on a copy shrunk
by an integer factor per axis (bins averaged) and the transform, in physical units, is applied at the crop's full
resolution. Each atlas's labels are resampled once, linearly, as one float32 one-hot vector image: the same
interpolation as resampling each class on its own (scores equal to 1e-9 in the tests); nearest-neighbour resampling
of the label map, also one call, moved scores by up to 0.05 there, so it is not offered.

Space: nnU-Net preprocesses every case of a configuration to one spacing, so images are registered in voxel
units. Intensities: the preprocessed (normalised) images, compared by correlation (affine) and after matching
the atlas's histogram to the case's (demons, which assumes equal intensities).

Cost: `fit` keeps up to `max_atlases` labeled images and label maps, cropped around their labels when `crop_margin`
is set (the fitted state, pickled beside the proposal store and sent to worker processes). Scoring registers every
kept atlas onto the case once: about 1 s per atlas for a 40 x 56 x 40 volume on one CPU core, bounded for large
volumes by the crop and `max_registration_voxels` (BENCHMARKS.md); no model, no GPU. SimpleITK does the
registration, on its global thread count: in worker processes that each score cases, call
`set_registration_threads(1)` once per worker.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from nnunet_rndpo.segmentation_metrics import soft_dice

from .base import Judge, JudgeError, JudgeInput

REGISTRATIONS = ("affine", "deformable")
# below this a registration has too few voxels for the affine's two-level pyramid to mean anything
MIN_REGISTRATION_VOXELS = 16**3


class AtlasJudge(Judge):
    """Score = mean per-class soft Dice of the proposal against the labeled cases' label maps, registered onto
    the case's image and fused by voting (module docstring).

    registration: "affine", or "deformable" (affine then demons); max_atlases: how many labeled cases to keep
    (evenly spread over them in case-id order); channel: which image channel to register; demons_iterations and
    demons_smoothing: the deformable step's iterations and the Gaussian smoothing of its field (voxels of the
    full-resolution volume, also when registering a shrunk copy);
    crop_margin: voxels kept around the proposals' (and each atlas's labels') foreground, None for the whole
    volume; max_registration_voxels: above it a crop is registered on a shrunk copy, None never shrinks.
    """

    name = "atlas"
    gives_voxel_probabilities = True  # the fused atlas labels

    def __init__(
        self,
        registration: str = "deformable",
        max_atlases: int = 10,
        channel: int = 0,
        demons_iterations: int = 50,
        demons_smoothing: float = 1.5,
        crop_margin: Optional[int] = 16,
        max_registration_voxels: Optional[int] = 1_000_000,
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
        if crop_margin is not None and not (_is_whole_number(crop_margin) and crop_margin >= 0):
            raise JudgeError(
                f"atlas option 'crop_margin' must be a number of voxels >= 0, or None for the whole volume; "
                f"got {crop_margin!r}"
            )
        if max_registration_voxels is not None and not (
            _is_whole_number(max_registration_voxels) and max_registration_voxels >= MIN_REGISTRATION_VOXELS
        ):
            raise JudgeError(
                f"atlas option 'max_registration_voxels' must be a number of voxels >= {MIN_REGISTRATION_VOXELS} "
                f"(16^3), or None never to shrink; got {max_registration_voxels!r}"
            )
        self.registration = registration
        self.max_atlases = int(max_atlases)
        self.channel = int(channel)
        self.demons_iterations = int(demons_iterations)
        self.demons_smoothing = float(demons_smoothing)
        self.crop_margin = None if crop_margin is None else int(crop_margin)
        self.max_registration_voxels = None if max_registration_voxels is None else int(max_registration_voxels)
        self.labels: tuple[int, ...] | None = None
        # (case id, image, label map, origin): the atlas cropped around its labels when crop_margin is set, origin
        # = where the crop starts in the labeled case's volume (voxels)
        self.atlases: list[tuple[str, np.ndarray, np.ndarray, tuple[int, ...]]] = []

    def options(self) -> dict[str, Any]:
        return {
            "registration": self.registration,
            "max_atlases": self.max_atlases,
            "channel": self.channel,
            "demons_iterations": self.demons_iterations,
            "demons_smoothing": self.demons_smoothing,
            "crop_margin": self.crop_margin,
            "max_registration_voxels": self.max_registration_voxels,
        }

    def fitted_state(self) -> dict[str, Any]:
        if self.labels is None:
            return {}
        return {"labels": list(self.labels), "atlases": list(self.atlases)}

    def load_fitted_state(self, fitted: dict[str, Any]) -> None:
        if not fitted:
            return
        self.labels = tuple(int(label) for label in fitted["labels"])
        # states written before atlases were cropped hold (case id, image, label map): crop them now
        self.atlases = [
            self._kept_atlas(str(entry[0]), np.asarray(entry[1]), np.asarray(entry[2]))
            if len(entry) == 3
            else (str(entry[0]), np.asarray(entry[1]), np.asarray(entry[2]), tuple(int(o) for o in entry[3]))
            for entry in fitted["atlases"]
        ]

    def describe(self) -> str:
        if self.labels is None:
            return f"{super().describe()}, not fitted"
        return f"{super().describe()}, {len(self.atlases)} atlases ({', '.join(a[0] for a in self.atlases)})"

    def fit_from(self, examples) -> None:
        """Learns from the labeled training cases' images and true label maps (no model prediction needed)."""
        self.fit(examples.true_label_maps(with_images=True))

    def fit(self, labeled_cases: Sequence[JudgeInput]) -> None:
        """Keep up to `max_atlases` labeled cases (image channel and true label map), evenly spread in case-id
        order, each cropped around its labels' foreground when `crop_margin` is set."""
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
            self._kept_atlas(cases[i].case_id, cases[i].image[self.channel], cases[i].true_labels) for i in kept
        ]

    def _kept_atlas(self, case_id: str, image: np.ndarray, label_map: np.ndarray):
        """(case id, image, label map, origin) cropped around the judged labels (the whole volume if it has none)."""
        box = foreground_box(np.isin(label_map, self.labels), self.crop_margin)
        box = box if box is not None else tuple(slice(0, size) for size in label_map.shape)
        origin = tuple(axis.start for axis in box)
        return (
            case_id,
            np.ascontiguousarray(image[box], np.float32),
            np.ascontiguousarray(label_map[box], np.uint8),
            origin,
        )

    def score(self, case: JudgeInput) -> np.ndarray:
        return self._fused(case)[0]

    def score_with_voxels(self, case: JudgeInput) -> tuple[np.ndarray, np.ndarray]:
        """The scores and the fused atlas labels as (max label + 1, *spatial) class probabilities (channel index =
        label value, background = the atlases that put the voxel in no judged class; outside the crop: background)."""
        scores, box, probabilities = self._fused(case)
        by_label = np.zeros((max(self.labels) + 1, *case.spatial_shape), dtype=np.float32)
        by_label[0] = 1.0
        if box is not None:
            for row, label in enumerate(self.labels):
                by_label[(label, *box)] = probabilities[row]
            by_label[(0, *box)] = np.clip(1.0 - probabilities.sum(axis=0), 0.0, 1.0)
        return scores, by_label

    def _fused(self, case: JudgeInput) -> tuple[np.ndarray, Optional[tuple[slice, ...]], Optional[np.ndarray]]:
        """(scores, the crop, the fused probabilities (len(labels), *crop)); crop None when no proposal has any
        foreground: every proposal is then the same empty mask, scored 0 (a tie) without registering."""
        if self.labels is None:
            raise JudgeError("atlas judge is not fitted: call fit() on labeled cases (or load a fitted judge) first")
        if case.labels != self.labels:
            raise JudgeError(f"case {case.case_id!r} has labels {case.labels}, atlases have {self.labels}")
        if case.image is None or case.image.shape[0] <= self.channel:
            raise JudgeError(f"atlas judge needs image channel {self.channel} of case {case.case_id!r}")
        box = foreground_box(proposals_union(case.proposals), self.crop_margin)
        if box is None:
            return np.zeros(case.proposal_count, dtype=np.float64), None, None
        probabilities = fused_atlas_probabilities(
            case.image[self.channel][box],
            [(image, labels, origin) for _, image, labels, origin in self.atlases],
            self.labels,
            deformable=self.registration == "deformable",
            demons_iterations=self.demons_iterations,
            demons_smoothing=self.demons_smoothing,
            max_registration_voxels=self.max_registration_voxels,
            origin=tuple(axis.start for axis in box),
        )
        # outside the crop every proposal is background and the fused probabilities are taken as background
        scores = soft_dice_scores(case.proposals[(slice(None), *box)], probabilities, self.labels)
        return scores, box, probabilities


def set_registration_threads(count: int) -> int:
    """Set SimpleITK's global thread count (registration and resampling) of this process; returns the previous
    one. Worker processes that score cases in parallel call it with 1 once each."""
    import SimpleITK as sitk

    if not _is_whole_number(count) or count < 1:
        raise ValueError(f"registration threads must be a whole number >= 1, got {count!r}")
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(count))
    return previous


def proposals_union(proposals: np.ndarray) -> np.ndarray:
    """(*spatial) bool: where any of the (K, *spatial) proposals has foreground (one proposal at a time)."""
    union = np.zeros(proposals.shape[1:], dtype=bool)
    for proposal in proposals:
        union |= proposal != 0
    return union


def foreground_box(mask: np.ndarray, margin: Optional[int]) -> Optional[tuple[slice, ...]]:
    """Slices of the bounding box of `mask`'s True voxels grown by `margin` voxels per side and clipped to the
    volume; the whole volume when `margin` is None; None when `mask` is empty (and margin is not None)."""
    if margin is None:
        return tuple(slice(0, size) for size in mask.shape)
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def shrink_factors(shape: Sequence[int], max_voxels: Optional[int]) -> tuple[int, ...]:
    """Integer shrink factors per axis so that the shrunk volume (floor(size / factor) per axis) holds at most
    `max_voxels` voxels: the axis with the most voxels per factor grows first. All 1 when it fits (or None)."""
    factors = [1] * len(shape)
    if max_voxels is None:
        return tuple(factors)

    def shrunk_voxels() -> int:
        return math.prod(max(size // factor, 1) for size, factor in zip(shape, factors))

    while shrunk_voxels() > max_voxels:
        axis = max(range(len(shape)), key=lambda a: (shape[a] / factors[a], -a))
        if shape[axis] // (factors[axis] + 1) < 1:
            break
        factors[axis] += 1
    return tuple(factors)


def soft_dice_scores(proposals: np.ndarray, probabilities: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """(K,) mean over classes of each proposal's `soft_dice` against the class's probability map.

    proposals: (K, *spatial) label maps; probabilities: (len(labels), *spatial), row i for labels[i]."""
    per_class = [
        [soft_dice(proposal == label, probabilities[row]) for row, label in enumerate(labels)] for proposal in proposals
    ]
    return np.asarray(per_class, dtype=np.float64).mean(axis=1)


def fused_atlas_probabilities(
    image: np.ndarray,
    atlases: Sequence[tuple],
    labels: Sequence[int],
    *,
    deformable: bool = True,
    demons_iterations: int = 50,
    demons_smoothing: float = 1.5,
    max_registration_voxels: Optional[int] = None,
    origin: Sequence[int] | None = None,
) -> np.ndarray:
    """(len(labels), *image.shape) float32: the fraction of atlases that put each voxel in each class, after
    registering each atlas onto `image` (3D arrays, voxel units) and resampling its labels once.

    atlases: (image, label map) or (image, label map, origin); origin: where an array starts in its case's volume
    (voxels; zeros when absent), which places crops in one physical space; max_registration_voxels: above it,
    register shrunk copies (`shrink_factors`)."""
    fixed = _as_image(image, origin)
    fixed_for_registration = _shrunk(fixed, image.shape, max_registration_voxels)
    probabilities = np.zeros((len(labels), *image.shape), dtype=np.float32)
    for atlas in atlases:
        atlas_image, atlas_labels = atlas[0], atlas[1]
        moving = _as_image(atlas_image, atlas[2] if len(atlas) > 2 else None)
        transform = register_atlas(
            fixed_for_registration,
            _shrunk(moving, atlas_image.shape, max_registration_voxels),
            deformable,
            demons_iterations,
            demons_smoothing,
        )
        probabilities += _warped_one_hot(atlas_labels, moving, fixed, transform, labels)
    return probabilities / max(len(atlases), 1)


def _warped_one_hot(atlas_labels, moving, fixed, transform, labels) -> np.ndarray:
    """(len(labels), *fixed) float32: the atlas's one-hot labels on the fixed grid, linearly, in one resampling."""
    import SimpleITK as sitk

    # channels last: SimpleITK's vector pixels
    one_hot = np.stack([atlas_labels == label for label in labels], axis=-1).astype(np.float32)
    vector_image = sitk.GetImageFromArray(one_hot, isVector=True)
    vector_image.CopyInformation(moving)
    warped = sitk.Resample(vector_image, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
    return np.moveaxis(sitk.GetArrayFromImage(warped), -1, 0)


def register_atlas(fixed, moving, deformable: bool, demons_iterations: int, demons_smoothing: float):
    """The transform that maps `fixed` points into `moving` (SimpleITK images, physical units): affine by
    correlation from the centres' alignment, then, if `deformable`, a symmetric-forces demons field on the
    histogram-matched atlas (on `fixed`'s grid: shrunk images give a coarse field, applied anywhere)."""
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
    # in physical units, i.e. voxels of the full-resolution volume, also on a shrunk copy (its own voxels smoothed
    # the field too much there: benchmarks/atlas_check.py, BENCHMARKS.md)
    demons.SetStandardDeviations(demons_smoothing)
    field = demons.Execute(fixed, aligned)
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))])


def _shrunk(image, shape: Sequence[int], max_voxels: Optional[int]):
    """`image` itself, or a copy shrunk by `shrink_factors` (bins averaged; same physical extent)."""
    import SimpleITK as sitk

    factors = shrink_factors(shape, max_voxels)
    if all(factor == 1 for factor in factors):
        return image
    return sitk.BinShrink(image, [int(f) for f in reversed(factors)])  # SimpleITK orders axes x, y, z


def _as_image(array: np.ndarray, origin: Sequence[int] | None = None):
    """A 1-mm SimpleITK image of a (z, y, x) array placed at `origin` (voxels, same order)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((1.0,) * image.GetDimension())
    if origin is not None:
        image.SetOrigin(tuple(float(o) for o in reversed(tuple(origin))))
    return image


def _is_whole_number(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
