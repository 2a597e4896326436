"""A small synthetic 3D segmentation dataset in nnU-Net v2 raw layout, for tests, the demo and benchmarks.

Each case holds a deformed ellipsoid "organ" (label 1) with a smaller "lesion" (label 2) that sits on the organ's
surface, half inside it. The image carries the ambiguities that make segmentation judges disagree:

- blurred boundaries (Gaussian blur of the intensity model, random width per case),
- a low-contrast boundary between organ and lesion (the lesion is only slightly brighter),
- a smooth multiplicative intensity bias field,
- additive Gaussian noise.

Layout written under `raw_root/DatasetXXX_Name/`:

    dataset.json
    imagesTr/synth_000_0000.nii.gz    labelsTr/synth_000.nii.gz          labeled training cases
    imagesUnlabeled/synth_010_0000.nii.gz                                unlabeled pool (nnU-Net naming, no labels)
    labelsUnlabeled/synth_010.nii.gz                                     the pool's TRUE labels: for oracle judges
                                                                         and research only, never for training
    imagesTs/synth_014_0000.nii.gz    labelsTs/synth_014.nii.gz          held-out test cases and their truth

Case names run on across the three splits (labeled first, then unlabeled, then test), so a name is unique in the
dataset. Every case is a pure function of (seed, case index, shape): the same call writes identical files.
nnU-Net reads only dataset.json, imagesTr and labelsTr; the extra folders do not disturb it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_rndpo.atomic import atomic_path, save_json

LABELS = {"background": 0, "organ": 1, "lesion": 2}
FILE_ENDING = ".nii.gz"
CASE_PREFIX = "synth"

# Intensity model (before bias field and noise), in arbitrary MRI-like units.
BACKGROUND_INTENSITY = 200.0
ORGAN_INTENSITY = 600.0
LESION_CONTRAST_RANGE = (0.12, 0.30)  # lesion = organ * (1 + contrast): a deliberately faint class boundary
BLUR_SIGMA_RANGE = (0.7, 1.5)  # voxels
BIAS_FIELD_STRENGTH = 0.25  # multiplicative field exp(+-0.25) at most
NOISE_FRACTION_RANGE = (0.04, 0.09)  # noise standard deviation relative to the organ intensity
MIN_LESION_VOXELS = 30


@dataclass(frozen=True)
class SyntheticCase:
    image: np.ndarray  # float32, (z, y, x)
    label: np.ndarray  # uint8, (z, y, x), values in LABELS


def case_name(index: int) -> str:
    return f"{CASE_PREFIX}_{index:03d}"


def make_case(seed: int, index: int, shape: tuple[int, int, int] = (40, 40, 40)) -> SyntheticCase:
    """One case, a deterministic function of (seed, index, shape)."""
    rng = np.random.default_rng([seed, index])
    shape = tuple(int(s) for s in shape)
    if min(shape) < 16:
        raise ValueError(f"shape {shape} is too small for an organ and a lesion (min 16 per axis)")
    # A rare draw leaves the lesion almost entirely outside the volume or hidden; redraw from the same stream.
    for _ in range(20):
        label = _draw_label(rng, shape)
        if np.count_nonzero(label == 2) >= MIN_LESION_VOXELS and np.count_nonzero(label == 1) >= MIN_LESION_VOXELS:
            break
    else:  # pragma: no cover - would need 20 consecutive degenerate draws
        raise RuntimeError(f"could not draw a case with both classes for seed {seed}, index {index}")
    image = _draw_image(rng, label)
    return SyntheticCase(image=image, label=label)


def make_synthetic_dataset(
    raw_root: str | os.PathLike,
    dataset_id: int = 901,
    name: str = "RNDPOSynthetic",
    num_labeled: int = 10,
    num_unlabeled: int = 4,
    num_test: int = 3,
    shape: tuple[int, int, int] = (40, 40, 40),
    seed: int = 0,
) -> Path:
    """Write the dataset under `raw_root/Dataset{dataset_id:03d}_{name}` and return that folder.

    Files are overwritten (each atomically), and case files of an earlier call that this call does not write are
    removed from the six case folders, so that nnU-Net never sees a stale case: a rerun with the same arguments
    leaves the folder as it was.
    """
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids run from 1 to 999, got {dataset_id}")
    if num_labeled < 1:
        raise ValueError("nnU-Net needs at least one labeled training case")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    splits = (
        ("imagesTr", "labelsTr", num_labeled),
        ("imagesUnlabeled", "labelsUnlabeled", num_unlabeled),
        ("imagesTs", "labelsTs", num_test),
    )
    for images_folder, labels_folder, _ in splits:  # present even when empty, for consumers that list them
        (folder / images_folder).mkdir(parents=True, exist_ok=True)
        (folder / labels_folder).mkdir(parents=True, exist_ok=True)
    index = 0
    written: set[Path] = set()
    for images_folder, labels_folder, count in splits:
        for _ in range(count):
            case = make_case(seed, index, shape)
            for array, path in (
                (case.image, folder / images_folder / f"{case_name(index)}_0000{FILE_ENDING}"),
                (case.label, folder / labels_folder / f"{case_name(index)}{FILE_ENDING}"),
            ):
                _write_nifti(array, path)
                written.add(path)
            index += 1
    for images_folder, labels_folder, _ in splits:
        for split_folder in (folder / images_folder, folder / labels_folder):
            for stale in split_folder.glob(f"*{FILE_ENDING}"):
                if stale not in written:
                    stale.unlink()
    save_json(
        {
            "name": name,
            "description": "Synthetic organ (1) with a faint attached lesion (2): blurred boundaries, bias field, "
            "noise. imagesUnlabeled is the unlabeled pool; labelsUnlabeled holds its true labels for "
            "oracle/research use only; imagesTs/labelsTs are held out.",
            "channel_names": {"0": "MRI"},
            "labels": dict(LABELS),
            "numTraining": num_labeled,
            "numUnlabeled": num_unlabeled,
            "numTest": num_test,
            "file_ending": FILE_ENDING,
            "synthetic": {"seed": seed, "shape": list(shape)},
        },
        folder / "dataset.json",
    )
    return folder


def _draw_label(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))  # (3, *shape)
    size = np.asarray(shape, dtype=np.float32)

    # Organ: a rotated ellipsoid whose surface is pushed in and out by a smooth random field.
    radii = rng.uniform(0.17, 0.27, size=3) * size
    margin = radii.max() + 3.0
    center = np.array([rng.uniform(margin, s - margin) if s > 2 * margin else s / 2 for s in size], dtype=np.float32)
    rotation = _random_rotation(rng)
    local = np.tensordot(rotation.T, grid - center[:, None, None, None], axes=1)  # coordinates in the organ frame
    radius_norm = np.sqrt(sum((local[a] / radii[a]) ** 2 for a in range(3)))
    organ = radius_norm * (1.0 + _smooth_field(rng, shape, amplitude=0.18)) <= 1.0

    # Lesion: a smaller ellipsoid centred on the organ's surface in a random direction.
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    surface_point = center + rotation @ (direction * radii)
    lesion_radii = rng.uniform(0.30, 0.50, size=3) * radii.min() + 1.5
    lesion_rotation = _random_rotation(rng)
    lesion_local = np.tensordot(lesion_rotation.T, grid - surface_point[:, None, None, None], axes=1)
    lesion_norm = np.sqrt(sum((lesion_local[a] / lesion_radii[a]) ** 2 for a in range(3)))
    lesion = lesion_norm * (1.0 + _smooth_field(rng, shape, amplitude=0.12)) <= 1.0

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    return label


def _draw_image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    shape = label.shape
    contrast = rng.uniform(*LESION_CONTRAST_RANGE)
    intensity = np.full(shape, BACKGROUND_INTENSITY, dtype=np.float32)
    intensity[label == 1] = ORGAN_INTENSITY
    intensity[label == 2] = ORGAN_INTENSITY * (1.0 + contrast)
    # Mild tissue texture so that the organ is not a flat plateau.
    intensity *= 1.0 + _smooth_field(rng, shape, amplitude=0.05, control_points=6)
    intensity = ndimage.gaussian_filter(intensity, sigma=rng.uniform(*BLUR_SIGMA_RANGE))
    intensity *= np.exp(_smooth_field(rng, shape, amplitude=BIAS_FIELD_STRENGTH, control_points=3))
    noise_sd = rng.uniform(*NOISE_FRACTION_RANGE) * ORGAN_INTENSITY
    intensity += rng.normal(0.0, noise_sd, size=shape).astype(np.float32)
    return intensity.astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], amplitude: float, control_points: int = 4
) -> np.ndarray:
    """A smooth random field in [-amplitude, amplitude]: cubic upsampling of a few random control values."""
    coarse = rng.uniform(-1.0, 1.0, size=(control_points,) * len(shape))
    zoom = [s / control_points for s in shape]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    field = field[tuple(slice(0, s) for s in shape)]
    return (amplitude * np.clip(field, -1.0, 1.0)).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix, sign-corrected)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _write_nifti(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((0.0, 0.0, 0.0))
    # SimpleITK picks the format from the file name, so the temporary name must end in .nii.gz too.
    with atomic_path(path) as temp:
        nifti_temp = temp.with_name(temp.name + FILE_ENDING)
        try:
            sitk.WriteImage(image, str(nifti_temp), useCompression=True)
            os.replace(nifti_temp, temp)
        finally:
            nifti_temp.unlink(missing_ok=True)
