"""Shape and uncertainty measurements of one binary mask, shared by the label-free judges.

Connected components use full connectivity (voxels touching at a corner belong together), so a mask is
called fragmented only when its pieces really are apart.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Surface voxels / volume^(2/3) of a digital ball: 4 pi r^2 / (4/3 pi r^3)^(2/3) ~ 4.84, the smallest
# (smoothest) value a solid can reach; used when no labeled shapes are known.
BALL_ROUGHNESS = 4.84


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the mask's connected components, largest first (empty array for an empty mask)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    component_map, component_count = ndimage.label(mask, structure=structure)
    if component_count == 0:
        return np.zeros(0, dtype=np.int64)
    sizes = np.bincount(component_map.ravel())[1:]
    return np.sort(sizes)[::-1]


def surface_voxels(mask: np.ndarray) -> int:
    """Voxels of the mask with a face neighbour outside it (the volume's border counts as outside)."""
    eroded = ndimage.binary_erosion(mask, border_value=0)
    return int(mask.sum() - eroded.sum())


def roughness(mask: np.ndarray) -> float:
    """Surface voxels / volume^(2/3): scale-free, ~4.84 for a ball, larger for jagged or fragmented masks.

    0.0 for an empty mask."""
    volume = int(mask.sum())
    if volume == 0:
        return 0.0
    return surface_voxels(mask) / volume ** (2.0 / 3.0)


def boundary_band(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Voxels within `width` face steps of the mask's boundary, on both sides."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    dilated = ndimage.binary_dilation(mask, iterations=width)
    eroded = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return dilated & ~eroded


def surrounding_ring(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Voxels outside the mask within `width` face steps of it."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    return ndimage.binary_dilation(mask, iterations=width) & ~mask


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per-voxel predictive entropy divided by log(num_classes): 0 = certain, 1 = uniform."""
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    probabilities = probabilities / probabilities.sum(axis=0, keepdims=True)
    entropy = -(probabilities * np.log(probabilities)).sum(axis=0)
    return entropy / np.log(probabilities.shape[0])


def mean_inside(values: np.ndarray, region: np.ndarray) -> float:
    """Mean of `values` over a boolean region; 0.0 when the region is empty."""
    return float(values[region].mean()) if region.any() else 0.0
