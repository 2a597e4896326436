"""Which K proposals to make: the proposal settings and the plan of members (the plain pass first, then members
drawn round-robin from the sources), above the member value type and the sources table.

Defaults follow what was measured on a real base model (docs/measured-proposals.md): single mirror-TTA members keep
the base quality and still differ, so `tta` is the default source; dropout added after the fact is fragile, so it is
opt-in with its location and rate exposed.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from nnunet_rndpo.proposals.members import ProposalMember
from nnunet_rndpo.proposals.sources import PROPOSAL_SOURCES, SOURCES
from nnunet_rndpo.typed_settings import SettingsError, apply_overrides, check_fields, setting


def dropout_locations() -> tuple[str, ...]:
    # read when a setting is checked: the dropout hooks are torch, and reading settings should not import it
    from nnunet_rndpo.proposals.dropout import DROPOUT_LOCATIONS

    return DROPOUT_LOCATIONS


def dropout_modes() -> tuple[str, ...]:
    from nnunet_rndpo.proposals.dropout import DROPOUT_MODES

    return DROPOUT_MODES


@dataclass(frozen=True)
class ProposalSettings:
    """Which K proposals each pool case gets (the `proposals` setting of a run; the flags of `nnunet_rndpo propose`
    and `audit`). Each field's help is what the CLI and the README's table show."""

    num_proposals: int = setting(
        8,
        "K, proposals per case: the plain pass, then members drawn round-robin from the sources",
        minimum=2,
        cli_flags=("-k",),
    )
    sources: tuple[str, ...] = setting(
        ("tta",),
        "proposal sources after the plain pass (the list of sources below `nnunet_rndpo propose --help` says what "
        "each is)",
        choices=PROPOSAL_SOURCES,
    )
    dropout_p: float = setting(
        0.2, "MC dropout rate of the `dropout` source", minimum=0.0, maximum=1.0, maximum_exclusive=True
    )
    dropout_location: str = setting("bottleneck", "where the `dropout` source drops", choices=dropout_locations)
    dropout_mode: str = setting(
        "element", "what the `dropout` source drops: single values or whole channels", choices=dropout_modes
    )
    thresholds: tuple[float, ...] = setting(
        (0.3, 0.7),
        "foreground thresholds on 1 - p(background) of the `threshold` source",
        minimum=0.0,
        maximum=1.0,
        minimum_exclusive=True,
        maximum_exclusive=True,
    )
    temperature: float = setting(
        2.0, "softmax temperature of the `temperature` source", minimum=0.0, minimum_exclusive=True
    )
    temperature_smoothing_voxels: float = setting(
        2.0, "spatial smoothing (voxels) of the `temperature` source's Gumbel noise", minimum=0.0
    )
    extra_checkpoints: tuple[str, ...] = setting(
        (), "further checkpoint files (same plans) for the `checkpoint` and `checkpoint_tta` sources"
    )
    other_folds: bool = setting(
        False,
        "add the base's other trained folds (same trainer folder and checkpoint name) to extra_checkpoints: models "
        "trained on other data, whose disagreement carries information that one model's mirror members lack",
    )
    seed: int = setting(0, "seed of the stochastic sources (each case draws from its own seed)")
    tile_step_size: float = setting(
        0.5,
        "sliding-window step as a fraction of the patch (nnU-Net's -step_size)",
        minimum=0.0,
        maximum=1.0,
        minimum_exclusive=True,
    )
    members_per_batch: int = setting(
        8,
        "members of one network passed through it together; fewer where the batch would exceed one 128^3 patch "
        "or their sums 2 GiB",
        minimum=1,
    )

    def __post_init__(self):
        check_fields(self, "the proposal settings")
        needing = [name for name in self.sources if SOURCES[name].uses_extra_networks]
        if needing and not self.extra_checkpoints and not self.other_folds:
            raise SettingsError(
                f"proposal source(s) {needing} need extra_checkpoints (paths of further checkpoint files) "
                "or other_folds"
            )

    @property
    def uses_extra_networks(self) -> bool:
        return any(SOURCES[name].uses_extra_networks for name in self.sources)

    def to_dict(self) -> dict:
        data = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ProposalSettings":
        """From a JSON object (the `proposals` setting, a store's manifest): unknown keys fail with the valid ones."""
        return apply_overrides(cls(), data, "the proposal settings")


def available_members(
    settings: ProposalSettings, mirror_axes: Optional[Sequence[int]], limit: int
) -> list[ProposalMember]:
    """The plain pass first, then members drawn round-robin from the sources, until `limit` or until the sources
    are spent (mirror flips and thresholds are finite, stochastic sources are not)."""
    mirror_axes = tuple(mirror_axes or ())
    members = [ProposalMember("plain")]
    generators = {source: SOURCES[source].members(settings, mirror_axes) for source in settings.sources}
    while len(members) < limit and generators:
        for source in list(generators):
            if len(members) >= limit:
                break
            member = next(generators[source], None)
            if member is None:
                del generators[source]
            else:
                members.append(member)
    return members


def plan_members(settings: ProposalSettings, mirror_axes: Optional[Sequence[int]]) -> list[ProposalMember]:
    """The plain pass first, then members drawn round-robin from the sources until K are planned."""
    members = available_members(settings, mirror_axes, settings.num_proposals)
    if len(members) < settings.num_proposals:
        raise ValueError(
            f"sources {list(settings.sources)} give at most {len(members)} proposals per case "
            f"(mirror axes {list(mirror_axes)}), but num_proposals={settings.num_proposals}: "
            "lower num_proposals or add a stochastic source (dropout, temperature)"
        )
    return members


def case_seed(base_seed: int, case_id: str) -> int:
    """A stable per-case seed (Python's hash() changes between processes)."""
    digest = hashlib.sha256(f"{base_seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
