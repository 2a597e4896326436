"""Preference objectives for segmentation: pure torch, no files, no nnU-Net.

Notation (see README "The objective"): for an image x and a label map y,
    log pi(y | x) = sum_v log p(y_v | x)
and for a pair (chosen y_w, rejected y_l) with a frozen reference model
    m = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)].
Every voxel where y_w and y_l agree cancels, so m is a sum over the disagreement region D. The loss
types differ in how m is normalised before the link function:
    dpo    : m                 (sum over voxels, Rafailov et al. 2023)
    rn_dpo : m / max(|D|, 1)   (margin averaged over the disagreement region, Region-Normalized DPO)
    mean   : m / N             (averaged over every voxel of the patch)
    ipo    : (m / max(|D|,1) - t)^2, t = target_margin or 1 / (2 beta)   (IPO, normalised per disagreement voxel)
A pair with |D| = 0 carries no preference: it is counted as skipped and adds nothing to the loss.
All log-probabilities are computed in float32, also under autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "rn_dpo", "mean", "ipo")
NORMALIZATIONS = ("sum", "disagreement", "all")
DEFAULT_NORMALIZATION = {"dpo": "sum", "rn_dpo": "disagreement", "mean": "all", "ipo": "disagreement"}


# --------------------------------------------------------------------------------------------------
# log-likelihoods
# --------------------------------------------------------------------------------------------------
# Nothing here reads a tensor's value on the host (no .item(), no `if tensor`): on a GPU each such read waits
# for every queued kernel. Labels outside [0, C) are not checked here: gather rejects them on the CPU and
# device-side on a GPU; nnU-Net's own loss does not check them either.
def _softmax_labels(logits: torch.Tensor, labels: torch.Tensor, ignore_label: Optional[int]) -> torch.Tensor:
    """(B, K, *spatial) class indices for gather; the ignore label becomes class 0 (masked out by the caller)."""
    if labels.dim() != logits.dim() or labels.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"labels must be (B, 1, *spatial) matching logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    labels = labels.long()
    if ignore_label is not None:
        labels = labels.masked_fill(labels == ignore_label, 0)
    return labels


def voxel_log_likelihood(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    region_based: bool = False,
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    """Per-voxel log p(y_v | x) in float32.

    logits: (B, C, *spatial). labels, as nnU-Net's targets: (B, 1, *spatial) integer class indices for
    softmax models; (B, R, *spatial) binary region memberships for region-based (sigmoid) models, whose voxel
    log-likelihood is the sum over regions of the Bernoulli log-likelihoods.
    Voxels equal to `ignore_label` (softmax models) contribute 0.
    Returns (B, *spatial).
    """
    if region_based:
        if labels.shape != logits.shape:
            raise ValueError(
                f"region-based labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        # log sigmoid(z) for members, log sigmoid(-z) for non-members, stable for large |z|
        return -F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").sum(1)
    if labels.dim() != logits.dim() or labels.shape[1] != 1:
        raise ValueError(
            f"labels must be (B, 1, *spatial) matching logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    index = _softmax_labels(logits, labels, ignore_label)
    # log_softmax at one label = logit - logsumexp: one reduction, no (B, C, *spatial) log-probability map
    per_voxel = (torch.gather(logits, 1, index).float() - torch.logsumexp(logits.float(), 1, keepdim=True))[:, 0]
    if ignore_label is not None:
        per_voxel = per_voxel.masked_fill(labels[:, 0] == ignore_label, 0.0)
    return per_voxel


def pair_voxel_log_likelihoods(
    logits: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    region_based: bool = False,
    ignore_label: Optional[int] = None,
    normalized: bool = True,
) -> torch.Tensor:
    """Per-voxel log-likelihoods of both masks from one set of logits: (B, 2, *spatial) float32, channel 0
    chosen, channel 1 rejected.

    Softmax models: one gather of the two labels' logits and one logsumexp. The logsumexp is the same for both
    masks, so it cancels in every margin; it is computed outside autograd (a constant for the gradient, which
    is then exactly the margin's), and with `normalized=False` not at all: the two channels are then the raw
    logits, whose difference is still the exact log-likelihood difference. Values at ignore-label voxels are
    meaningless; the caller's disagreement region excludes them.
    """
    if region_based:
        return torch.stack(
            [
                voxel_log_likelihood(logits, chosen, region_based=True),
                voxel_log_likelihood(logits, rejected, region_based=True),
            ],
            1,
        )
    if chosen.shape != rejected.shape or chosen.shape[1] != 1:
        raise ValueError(
            f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must both be (B, 1, *spatial)"
        )
    index = _softmax_labels(logits, torch.cat([chosen, rejected], 1), ignore_label)
    gathered = torch.gather(logits, 1, index).float()
    if not normalized:
        return gathered
    with torch.no_grad():
        log_normalizer = torch.logsumexp(logits.float(), 1, keepdim=True)
    return gathered - log_normalizer


def mask_log_likelihood(voxel_ll: torch.Tensor, region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of per-voxel log-likelihoods over all voxels (or over `region`): (B, *spatial) -> (B,)."""
    if region is not None:
        voxel_ll = voxel_ll * region
    return voxel_ll.flatten(1).sum(1)


def disagreement_region(
    chosen: torch.Tensor, rejected: torch.Tensor, ignore_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Boolean map (B, *spatial) of voxels where two masks (B, 1 or R, *spatial) differ.

    Region-based masks differ at a voxel when any region membership differs; `ignore_mask` voxels
    (B, *spatial) are excluded.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ in shape")
    differs = (chosen != rejected).any(1)
    if ignore_mask is not None:
        differs = differs & ~ignore_mask.bool()
    return differs


# --------------------------------------------------------------------------------------------------
# pair terms
# --------------------------------------------------------------------------------------------------
@dataclass
class PairLogRatios:
    """Per-pair sums over the disagreement region D of log pi - log ref, for chosen and rejected.

    Restricting to D changes nothing in the margin (agreeing voxels cancel exactly) and keeps the agreeing
    voxels out of the gradient and out of the logged rewards. Only the margin carries a gradient that is
    meaningful on its own (see pair_voxel_log_likelihoods); every loss uses only the margin.
    """

    chosen: torch.Tensor  # (B,)
    rejected: torch.Tensor  # (B,)
    disagreement_voxels: torch.Tensor  # (B,) |D|, float
    total_voxels: torch.Tensor  # (B,) voxels that count (ignore label excluded), float

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen - self.rejected

    @property
    def has_preference(self) -> torch.Tensor:
        return self.disagreement_voxels > 0


def _ignore_mask(chosen: torch.Tensor, rejected: torch.Tensor, region_based: bool, ignore_label: Optional[int]):
    if ignore_label is None or region_based:
        return None
    return (chosen[:, 0] == ignore_label) | (rejected[:, 0] == ignore_label)


def reference_log_likelihoods(
    reference_logits: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    region_based: bool = False,
    ignore_label: Optional[int] = None,
    normalized: bool = True,
) -> torch.Tensor:
    """The reference's (B, 2, *spatial) term for pair_log_ratios, without autograd."""
    with torch.no_grad():
        return pair_voxel_log_likelihoods(
            reference_logits,
            chosen,
            rejected,
            region_based=region_based,
            ignore_label=ignore_label,
            normalized=normalized,
        )


def pair_log_ratios(
    policy_logits: torch.Tensor,
    reference_logits: Optional[torch.Tensor],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    region_based: bool = False,
    ignore_label: Optional[int] = None,
    reference_voxel_ll: Optional[torch.Tensor] = None,
    normalized: bool = True,
) -> PairLogRatios:
    """Policy-vs-reference log-ratios of both masks over their disagreement region.

    One policy forward pass and one reference forward pass give both masks' log-likelihoods. Pass either
    `reference_logits` or the reference's per-voxel term `reference_voxel_ll` (B, 2, *spatial), as
    reference_log_likelihoods returns it with the same `normalized`. normalized=False skips the logsumexp of
    both models: the margin is unchanged, chosen and rejected alone are then not log-ratios (use it where
    only the loss is needed, not the logged rewards).
    """
    ignore_mask = _ignore_mask(chosen, rejected, region_based, ignore_label)
    region = disagreement_region(chosen, rejected, ignore_mask)
    if reference_voxel_ll is None:
        if reference_logits is None:
            raise ValueError("pass reference_logits or reference_voxel_ll")
        reference_voxel_ll = reference_log_likelihoods(
            reference_logits,
            chosen,
            rejected,
            region_based=region_based,
            ignore_label=ignore_label,
            normalized=normalized,
        )
    policy = pair_voxel_log_likelihoods(
        policy_logits, chosen, rejected, region_based=region_based, ignore_label=ignore_label, normalized=normalized
    )
    sums = ((policy - reference_voxel_ll.float()) * region.unsqueeze(1)).flatten(2).sum(2)  # (B, 2)
    region_size = region.flatten(1).sum(1).float()
    if ignore_mask is None:
        total_voxels = torch.full_like(region_size, float(region[0].numel()))
    else:
        total_voxels = (~ignore_mask).flatten(1).sum(1).float()
    return PairLogRatios(sums[:, 0], sums[:, 1], region_size, total_voxels)


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------
def normalizer(ratios: PairLogRatios, normalization: str) -> torch.Tensor:
    """What the margin is divided by, per pair, for a normalisation name."""
    if normalization == "sum":
        return torch.ones_like(ratios.chosen)
    if normalization == "disagreement":
        return ratios.disagreement_voxels.clamp(min=1.0)
    if normalization == "all":
        return ratios.total_voxels.clamp(min=1.0)
    raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")


@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # scalar, mean over pairs with a preference (0 with a graph when there is none)
    per_pair: torch.Tensor  # (B,), 0 for skipped pairs
    chosen_rewards: torch.Tensor  # (B,) beta * normalised log-ratio of the chosen mask
    rejected_rewards: torch.Tensor  # (B,)
    ratios: PairLogRatios


def preference_loss(
    ratios: PairLogRatios,
    loss_type: str = "rn_dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    normalization: Optional[str] = None,
    target_margin: Optional[float] = None,
) -> PreferenceLoss:
    """The preference loss selected by name; see the module docstring for the formulas.

    label_smoothing eps (conservative DPO): L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    target_margin t, in the units of the normalised margin h (nats per disagreement voxel for rn_dpo): ipo
    regresses h onto t instead of 1 / (2 beta), so its push stops once the margin reaches t; the sigmoid types
    use -log sigmoid(beta (h - t)) (a shifted sigmoid: the push is half-strength at h = t and still never
    stops).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if target_margin is not None and not (math.isfinite(target_margin) and target_margin >= 0):
        raise ValueError(f"target_margin must be a finite number >= 0 (or None), got {target_margin}")
    normalization = normalization or DEFAULT_NORMALIZATION[loss_type]
    scale = normalizer(ratios, normalization)
    chosen = ratios.chosen / scale
    rejected = ratios.rejected / scale
    normalized_margin = chosen - rejected

    if loss_type == "ipo":
        target = 1.0 / (2.0 * beta) if target_margin is None else target_margin
        per_pair = (normalized_margin - target) ** 2
    else:
        logits = beta * (normalized_margin - (target_margin or 0.0))
        per_pair = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)

    valid = ratios.has_preference.float()
    per_pair = per_pair * valid
    # Mean over pairs that carry a preference; with none, 0 that still depends on the policy so that
    # every parameter gets a (zero) gradient, as DDP requires.
    loss = per_pair.sum() / valid.sum().clamp(min=1.0)
    return PreferenceLoss(
        loss=loss,
        per_pair=per_pair,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        ratios=ratios,
    )


# --------------------------------------------------------------------------------------------------
# statistics (names as TRL logs them)
# --------------------------------------------------------------------------------------------------
STATISTIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "disagreement/voxels_mean",
    "disagreement/voxels_median",
    "disagreement/fraction_mean",
    "pairs/skipped_fraction",
)


def preference_statistics(result: PreferenceLoss) -> dict[str, torch.Tensor]:
    """Batch statistics of a preference loss; reward means are over pairs with a preference.

    Returns detached 0-dim float32 tensors on the loss's device, keyed by STATISTIC_NAMES, so that a training
    step never waits for the device: the trainer sums them over an epoch and reads them once. NaN-free (0
    where no pair has a preference).
    """
    ratios = result.ratios
    valid = ratios.has_preference.float()
    preferred = valid.sum().clamp(min=1.0)
    disagreement = ratios.disagreement_voxels.detach().float()
    chosen, rejected = result.chosen_rewards.float(), result.rejected_rewards.float()
    stats = {
        "rewards/chosen": (chosen * valid).sum() / preferred,
        "rewards/rejected": (rejected * valid).sum() / preferred,
        "rewards/margins": ((chosen - rejected) * valid).sum() / preferred,
        "rewards/accuracies": ((chosen > rejected).float() * valid).sum() / preferred,
        "disagreement/voxels_mean": disagreement.mean(),
        "disagreement/voxels_median": disagreement.median(),
        "disagreement/fraction_mean": (disagreement / ratios.total_voxels.clamp(min=1.0)).mean(),
        "pairs/skipped_fraction": 1.0 - valid.mean(),
    }
    return {name: stats[name] for name in STATISTIC_NAMES}
