"""Preference pairs as an nnU-Net dataset, so that nnU-Net's own data loader and augmentation serve them.

Each item is one (image, chosen, rejected) triple. The two masks ride as two segmentation channels through
nnU-Net's spatial transforms and deep-supervision downsampling, which keeps them aligned with the image.
Self-training items (chosen == rejected) can ride as one channel (`single_mask`), exactly nnU-Net's layout.
Unlabeled cases have no `class_locations`; we give the loader the voxels where the two masks disagree
instead, so its foreground oversampling becomes disagreement oversampling. A pair with a preference_region
other than "disagreement" trains on a rejected mask narrowed to the voxels that region keeps
(nnunet_rndpo.preference_region), before either of those is computed.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from nnunet_rndpo.preference_region import preference_rejected
from nnunet_rndpo.proposals.pool import PoolReader
from nnunet_rndpo.proposals.store import ProposalStore

# nnU-Net samples at most this many locations per class for oversampling; we do the same per pair.
MAX_LOCATIONS = 10_000
LOCATIONS_KEY = "disagreement"


@dataclass(frozen=True)
class TrainingItem:
    """One training example: a case and the indices of its chosen and rejected proposals.

    For self-training, rejected == chosen and patches are centred on the chosen mask's foreground.
    region: the preference_region that narrows the rejected mask ("disagreement": the proposal as it is);
    top_half / bottom_half: the judge's halves of the case's proposals, which "ranked_consensus" reads;
    voxel_judge_key: under which key the store holds the judge's per-voxel probabilities ("judge_voxels").
    """

    case_id: str
    chosen: int
    rejected: int
    region: str = "disagreement"
    top_half: tuple[int, ...] = ()
    bottom_half: tuple[int, ...] = ()
    voxel_judge_key: str = ""

    @classmethod
    def from_record(cls, item: dict) -> "TrainingItem":
        """One item of a pairs file (nnunet_rndpo.pipeline.pairs_record)."""
        return cls(
            item["case_id"],
            item["chosen"],
            item["rejected"],
            item.get("preference_region", "disagreement"),
            tuple(item.get("top_half", ())),
            tuple(item.get("bottom_half", ())),
            item.get("voxel_judge_key", ""),
        )

    @property
    def key(self) -> str:
        return f"{self.case_id}::{self.chosen}>{self.rejected}"


def sample_locations(region: np.ndarray, rng: np.random.Generator, limit: int = MAX_LOCATIONS) -> np.ndarray:
    """(N, 1 + dim) coordinates of True voxels (leading channel index 0, as nnU-Net stores them)."""
    coordinates = np.argwhere(region)
    if len(coordinates) > limit:
        coordinates = coordinates[rng.choice(len(coordinates), limit, replace=False)]
    return np.concatenate([np.zeros((len(coordinates), 1), dtype=coordinates.dtype), coordinates], axis=1)


class PairDataset:
    """Duck-types nnU-Net's dataset interface (`identifiers`, `load_case`) for the pair data loader."""

    def __init__(
        self,
        items: Sequence[TrainingItem],
        store: ProposalStore,
        reader: PoolReader,
        cache_cases: int = 16,
        single_mask: bool = False,
        annotated_key: Optional[tuple] = None,
    ):
        """single_mask: the segmentation holds only the chosen mask (self-training: nnU-Net's one channel, so
        that its transforms and loss do exactly what they do in supervised training). annotated_key: for datasets
        with an ignore label, nnU-Net's loader centres unforced patches on the voxels listed under this key (its
        `annotated_classes_key`); a proposal labels every voxel, so every voxel inside the image is listed."""
        if not items:
            raise ValueError("no training items: every case of the pool yielded no preference pair")
        self.items = {item.key: item for item in items}
        self.identifiers = sorted(self.items)
        self.store = store
        self.reader = reader
        self.cache_cases = cache_cases
        self.single_mask = single_mask
        self.annotated_key = annotated_key
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._locations: dict[str, dict] = {}  # per item: small (at most MAX_LOCATIONS coordinates)

    def __getstate__(self):
        # workers get a copy without the caches (the case cache can be large)
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        state["_locations"] = {}
        return state

    def _case(self, case_id: str):
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            return self._cache[case_id]
        data, outside, _ = self.reader.load(case_id)
        proposals = self.store.load_case(case_id)["proposals"]
        if proposals.shape[1:] != data.shape[1:]:
            raise ValueError(
                f"case {case_id}: proposals {proposals.shape[1:]} and image {data.shape[1:]} differ in shape"
            )
        entry = (data, outside, proposals)
        self._cache[case_id] = entry
        while len(self._cache) > self.cache_cases:
            self._cache.popitem(last=False)
        return entry

    def load_case(self, key: str):
        item = self.items[key]
        data, outside, proposals = self._case(item.case_id)
        chosen = proposals[item.chosen].astype(np.int16)
        if self.single_mask:
            rejected = chosen
        else:
            judge_probabilities = (
                self.store.load_voxel_probabilities(item.voxel_judge_key, item.case_id)
                if item.region == "judge_voxels"
                else None
            )
            rejected = preference_rejected(
                proposals, item.chosen, item.rejected, item.region, item.top_half, item.bottom_half, judge_probabilities
            )
            rejected = rejected.astype(np.int16)
        if key not in self._locations:
            # an argwhere over the whole volume: once per item, not once per patch
            region = chosen != rejected if item.chosen != item.rejected else chosen > 0
            rng = np.random.default_rng(zlib.crc32(key.encode()))
            self._locations[key] = {LOCATIONS_KEY: sample_locations(region, rng)}
            if self.annotated_key is not None:
                self._locations[key][self.annotated_key] = sample_locations(outside[0] >= 0, rng)
        locations = self._locations[key]
        # -1 outside the image's nonzero mask, as nnU-Net's preprocessing marks it (removed by its transforms)
        outside_mask = outside[0] < 0
        chosen[outside_mask] = -1
        rejected[outside_mask] = -1
        seg = chosen[None] if self.single_mask else np.stack([chosen, rejected])
        return data, seg, None, {"class_locations": locations}

    def __getitem__(self, key: str):
        return self.load_case(key)


def pair_loader(
    dataset: PairDataset,
    batch_size: int,
    initial_patch_size,
    patch_size,
    label_manager,
    disagreement_sampling: float,
    transforms,
):
    """nnU-Net's own data loader over the pairs. Each patch is centred on a disagreeing voxel with probability
    `disagreement_sampling` (nnU-Net's probabilistic oversampling): its default rule, the last
    round(batch * p) patches of a batch, makes every p in [0.25, 0.75) one patch of two."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    return nnUNetDataLoader(
        dataset,
        batch_size,
        initial_patch_size,
        patch_size,
        label_manager,
        oversample_foreground_percent=disagreement_sampling,
        sampling_probabilities=None,
        pad_sides=None,
        transforms=transforms,
        probabilistic_oversampling=True,
    )


def annotated_key(label_manager) -> Optional[tuple]:
    """nnU-Net's `annotated_classes_key` when the dataset has an ignore label (see PairDataset), else None."""
    return tuple([-1] + label_manager.all_labels) if label_manager.has_ignore_label else None
