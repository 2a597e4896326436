"""The preference loss over nnU-Net's deep-supervision outputs (pure torch; the trainer passes its weights)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from nnunet_rndpo.objectives import pair_log_ratios, preference_loss, preference_statistics


def preference_loss_over_scales(
    output,
    reference_output,
    target,
    scale_weights: Sequence[float],
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    normalization: Optional[str] = None,
    ignore_label: Optional[int] = None,
    reference_voxel_ll: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the preference loss at each output scale.

    output / reference_output: logits, a list per scale (deep supervision) or one tensor.
    target: per scale (B, 2, *spatial) masks, channel 0 chosen and channel 1 rejected (downsampled by nnU-Net's
    transforms with the image). Instead of reference logits, `reference_voxel_ll` may give per scale the
    precomputed reference log-likelihoods (chosen, rejected), each (B, *spatial). Scales of weight 0 still enter the graph with a zero factor, so every output
    head receives a gradient, as DistributedDataParallel requires. Statistics are those of the full resolution.
    """
    outputs = list(output) if isinstance(output, (list, tuple)) else [output]
    if reference_voxel_ll is not None:
        references = [None] * len(outputs)
        precomputed = list(reference_voxel_ll)
    else:
        references = list(reference_output) if isinstance(reference_output, (list, tuple)) else [reference_output]
        precomputed = [None] * len(outputs)
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    if not len(outputs) == len(references) == len(precomputed) == len(targets) == len(scale_weights):
        raise ValueError(
            f"{len(outputs)} outputs, {len(references)} reference outputs, {len(precomputed)} precomputed references, {len(targets)} targets and "
            f"{len(scale_weights)} weights must match"
        )
    total = torch.zeros((), device=outputs[0].device, dtype=torch.float32)
    statistics: dict = {}
    for scale, (weight, policy_logits, reference_logits, reference_ll, masks) in enumerate(zip(scale_weights, outputs, references, precomputed, targets)):
        if weight == 0:
            total = total + 0.0 * policy_logits.float().sum()
            continue
        ratios = pair_log_ratios(
            policy_logits, reference_logits, masks[:, :1], masks[:, 1:2], ignore_label=ignore_label, reference_voxel_ll=reference_ll
        )
        result = preference_loss(ratios, loss_type, beta, label_smoothing, normalization)
        total = total + weight * result.loss
        if scale == 0:
            statistics = preference_statistics(result)
    statistics["preference_loss"] = float(total.detach())
    return total, statistics
