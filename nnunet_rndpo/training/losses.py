"""The preference loss over nnU-Net's deep-supervision outputs (pure torch; the trainer passes its weights)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from nnunet_rndpo.objectives import pair_log_ratios, preference_loss, preference_statistics


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


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
    target_margin: Optional[float] = None,
    reference_voxel_ll: Optional[Sequence[Optional[torch.Tensor]]] = None,
    keep_every_head: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the preference loss at each output scale.

    output / reference_output: logits, a list per scale (deep supervision) or one tensor.
    target: per scale (B, 2, *spatial) masks, channel 0 chosen and channel 1 rejected (downsampled by nnU-Net's
    transforms with the image). Instead of reference logits, `reference_voxel_ll` may give per scale the
    reference's term from `objectives.reference_log_likelihoods` (normalized at scale 0 only; None where the
    weight is 0). keep_every_head: scales of weight 0 still enter the graph with a zero factor, so every output
    head receives a gradient, as DistributedDataParallel requires.
    Statistics are those of the full resolution: detached device tensors (nothing is read on the host here).
    """
    outputs = _as_list(output)
    targets = _as_list(target)
    if reference_voxel_ll is not None:
        references = [None] * len(outputs)
        precomputed = list(reference_voxel_ll)
    else:
        references = _as_list(reference_output)
        if len(references) == 1 and len(outputs) > 1 and all(w == 0 for w in scale_weights[1:]):
            references = references + [None] * (len(outputs) - 1)  # a reference without deep supervision
        precomputed = [None] * len(outputs)
    if not len(outputs) == len(references) == len(precomputed) == len(targets) == len(scale_weights):
        raise ValueError(
            f"{len(outputs)} outputs, {len(references)} reference outputs, {len(precomputed)} reference terms, "
            f"{len(targets)} targets and {len(scale_weights)} weights must match"
        )
    total = torch.zeros((), device=outputs[0].device, dtype=torch.float32)
    statistics: dict = {}
    for scale, (weight, policy_logits, reference_logits, reference_ll, masks) in enumerate(
        zip(scale_weights, outputs, references, precomputed, targets)
    ):
        if weight == 0:
            if keep_every_head:
                total = total + 0.0 * policy_logits.float().sum()
            continue
        # the log-normaliser cancels in the margin: computed only where the rewards are logged
        ratios = pair_log_ratios(
            policy_logits,
            reference_logits,
            masks[:, :1],
            masks[:, 1:2],
            ignore_label=ignore_label,
            reference_voxel_ll=reference_ll,
            normalized=scale == 0,
        )
        result = preference_loss(ratios, loss_type, beta, label_smoothing, normalization, target_margin)
        total = total + weight * result.loss
        if scale == 0:
            statistics = preference_statistics(result)
    statistics["preference_loss"] = total.detach()
    return total, statistics
