"""MC dropout added after the fact, through forward hooks, so a checkpoint trained without dropout loads
unchanged (turning dropout on in the plans renames weights).

Each batch row gets its own dropout rate (0 = off), so one batched forward pass can carry plain, flipped
and dropout members together. The hooks survive `.eval()` because they do not use nn.Dropout's training flag.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

DROPOUT_LOCATIONS = ("bottleneck", "decoder", "all")
DROPOUT_MODES = ("element", "channel")


def dropout_target_modules(network: torch.nn.Module, location: str) -> list[torch.nn.Module]:
    """Modules whose outputs get dropout: the encoder's last stage and/or every decoder stage."""
    if location not in DROPOUT_LOCATIONS:
        raise ValueError(f"unknown dropout location {location!r}; valid: {', '.join(DROPOUT_LOCATIONS)}")
    encoder = getattr(network, "encoder", None)
    decoder = getattr(network, "decoder", None)
    if encoder is None or decoder is None or not hasattr(encoder, "stages") or not hasattr(decoder, "stages"):
        raise ValueError(
            f"dropout hooks need a dynamic-network-architectures U-Net (encoder.stages/decoder.stages); "
            f"got {type(network).__name__}"
        )
    targets = []
    if location in ("bottleneck", "all"):
        targets.append(encoder.stages[-1])
    if location in ("decoder", "all"):
        targets.extend(decoder.stages)
    return targets


class RowDropout:
    """A forward hook applying dropout with a per-batch-row rate; rates=None means off."""

    def __init__(self, mode: str = "element"):
        if mode not in DROPOUT_MODES:
            raise ValueError(f"unknown dropout mode {mode!r}; valid: {', '.join(DROPOUT_MODES)}")
        self.mode = mode
        self.rates: Optional[torch.Tensor] = None  # (B,)
        self.generator: Optional[torch.Generator] = None

    def __call__(self, module, inputs, output):
        if self.rates is None or not torch.any(self.rates > 0):
            return output
        rates = self.rates.to(output.device, output.dtype)
        if output.shape[0] != rates.shape[0]:
            raise RuntimeError(f"dropout rates for {rates.shape[0]} rows, batch has {output.shape[0]}")
        mask_shape = output.shape if self.mode == "element" else output.shape[:2] + (1,) * (output.dim() - 2)
        uniform = torch.rand(mask_shape, generator=self.generator, device=output.device, dtype=torch.float32)
        keep_probability = (1.0 - rates).view(-1, *([1] * (output.dim() - 1)))
        keep = (uniform.to(output.dtype) < keep_probability).to(output.dtype)
        return output * keep / keep_probability.clamp(min=1e-6)


@contextlib.contextmanager
def dropout_hooks(network: torch.nn.Module, location: str, mode: str) -> Iterator[list[RowDropout]]:
    """Install RowDropout hooks for the duration of the block; yields them to set `rates` per forward."""
    hooks = [RowDropout(mode) for _ in dropout_target_modules(network, location)]
    handles = [
        module.register_forward_hook(hook) for module, hook in zip(dropout_target_modules(network, location), hooks)
    ]
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()
