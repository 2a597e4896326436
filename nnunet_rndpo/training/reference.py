"""The frozen reference policy of the preference objectives: the base weights, in one place.

Eval mode, no gradients, never wrapped in DDP (each rank holds its own copy; it takes no part in gradient
synchronisation), compiled when nnU-Net compiles the policy. It runs on each augmented patch, under
`torch.inference_mode` and, on a GPU, autocast as the policy does, so that the margin is exactly 0 at the first step.
Its lower-resolution heads run only where the preference loss uses them.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional, Sequence

import torch
from torch.profiler import record_function

from nnunet_rndpo.objectives import reference_log_likelihoods


class FrozenReference:
    def __init__(
        self,
        policy: torch.nn.Module,
        base_weights: dict,
        scale_weights: Sequence[float],
        ignore_label: Optional[int],
        device: torch.device,
        compile_network: bool = False,
    ):
        """policy: the plain (unwrapped) policy network, copied for its architecture; base_weights: the base
        checkpoint's state dict; scale_weights: the preference loss's weight of each output scale (0: not run)."""
        network = copy.deepcopy(policy)
        network.load_state_dict(base_weights)
        network.decoder.deep_supervision = len(scale_weights) > 1 and any(w != 0 for w in scale_weights[1:])
        network.eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        network = network.to(device)
        self.network = torch.compile(network) if compile_network else network
        self.scale_weights = list(scale_weights)
        self.ignore_label = ignore_label
        self.device = device

    def terms(self, data: torch.Tensor, target) -> list:
        """The reference's per-voxel term of both masks (channel 0 chosen, 1 rejected) at each output scale the loss
        uses, None elsewhere (objectives.reference_log_likelihoods; normalised at full resolution only)."""
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        autocast = torch.autocast("cuda") if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), autocast, record_function("rndpo/reference"):
            output = self.network(data)
            outputs = output if isinstance(output, (list, tuple)) else [output]
            return [
                reference_log_likelihoods(
                    outputs[scale], masks[:, :1], masks[:, 1:2], ignore_label=self.ignore_label, normalized=scale == 0
                )
                if weight != 0
                else None
                for scale, (weight, masks) in enumerate(zip(self.scale_weights, targets))
            ]

    def parameters(self):
        return self.network.parameters()

    def state_dict(self) -> dict:
        return getattr(self.network, "_orig_mod", self.network).state_dict()
