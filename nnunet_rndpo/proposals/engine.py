"""K proposals for one preprocessed case in one sliding-window sweep.

Every tile is cut once; all members that need a network pass (plain, each mirror flip, dropout draws) go
through the network together as one batch, are flipped back and accumulated with nnU-Net's Gaussian
weights. Padding, tiling and the Gaussian are nnU-Net's own (pad_nd_image, the predictor's slicers,
compute_gaussian), so proposals are voxel-aligned with nnU-Net's preprocessed data and its predictions.
Members derived from the plain softmax (threshold, temperature) cost no pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from nnunet_rndpo.proposals.dropout import dropout_hooks
from nnunet_rndpo.proposals.plan import ProposalSettings, plan_members
from nnunet_rndpo.proposals.sources import SOURCES, needs_forward


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
    ):
        if label_manager.has_regions:
            raise ValueError(
                "region-based (sigmoid) datasets are not supported by the proposal engine yet: "
                "their masks are overlapping regions, not label maps"
            )
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.networks = list(networks)
        self.settings = settings
        self.device = torch.device(device)
        self.num_classes = label_manager.num_segmentation_heads
        self.patch_size = tuple(configuration_manager.patch_size)
        self.members = plan_members(
            settings, mirror_axes if mirror_axes is not None else tuple(range(len(self.patch_size)))
        )
        if max(m.network_index for m in self.members) >= len(self.networks):
            raise ValueError("a member needs an extra checkpoint that was not loaded")
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

    @torch.inference_mode()
    def generate(self, data: np.ndarray | torch.Tensor, case_seed: int) -> CaseProposals:
        """data: (C_in, *spatial) preprocessed image. Returns K label maps and the mean softmax."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        image = torch.as_tensor(np.asarray(data), dtype=torch.float32)
        if image.dim() != len(self.patch_size) + 1:
            raise ValueError(
                f"expected a (channels, *spatial) image of {len(self.patch_size)}D, got {tuple(image.shape)}"
            )
        padded, revert_padding = pad_nd_image(image, self.patch_size, "constant", {"value": 0}, True, None)
        slicers = self._tiler._internal_get_sliding_window_slicers(padded.shape[1:])
        gaussian = compute_gaussian(self.patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10, device=self.device)

        forward_members = [m for m in self.members if needs_forward(m)]
        accumulated = torch.zeros(
            (len(forward_members), self.num_classes, *padded.shape[1:]), dtype=torch.float32, device=self.device
        )
        weight = torch.zeros(padded.shape[1:], dtype=torch.float32, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(case_seed)
        padded = padded.to(self.device)

        by_network = {}
        for slot, member in enumerate(forward_members):
            by_network.setdefault(member.network_index, []).append((slot, member))
        autocast = torch.autocast("cuda") if self.device.type == "cuda" else contextlib.nullcontext()
        with contextlib.ExitStack() as stack:
            hooks_per_network = {}
            for index, group in by_network.items():
                if any(member.dropout_p > 0 for _, member in group):
                    hooks = stack.enter_context(
                        dropout_hooks(self.networks[index], self.settings.dropout_location, self.settings.dropout_mode)
                    )
                    for hook in hooks:
                        hook.generator = generator
                    hooks_per_network[index] = hooks
            for slicer in slicers:
                tile = padded[slicer][None]
                for index, group in by_network.items():
                    for start in range(0, len(group), self.settings.members_per_batch):
                        chunk = group[start : start + self.settings.members_per_batch]
                        batch = torch.cat([_flip(tile, member.flip_axes) for _, member in chunk])
                        for hook in hooks_per_network.get(index, ()):
                            hook.rates = torch.tensor([member.dropout_p for _, member in chunk], device=self.device)
                        with autocast:
                            logits = self.networks[index](batch).float()
                        for row, (slot, member) in enumerate(chunk):
                            accumulated[(slot, *slicer)] += _flip(logits[row : row + 1], member.flip_axes)[0] * gaussian
                weight[slicer[1:]] += gaussian
            for hooks in hooks_per_network.values():
                for hook in hooks:
                    hook.rates = None
        accumulated /= weight
        accumulated = accumulated[(slice(None), slice(None), *revert_padding[1:])]

        mean_probabilities = torch.softmax(accumulated, dim=1).mean(0)
        plain_logits = accumulated[0]
        labels = []
        forward_index = 0
        for member_index, member in enumerate(self.members):
            if needs_forward(member):
                labels.append(accumulated[forward_index].argmax(0))
                forward_index += 1
            else:
                derive = SOURCES[member.source].derive
                labels.append(
                    derive(
                        member,
                        plain_logits,
                        mean_probabilities,
                        self.settings,
                        np.random.default_rng([case_seed, member_index]),
                    )
                )
        proposals = torch.stack(labels).to(torch.uint8).cpu().numpy()
        return CaseProposals(proposals, mean_probabilities.to(torch.float16).cpu().numpy(), case_seed)


def _flip(tensor: torch.Tensor, spatial_axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(tensor, [axis + 2 for axis in spatial_axes]) if spatial_axes else tensor
