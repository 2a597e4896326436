"""K proposals for one preprocessed case, in memory that does not grow with K.

Padding, tiling and the Gaussian are nnU-Net's own (pad_nd_image, the predictor's slicers, compute_gaussian), so
proposals are voxel-aligned with nnU-Net's preprocessed data and its predictions.

Order of work (member-major): the members that take a network pass go through the case in sweeps; a sweep runs
one network's sliding window once for a group of its members (each tile cut once, the group's rows flipped and
passed through the network together as one batch, flipped back, accumulated with nnU-Net's Gaussian weights into
one float32 (C, *padded) sum per member). When a sweep ends, its members' logits are final: each becomes its
label map (uint8) and its softmax is added to a running sum of the mean over every pass, then the sums are
dropped. What stays for the whole case is one uint8 label map per member and one (C, *) float32 mean, besides
the image: a case never holds every member's logits at once.

Why groups and not one member per sweep: on the CPU a batch of one row takes another convolution path than a
batch of several (oneDNN), whose outputs differ in the last bits, so a member's logits depend on the batch it went
through. A group of `members_per_batch` members is exactly the batch of the engine that kept every member at once,
so its proposals are unchanged to the voxel; a case whose group of accumulators would exceed
`accumulator_memory_gib`, or a patch whose batch would exceed `max_batch_voxels` (one 128^3 patch), takes fewer
members per sweep (one at least): bounded memory, and labels that may differ from a larger group's at near-ties
only (tests/test_proposals.py checks both).

Derived members (no pass) are made as soon as what they read is final: threshold and temperature members read the
plain pass's logits (first sweep), the ensemble reads the mean over every pass (last sweep).

Dropout: each dropout member draws from a generator of its own, seeded by the case seed and its member index, in
tile order; its draws do not depend on which members share its batch or sweep (DROPOUT_DRAWS, in the manifest).

Precision: nnU-Net sums a tile's logits in float16; these sums are float32, as before this engine held every
member at once: a float16 sum changes labels at near-ties, and proposals are meant to be reproducible.

On a GPU (as nnU-Net's predictor): a case runs with its sums on the device; if the device runs out of memory the
cache is freed and the case is redone with the sums on the CPU (the network stays on the device), logged once.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from nnunet_rndpo.proposals.dropout import dropout_hooks
from nnunet_rndpo.proposals.members import ProposalMember
from nnunet_rndpo.proposals.plan import ProposalSettings, plan_members
from nnunet_rndpo.proposals.sources import SOURCES, needs_forward

# How dropout members draw, recorded in the manifest of a store with dropout members: a store filled by an engine
# that drew otherwise (one generator per case, consumed in tile order by the whole batch) is not mixed with it.
DROPOUT_DRAWS = "one generator per member, seeded by (case seed, member index)"
# float32 (C, *padded) sums one sweep may hold: members_per_batch of them when they fit, else fewer.
DEFAULT_ACCUMULATOR_MEMORY_GIB = 2.0
# Voxels one network batch may hold: one 128^3 patch, about the largest of nnU-Net's default 3d_fullres plans. On
# such patches members pass one at a time, as nnU-Net's predictor passes its mirrors (8 members per sweep took 7.6x
# its peak memory at 160^3, benchmarks/bench_scale.py); small patches keep batches of members_per_batch.
DEFAULT_MAX_BATCH_VOXELS = 128**3
# Derived sources that read the mean over every pass; the others read the plain pass's logits.
DERIVED_FROM_THE_MEAN = frozenset({"ensemble"})
# A member's sums become logits, labels and probabilities slab by slab along the first spatial axis: one pass over
# its sums from memory instead of four, and small temporaries.
SLAB_VOXELS = 1 << 16
# A slab's voxel count is a multiple of this: torch's CPU softmax then computes every voxel of a slab in the same
# vector lanes as it would on the whole volume (a partial vector is rounded differently), so slabs change nothing.
SLAB_VOXEL_MULTIPLE = 64


@dataclass
class CaseProposals:
    proposals: np.ndarray  # (K, *spatial) uint8 label maps
    mean_probabilities: np.ndarray  # (C, *spatial) float16: softmax averaged over the network passes
    case_seed: int


class ProposalEngine:
    """Produces proposals from one or more networks of the same plans (network 0 is the base)."""

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        plans_manager,
        configuration_manager,
        label_manager,
        dataset_json: dict,
        settings: ProposalSettings,
        mirror_axes: Optional[Sequence[int]],
        device: torch.device | str = "cpu",
        accumulator_memory_gib: float = DEFAULT_ACCUMULATOR_MEMORY_GIB,
        max_batch_voxels: int = DEFAULT_MAX_BATCH_VOXELS,
        log: Callable[[str], None] = print,
    ):
        if label_manager.has_regions:
            raise ValueError(
                "region-based (sigmoid) datasets are not supported by the proposal engine yet: "
                "their masks are overlapping regions, not label maps"
            )
        if not accumulator_memory_gib > 0:
            raise ValueError(f"accumulator_memory_gib must be > 0, got {accumulator_memory_gib}")
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.networks = list(networks)
        self.settings = settings
        self.device = torch.device(device)
        self.accumulator_memory_bytes = int(accumulator_memory_gib * 2**30)
        self.max_batch_voxels = int(max_batch_voxels)
        self.log = log
        self.num_classes = label_manager.num_segmentation_heads
        self.patch_size = tuple(configuration_manager.patch_size)
        self.members = plan_members(
            settings, mirror_axes if mirror_axes is not None else tuple(range(len(self.patch_size)))
        )
        if max(m.network_index for m in self.members) >= len(self.networks):
            raise ValueError("a member needs an extra checkpoint that was not loaded")
        self._fell_back_to_cpu = False
        # nnU-Net's predictor supplies the tiling; we never call its averaging prediction.
        self._tiler = nnUNetPredictor(
            tile_step_size=settings.tile_step_size,
            use_gaussian=True,
            use_mirroring=False,
            perform_everything_on_device=self.device.type == "cuda",
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        self._tiler.manual_initialization(
            self.networks[0], plans_manager, configuration_manager, None, dataset_json, "nnUNetTrainer", mirror_axes
        )
        for network in self.networks:
            network.to(self.device).eval()

    @property
    def num_proposals(self) -> int:
        return len(self.members)

    def members_per_sweep(self, padded_shape: Sequence[int]) -> int:
        """How many members one sweep accumulates (and passes through the network as one batch) for a case padded to
        `padded_shape` (spatial): members_per_batch, fewer where their sums or their batch would not fit."""
        sums_fitting = self.accumulator_memory_bytes // (4 * self.num_classes * math.prod(padded_shape))
        batch_fitting = self.max_batch_voxels // math.prod(self.patch_size)
        return int(max(1, min(self.settings.members_per_batch, sums_fitting, batch_fitting)))

    def sweeps(self, members_per_sweep: int) -> list[tuple[int, list[tuple[int, ProposalMember]]]]:
        """(network index, [(member index, member), ...]) per sweep: each network's members that take a pass, in
        plan order, in groups of `members_per_sweep`. The plain member opens the first sweep."""
        by_network: dict[int, list[tuple[int, ProposalMember]]] = {}
        for index, member in enumerate(self.members):
            if needs_forward(member):
                by_network.setdefault(member.network_index, []).append((index, member))
        return [
            (network_index, group[start : start + members_per_sweep])
            for network_index, group in by_network.items()
            for start in range(0, len(group), members_per_sweep)
        ]

    def results_devices(self) -> tuple[torch.device, ...]:
        """Where a case's sums are tried, in order: on the device, then (a GPU out of memory) on the CPU."""
        return (self.device,) if self.device.type == "cpu" else (self.device, torch.device("cpu"))

    @torch.inference_mode()
    def generate(self, data: np.ndarray | torch.Tensor, case_seed: int) -> CaseProposals:
        """data: (C_in, *spatial) preprocessed image. Returns K label maps and the mean softmax."""
        from nnunetv2.utilities.helpers import empty_cache

        image = torch.as_tensor(np.asarray(data), dtype=torch.float32)
        if image.dim() != len(self.patch_size) + 1:
            raise ValueError(
                f"expected a (channels, *spatial) image of {len(self.patch_size)}D, got {tuple(image.shape)}"
            )
        *first_tries, last = self.results_devices()
        for results_device in first_tries:
            try:
                return self._generate(image, case_seed, results_device)
            except torch.OutOfMemoryError:
                pass  # retried after the except block, whose traceback still holds the failed try's tensors
            empty_cache(self.device)
            if not self._fell_back_to_cpu:
                self.log(
                    f"proposals: a case did not fit into {results_device} memory; such cases are redone with their "
                    "sums on the CPU (the network stays on the device)"
                )
                self._fell_back_to_cpu = True
        return self._generate(image, case_seed, last)

    def _generate(self, image: torch.Tensor, case_seed: int, results_device: torch.device) -> CaseProposals:
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        padded, revert_padding = pad_nd_image(image, self.patch_size, "constant", {"value": 0}, True, None)
        padded_shape = tuple(padded.shape[1:])
        crop = tuple(revert_padding[1:])
        slicers = self._tiler._internal_get_sliding_window_slicers(padded_shape)
        gaussian = compute_gaussian(
            self.patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10, device=results_device
        )
        padded = padded.to(results_device)
        weight = torch.zeros(padded_shape, dtype=torch.float32, device=results_device)
        for slicer in slicers:
            weight[slicer[1:]] += gaussian

        shape = tuple(weight[crop].shape)
        proposals = torch.empty((len(self.members), *shape), dtype=torch.uint8, device=results_device)
        probability_sum = torch.zeros((self.num_classes, *shape), dtype=torch.float32, device=results_device)
        passes = 0
        for network_index, group in self.sweeps(self.members_per_sweep(padded_shape)):
            logits = self._sweep(padded, slicers, gaussian, network_index, group, case_seed)
            logits = logits[(slice(None), slice(None), *crop)]
            _finish(logits, weight[crop], proposals, probability_sum, [member_index for member_index, _ in group])
            passes += len(group)
            if group[0][0] == 0:  # the plain pass (first of the first sweep): what threshold and temperature read
                self._derive(proposals, case_seed, plain_logits=logits[0], mean_probabilities=None)
            del logits
        mean_probabilities = probability_sum.div_(passes)
        self._derive(proposals, case_seed, plain_logits=None, mean_probabilities=mean_probabilities)
        return CaseProposals(proposals.cpu().numpy(), mean_probabilities.to(torch.float16).cpu().numpy(), case_seed)

    def _sweep(
        self,
        padded: torch.Tensor,
        slicers: list,
        gaussian: torch.Tensor,
        network_index: int,
        group: list[tuple[int, ProposalMember]],
        case_seed: int,
    ) -> torch.Tensor:
        """One sliding-window pass of one network for `group`: its members' Gaussian-weighted sums of logits,
        (G, C, *padded) float32, not yet divided by the sum of the weights."""
        network = self.networks[network_index]
        accumulated = torch.zeros(
            (len(group), self.num_classes, *padded.shape[1:]), dtype=torch.float32, device=padded.device
        )
        autocast = torch.autocast("cuda") if self.device.type == "cuda" else contextlib.nullcontext()
        with contextlib.ExitStack() as stack:
            if any(member.dropout_p > 0 for _, member in group):
                rates = [member.dropout_p for _, member in group]
                generators = [
                    _member_generator(case_seed, index, self.device) if member.dropout_p > 0 else None
                    for index, member in group
                ]
                for hook in stack.enter_context(
                    dropout_hooks(network, self.settings.dropout_location, self.settings.dropout_mode)
                ):
                    hook.rates, hook.generators = rates, generators
            for slicer in slicers:
                tile = padded[slicer][None].to(self.device)
                batch = torch.cat([_flip(tile, member.flip_axes) for _, member in group])
                with autocast:
                    logits = network(batch).float().to(padded.device)
                for row, (_, member) in enumerate(group):
                    # flipped back (a copy) or the network's own output: weighted in place, no further tile copy
                    weighted = _flip(logits[row : row + 1], member.flip_axes)[0].mul_(gaussian)
                    accumulated[(row, *slicer)] += weighted
        return accumulated

    def _derive(self, proposals: torch.Tensor, case_seed: int, plain_logits, mean_probabilities) -> None:
        """Label maps of the derived members whose input is given (the plain logits, or the mean)."""
        for member_index, member in enumerate(self.members):
            if needs_forward(member) or (member.source in DERIVED_FROM_THE_MEAN) != (mean_probabilities is not None):
                continue
            derive = SOURCES[member.source].derive
            rng = np.random.default_rng([case_seed, member_index])
            proposals[member_index] = derive(member, plain_logits, mean_probabilities, self.settings, rng)


