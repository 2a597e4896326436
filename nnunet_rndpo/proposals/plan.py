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

from nnunet_rndpo.proposals.dropout import DROPOUT_LOCATIONS, DROPOUT_MODES
from nnunet_rndpo.proposals.members import ProposalMember
from nnunet_rndpo.proposals.sources import SOURCES


@dataclass(frozen=True)
class ProposalSettings:
    num_proposals: int = 8
    sources: tuple[str, ...] = ("tta",)
    dropout_p: float = 0.2
    dropout_location: str = "bottleneck"
    dropout_mode: str = "element"
    thresholds: tuple[float, ...] = (0.3, 0.7)
    temperature: float = 2.0
    temperature_smoothing_voxels: float = 2.0
    extra_checkpoints: tuple[str, ...] = ()
    # add the base's sibling fold models (same trainer folder and checkpoint name) to extra_checkpoints: models
    # trained on other data, whose disagreement carries information that one model's mirror members lack
    other_folds: bool = False
    seed: int = 0
    tile_step_size: float = 0.5
    members_per_batch: int = 8

    def __post_init__(self):
        valid = [name for name, source in SOURCES.items() if source.selectable]
        unknown = [s for s in self.sources if s not in valid]
        if unknown:
            raise ValueError(f"unknown proposal source(s) {unknown}; valid: {', '.join(valid)}")
        if self.num_proposals < 2:
            raise ValueError(f"num_proposals must be at least 2 (pairs need two masks), got {self.num_proposals}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in [0, 1), got {self.dropout_p}")
        if self.dropout_location not in DROPOUT_LOCATIONS:
            raise ValueError(f"dropout_location {self.dropout_location!r}; valid: {', '.join(DROPOUT_LOCATIONS)}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode {self.dropout_mode!r}; valid: {', '.join(DROPOUT_MODES)}")
        if any(not 0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must lie in (0, 1), got {self.thresholds}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.tile_step_size <= 1.0:
            raise ValueError(f"tile_step_size must lie in (0, 1], got {self.tile_step_size}")
        needing = [name for name in self.sources if SOURCES[name].uses_extra_networks]
        if needing and not self.extra_checkpoints and not self.other_folds:
            raise ValueError(
                f"source(s) {needing} need extra_checkpoints (paths of further checkpoint files) or other_folds"
            )
        if self.members_per_batch < 1:
            raise ValueError("members_per_batch must be >= 1")

    @property
    def uses_extra_networks(self) -> bool:
        return any(SOURCES[name].uses_extra_networks for name in self.sources)

    def to_dict(self) -> dict:
        data = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ProposalSettings":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown proposal setting(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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
