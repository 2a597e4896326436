"""One proposal member: which pass (or derivation) makes it, with its provenance. A plain value type that imports
nothing of the project: the sources (nnunet_rndpo/proposals/sources.py) make members, the plan
(nnunet_rndpo/proposals/plan.py) orders them, the store's manifest records them (`to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class ProposalMember:
    source: str  # a name in nnunet_rndpo/proposals/sources.py: SOURCES
    flip_axes: tuple[int, ...] = ()  # spatial axes flipped before the pass and flipped back after
    dropout_p: float = 0.0
    network_index: int = 0  # 0 = the base checkpoint, i = extra checkpoint i
    threshold: Optional[float] = None  # foreground when 1 - p(background) > threshold
    temperature: Optional[float] = None
    sample_index: int = 0  # n-th draw of a stochastic source

    def to_dict(self) -> dict:
        data = asdict(self)
        data["flip_axes"] = list(self.flip_axes)
        return data
