"""MC dropout added after the fact, through forward hooks, so a checkpoint trained without dropout loads
unchanged (turning dropout on in the plans renames weights).

Each batch row gets its own dropout rate (0 = off) and its own random generator, so one batched forward pass can
carry plain, flipped and dropout members together, and a member's draws do not depend on the rows beside it. The
hooks survive `.eval()` because they do not use nn.Dropout's training flag.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

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
    """A forward hook applying dropout with a per-batch-row rate; rates=None means off.

    rates: one rate per batch row; generators: one torch generator per row (None: torch's global one), each row's
    mask drawn from its own, so a row draws the same whatever the batch holds besides it.
    """

    def __init__(self, mode: str = "element"):
        if mode not in DROPOUT_MODES:
            raise ValueError(f"unknown dropout mode {mode!r}; valid: {', '.join(DROPOUT_MODES)}")
        self.mode = mode
        self.rates: Optional[Sequence[float]] = None  # (B,)
        self.generators: Optional[Sequence[Optional[torch.Generator]]] = None  # (B,)

    def __call__(self, module, inputs, output):
        if self.rates is None or not any(float(rate) > 0 for rate in self.rates):
            return output
        rates = [float(rate) for rate in self.rates]
        if output.shape[0] != len(rates):
            raise RuntimeError(f"dropout rates for {len(rates)} rows, batch has {output.shape[0]}")
        generators = self.generators if self.generators is not None else [None] * len(rates)
        if len(generators) != len(rates):
            raise RuntimeError(f"dropout generators for {len(generators)} rows, batch has {len(rates)}")
        mask_shape = output.shape[1:] if self.mode == "element" else output.shape[1:2] + (1,) * (output.dim() - 2)
        keep = torch.ones((len(rates), *mask_shape), dtype=output.dtype, device=output.device)
        for row, (rate, generator) in enumerate(zip(rates, generators)):
            if rate > 0:
                uniform = torch.rand(mask_shape, generator=generator, device=output.device, dtype=torch.float32)
                keep[row] = (uniform.to(output.dtype) < 1.0 - rate).to(output.dtype)
        keep_probability = torch.tensor([1.0 - rate for rate in rates], device=output.device, dtype=output.dtype)
        return output * keep / keep_probability.clamp(min=1e-6).view(-1, *([1] * (output.dim() - 1)))


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