def _member_generator(case_seed: int, member_index: int, device: torch.device) -> torch.Generator:
    seed = int(np.random.SeedSequence([case_seed, member_index]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed)


def _slabs(shape: Sequence[int]) -> list[slice]:
    """Slices of the first spatial axis of about SLAB_VOXELS voxels each, SLAB_VOXEL_MULTIPLE-aligned."""
    plane = math.prod(shape[1:])
    unit = SLAB_VOXEL_MULTIPLE // math.gcd(plane, SLAB_VOXEL_MULTIPLE)
    rows = max(unit, SLAB_VOXELS // max(plane, 1) // unit * unit)
    return [slice(start, start + rows) for start in range(0, shape[0], rows)]


def _finish(
    sums: torch.Tensor,
    weight: torch.Tensor,
    proposals: torch.Tensor,
    probability_sum: torch.Tensor,
    member_indices: Sequence[int],
) -> None:
    """Slab by slab, while a slab is in the cache: each row of `sums` divided by the weights in place (its logits),
    its argmax into the member's label map, its softmax added to `probability_sum`."""
    for slab in _slabs(weight.shape):
        slab_weight = weight[slab]
        for row, member_index in enumerate(member_indices):
            logits = sums[row][:, slab]
            logits /= slab_weight
            proposals[member_index][slab] = logits.argmax(0)
            probability_sum[:, slab] += torch.softmax(logits, dim=0)


def _flip(tensor: torch.Tensor, spatial_axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(tensor, [axis + 2 for axis in spatial_axes]) if spatial_axes else tensor
