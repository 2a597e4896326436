"""The preference loss over nnU-Net's deep-supervision outputs (pure torch; the trainer passes its weights), and the
loss module the trainers give nnU-Net (`PreferenceObjective`)."""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch.profiler import record_function

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


class PreferenceObjective(torch.nn.Module):
    """nnU-Net's loss hook for the preference trainers (`_build_loss` returns it): nnU-Net's own `train_step` calls
    it as `loss(output, target)` inside its autocast region, then does the backward pass, clipping and step.

    Inside `step(...)` (one training step) it is the configured objective over the output scales plus the SFT term
    (nnU-Net's Dice+CE on the chosen mask) plus the anchor (Dice+CE on a labeled batch), and it adds the step's
    statistics to `statistics`; the reference's terms of the step's patch come from the trainer, which ran the
    frozen reference on it. Outside a step (nnU-Net's validation) it is nnU-Net's supervised loss, unchanged.
    """

    def __init__(self, supervised_loss, settings, scale_weights: Sequence[float], ignore_label, ddp: bool, statistics):
        super().__init__()
        self.supervised = supervised_loss
        self.settings = settings
        self.scale_weights = list(scale_weights)
        self.ignore_label = ignore_label
        self.keep_every_head = ddp  # DDP fails on an output head without a gradient
        self.statistics = statistics
        self._reference_terms = None
        self._anchor = None
        self._in_step = False

    @contextlib.contextmanager
    def step(self, reference_terms, anchor=None):
        """One training step: `reference_terms` per scale (None for self-training), `anchor` a function returning
        the Dice+CE of the policy on a labeled batch (None: no anchor)."""
        self._reference_terms, self._anchor, self._in_step = reference_terms, anchor, True
        try:
            yield self
        finally:
            self._reference_terms, self._anchor, self._in_step = None, None, False

    def forward(self, output, target):
        if not self._in_step:
            return self.supervised(output, target)
        settings = self.settings
        statistics: dict = {}
        if self._reference_terms is None:  # self-training: nnU-Net's loss on the chosen mask (one channel)
            total = self.supervised(output, target)
        else:
            with record_function("rndpo/preference_loss"):
                total, statistics = preference_loss_over_scales(
                    output,
                    None,
                    target,
                    self.scale_weights if isinstance(output, (list, tuple)) else [1.0],
                    loss_type=settings.objective,
                    beta=settings.beta,
                    label_smoothing=settings.label_smoothing,
                    normalization=settings.normalization,
                    ignore_label=self.ignore_label,
                    target_margin=settings.target_margin,
                    reference_voxel_ll=self._reference_terms,
                    keep_every_head=self.keep_every_head,
                )
            if settings.sft_weight > 0:
                chosen = [t[:, :1] for t in target] if isinstance(target, (list, tuple)) else target[:, :1]
                with record_function("rndpo/sft_loss"):
                    total = total + settings.sft_weight * self.supervised(output, chosen)
        if self._anchor is not None:
            anchor = self._anchor()
            statistics["anchor_loss"] = anchor.detach()
            total = total + settings.anchor_weight * anchor
        self.statistics.add(statistics)
        return total
