"""The proposal sources, one table entry each: a name, what it is, the members it plans and whether each
needs a network pass. Members without a pass are derived from the plain pass's logits (`derive`).

Adding a source is one entry in SOURCES: its member generator and, for a source without a network pass, its
derivation. Defaults and what each source is worth on a real base model: docs/measured-proposals.md.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from nnunet_rndpo.proposals.members import ProposalMember

if TYPE_CHECKING:
    import torch

# The sources read a ProposalSettings (nnunet_rndpo/proposals/plan.py, which sits above this table); typed loosely
# here so that this module imports nothing above it.
Settings = Any


@dataclass(frozen=True)
class ProposalSource:
    name: str
    description: str
    # (settings, mirror axes) -> this source's members, in the order they are taken (may be endless)
    members: Callable[[Settings, Sequence[int]], Iterator[ProposalMember]]
    needs_forward: bool
    # for a source without a pass: (member, plain logits (C, *spatial), mean softmax over every pass (C, *spatial),
    # settings, rng) -> label map (*spatial)
    derive: Optional[Callable[..., "torch.Tensor"]] = None
    selectable: bool = True  # "plain" is always the first member, never asked for
    uses_extra_networks: bool = False  # needs extra_checkpoints (or other_folds)


def flip_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty combination of the allowed mirror axes (the identity is the plain member)."""
    axes = sorted(mirror_axes)
    return [c for size in range(1, len(axes) + 1) for c in itertools.combinations(axes, size)]


def _tta_members(settings, mirror_axes):
    for axes in flip_combinations(mirror_axes):
        yield ProposalMember("tta", flip_axes=axes)


def _dropout_members(settings, mirror_axes):
    for draw in itertools.count():
        yield ProposalMember("dropout", dropout_p=settings.dropout_p, sample_index=draw)


def _threshold_members(settings, mirror_axes):
    for threshold in settings.thresholds:
        yield ProposalMember("threshold", threshold=threshold)


def _temperature_members(settings, mirror_axes):
    for draw in itertools.count():
        yield ProposalMember("temperature", temperature=settings.temperature, sample_index=draw)


def _checkpoint_members(settings, mirror_axes):
    for index in range(1, len(settings.extra_checkpoints) + 1):
        yield ProposalMember("checkpoint", network_index=index)


def _checkpoint_tta_members(settings, mirror_axes):
    for index in range(1, len(settings.extra_checkpoints) + 1):
        for axes in flip_combinations(mirror_axes):
            yield ProposalMember("checkpoint_tta", flip_axes=axes, network_index=index)


def _ensemble_members(settings, mirror_axes):
    yield ProposalMember("ensemble")


def ensemble_labels(member: ProposalMember, plain_logits, mean_probabilities, settings, rng):
    """The argmax of the softmax averaged over every network pass: nnU-Net's ensemble of its folds (and of
    mirror TTA) when those passes are among the members."""
    return mean_probabilities.argmax(0)


def threshold_labels(member: ProposalMember, plain_logits, mean_probabilities, settings, rng):
    """Foreground where 1 - p(background) exceeds the threshold, as the most likely foreground class."""
    import torch

    probabilities = torch.softmax(plain_logits, dim=0)
    foreground = (1.0 - probabilities[0]) > member.threshold
    return torch.where(foreground, probabilities[1:].argmax(0) + 1, torch.zeros_like(foreground, dtype=torch.long))


def tempered_sample(member: ProposalMember, plain_logits, mean_probabilities, settings, rng):
    """A draw from the tempered softmax with spatially smooth Gumbel noise (plausible blobs, not speckle)."""
    import numpy as np
    import torch
    from scipy import ndimage

    smoothing = settings.temperature_smoothing_voxels
    gumbel = -np.log(-np.log(rng.uniform(1e-9, 1.0 - 1e-9, size=tuple(plain_logits.shape))))
    if smoothing > 0:
        gumbel = ndimage.gaussian_filter(gumbel, sigma=(0, *([smoothing] * (plain_logits.dim() - 1))))
        # smoothing shrinks the noise; restore the Gumbel spread so the temperature keeps its meaning
        gumbel = (gumbel - gumbel.mean()) / max(gumbel.std(), 1e-8) * (np.pi / np.sqrt(6.0))
    noise = torch.as_tensor(gumbel, dtype=torch.float32, device=plain_logits.device)
    return (torch.log_softmax(plain_logits / member.temperature, dim=0) + noise).argmax(0)


SOURCES: dict[str, ProposalSource] = {
    source.name: source
    for source in (
        ProposalSource(
            "plain",
            "one forward pass of the base model (always the first proposal)",
            lambda s, a: iter(()),
            True,
            selectable=False,
        ),
        ProposalSource("tta", "single mirror-TTA members: one flipped pass each, flipped back", _tta_members, True),
        ProposalSource(
            "dropout", "MC dropout draws (dropout_p at dropout_location, dropout_mode)", _dropout_members, True
        ),
        ProposalSource(
            "threshold",
            "the plain softmax thresholded at each of `thresholds` (no pass)",
            _threshold_members,
            False,
            threshold_labels,
        ),
        ProposalSource(
            "temperature",
            "tempered softmax samples with smooth Gumbel noise (no pass)",
            _temperature_members,
            False,
            tempered_sample,
        ),
        ProposalSource(
            "checkpoint",
            "one pass of each extra checkpoint (extra_checkpoints; other_folds adds the base's sibling folds)",
            _checkpoint_members,
            True,
            uses_extra_networks=True,
        ),
        ProposalSource(
            "checkpoint_tta",
            "the mirror-TTA members of each extra checkpoint",
            _checkpoint_tta_members,
            True,
            uses_extra_networks=True,
        ),
        ProposalSource(
            "ensemble",
            "argmax of the softmax averaged over every pass: nnU-Net's ensemble (no pass)",
            _ensemble_members,
            False,
            ensemble_labels,
        ),
    )
}
PROPOSAL_SOURCES = tuple(name for name, source in SOURCES.items() if source.selectable)


def needs_forward(member: ProposalMember) -> bool:
    """Whether the member takes a network pass (else it is derived from the passes' logits)."""
    return SOURCES[member.source].needs_forward


def describe_sources() -> str:
    """One line per selectable source, for --help."""
    return "; ".join(f"{name}: {SOURCES[name].description}" for name in PROPOSAL_SOURCES)
