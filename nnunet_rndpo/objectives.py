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
    ipo    : (m / max(|D|,1) - 1 / (2 beta))^2   (IPO, normalised per disagreement voxel)
A pair with |D| = 0 carries no preference: it is counted as skipped and adds nothing to the loss.
All log-probabilities are computed in float32, also under autocast.
"""
from __future__ import annotations

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
    logits = logits.float()
    if region_based:
        if labels.shape != logits.shape:
            raise ValueError(
                f"region-based labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        targets = labels.float()
        # log sigmoid(z) for members, log sigmoid(-z) for non-members, stable for large |z|
        per_region = -F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return per_region.sum(1)

    if labels.dim() != logits.dim() or labels.shape[1] != 1 or labels.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"labels must be (B, 1, *spatial) matching logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    labels = labels[:, 0].long()
    valid = None
    if ignore_label is not None:
        valid = labels != ignore_label
        labels = torch.where(valid, labels, torch.zeros_like(labels))
    num_classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (or be the ignore label)")
    log_probs = torch.log_softmax(logits, dim=1)
    per_voxel = torch.gather(log_probs, 1, labels.unsqueeze(1)).squeeze(1)
    if valid is not None:
        per_voxel = per_voxel * valid
    return per_voxel


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
    voxels out of the gradient and out of the logged rewards.
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


def pair_log_ratios(
    policy_logits: torch.Tensor,
    reference_logits: Optional[torch.Tensor],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    region_based: bool = False,
    ignore_label: Optional[int] = None,
    reference_voxel_ll: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> PairLogRatios:
    """Policy-vs-reference log-ratios of both masks over their disagreement region.

    One policy forward pass and one reference forward pass give both masks' log-likelihoods. Pass either
    `reference_logits` or precomputed per-voxel reference log-likelihoods `reference_voxel_ll`
    (chosen, rejected), each (B, *spatial).
    """
    ignore_mask = None
    if ignore_label is not None and not region_based:
        ignore_mask = (chosen[:, 0] == ignore_label) | (rejected[:, 0] == ignore_label)
    region = disagreement_region(chosen, rejected, ignore_mask).float()

    policy_chosen = voxel_log_likelihood(policy_logits, chosen, region_based=region_based, ignore_label=ignore_label)
    policy_rejected = voxel_log_likelihood(
        policy_logits, rejected, region_based=region_based, ignore_label=ignore_label
    )
    if reference_voxel_ll is not None:
        reference_chosen, reference_rejected = (t.float() for t in reference_voxel_ll)
    elif reference_logits is not None:
        with torch.no_grad():
            reference_chosen = voxel_log_likelihood(
                reference_logits, chosen, region_based=region_based, ignore_label=ignore_label
            )
            reference_rejected = voxel_log_likelihood(
                reference_logits, rejected, region_based=region_based, ignore_label=ignore_label
            )
    else:
        raise ValueError("pass reference_logits or reference_voxel_ll")

    chosen_ratio = mask_log_likelihood(policy_chosen - reference_chosen.detach(), region)
    rejected_ratio = mask_log_likelihood(policy_rejected - reference_rejected.detach(), region)
    spatial_voxels = torch.full_like(chosen_ratio, float(region[0].numel()))
    total_voxels = spatial_voxels if ignore_mask is None else (~ignore_mask).flatten(1).sum(1).float()
    return PairLogRatios(chosen_ratio, rejected_ratio, region.flatten(1).sum(1), total_voxels)


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
) -> PreferenceLoss:
    """The preference loss selected by name; see the module docstring for the formulas.

    label_smoothing eps (conservative DPO): L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    normalization = normalization or DEFAULT_NORMALIZATION[loss_type]
    scale = normalizer(ratios, normalization)
    chosen = ratios.chosen / scale
    rejected = ratios.rejected / scale
    normalized_margin = chosen - rejected

    if loss_type == "ipo":
        per_pair = (normalized_margin - 1.0 / (2.0 * beta)) ** 2
    else:
        logits = beta * normalized_margin
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


def preference_statistics(result: PreferenceLoss) -> dict[str, float]:
    """Batch statistics of a preference loss; reward means are over pairs with a preference.

    Returns plain floats keyed by STATISTIC_NAMES; NaN-free (0 where no pair has a preference).
    """
    ratios = result.ratios
    valid = ratios.has_preference
    pairs = valid.numel()
    disagreement = ratios.disagreement_voxels.detach().float()
    fraction = disagreement / ratios.total_voxels.clamp(min=1.0)
    stats = {
        "disagreement/voxels_mean": float(disagreement.mean()) if pairs else 0.0,
        "disagreement/voxels_median": float(disagreement.median()) if pairs else 0.0,
        "disagreement/fraction_mean": float(fraction.mean()) if pairs else 0.0,
        "pairs/skipped_fraction": float((~valid).float().mean()) if pairs else 0.0,
    }
    if valid.any():
        chosen = result.chosen_rewards[valid]
        rejected = result.rejected_rewards[valid]
        stats["rewards/chosen"] = float(chosen.mean())
        stats["rewards/rejected"] = float(rejected.mean())
        stats["rewards/margins"] = float((chosen - rejected).mean())
        stats["rewards/accuracies"] = float((chosen > rejected).float().mean())
    else:
        stats.update({"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0})
    return {name: stats[name] for name in STATISTIC_NAMES}
