"""Preference pairs as an nnU-Net dataset, so that nnU-Net's own data loader and augmentation serve them.

Each item is one (image, chosen, rejected) triple. The two masks ride as two segmentation channels through
nnU-Net's spatial transforms and deep-supervision downsampling, which keeps them aligned with the image.
Self-training items (chosen == rejected) can ride as one channel (`single_mask`), exactly nnU-Net's layout.
Unlabeled cases have no `class_locations`; we give the loader the voxels where the two masks disagree
instead, so its foreground oversampling becomes disagreement oversampling. A pair with a preference_region
other than "disagreement" trains on a rejected mask narrowed to the voxels that region keeps
(nnunet_rndpo.preference_region), before either of those is computed.

Reading patches, not cases: `load_case` returns arrays that nnU-Net's loader slices (`data[bbox]`, `seg[bbox]`
in `nnUNetDataLoader.generate_train_batch`): the image from the pool reader's blosc2 cache (or nnU-Net's own
preprocessed files), and a `PairSegmentation` that computes the masks, the narrowed rejected mask and the -1
outside the image on the slice only, from the proposals unpacked once per case into a memory-mapped .npy beside
the store (`<store>/unpacked/<case>/<fingerprint of the case file>/`; the judge's voxel probabilities of
"judge_voxels" pairs likewise, and each item's sampled locations). Every file there is written under a temporary
name and renamed; a rerun reuses them; files of a rewritten case file or that do not open are made again. The
voxels a pair's patches centre on are sampled one slab of the volume at a time, so that no step holds a whole
volume of a large case (the first unpacking of a case reads its compressed file whole, once).
"""

from __future__ import annotations

import hashlib
import shutil
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from nnunet_rndpo.atomic import atomic_path
from nnunet_rndpo.preference_region import preference_rejected
from nnunet_rndpo.proposals.pool import PoolReader
from nnunet_rndpo.proposals.store import ProposalStore, StoreError

# nnU-Net samples at most this many locations per class for oversampling; we do the same per pair.
MAX_LOCATIONS = 10_000
LOCATIONS_KEY = "disagreement"
UNPACKED_FOLDER = "unpacked"
# voxels per slab when a whole volume is walked (sampling locations): bounds the memory of that walk
SLAB_VOXELS = 1 << 21


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


def sample_locations_by_slab(
    region_of: Callable[[slice], np.ndarray],
    shape: Sequence[int],
    rng: np.random.Generator,
    limit: int = MAX_LOCATIONS,
    slab_voxels: Optional[int] = None,
) -> np.ndarray:
    """`sample_locations` of the region whose part in planes `s` of the first axis is `region_of(s)`, walking the
    volume one slab of at most `slab_voxels` voxels at a time: the same coordinates, in the same order, for the
    same rng state, without the whole region (or all its coordinates) in memory (slab_voxels: SLAB_VOXELS)."""
    planes = max(1, (slab_voxels or SLAB_VOXELS) // max(int(np.prod(shape[1:])), 1))
    slabs = [slice(start, min(start + planes, shape[0])) for start in range(0, shape[0], planes)]
    counts = [int(np.count_nonzero(region_of(slab))) for slab in slabs]
    total = sum(counts)
    picked = rng.choice(total, limit, replace=False) if total > limit else np.arange(total)
    order = np.argsort(picked, kind="stable")
    coordinates = np.zeros((len(picked), 1 + len(shape)), dtype=np.int64)
    first = 0  # running index of the slab's first True voxel
    position = 0  # next entry of `order` to fill
    for slab, count in zip(slabs, counts):
        stop = np.searchsorted(picked[order], first + count)
        if stop > position:
            # flat indices of the slab's True voxels (C order, as argwhere), unravelled only where picked
            found = np.flatnonzero(region_of(slab))[picked[order[position:stop]] - first]
            slab_shape = (slab.stop - slab.start, *shape[1:])
            coordinates[order[position:stop], 1:] = np.stack(np.unravel_index(found, slab_shape), axis=1)
            coordinates[order[position:stop], 1] += slab.start
            position = stop
        first += count
    return coordinates


class PairSegmentation:
    """The segmentation of one training item as nnU-Net's loader reads it: (channels, *spatial) int16, chosen mask
    (and, unless single_mask, the rejected mask narrowed by the item's preference region), -1 outside the image.
    Nothing is computed until it is sliced; a slice computes only its own voxels (every step is per voxel)."""

    dtype = np.dtype(np.int16)

    def __init__(self, item: TrainingItem, proposals, outside, single_mask: bool, judge_probabilities=None):
        self.item = item
        self.proposals = proposals
        self.outside = outside
        self.single_mask = single_mask
        self.judge_probabilities = judge_probabilities
        self.shape = (1 if single_mask else 2, *proposals.shape[1:])
        self.ndim = len(self.shape)

    def masks(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) int16 inside `box` (slices of the spatial axes), before the -1 outside the image;
        rejected is None with single_mask."""
        item = self.item
        if self.single_mask:
            return np.asarray(self.proposals[(item.chosen, *box)]).astype(np.int16), None
        # only the proposals the region reads: the pair itself, all of them for the votes of the other regions
        used_all = item.region not in ("disagreement", "judge_voxels")
        used = tuple(range(self.proposals.shape[0])) if used_all else (item.chosen, item.rejected)
        proposals = np.stack([np.asarray(self.proposals[(index, *box)]) for index in used])
        position = {index: at for at, index in enumerate(used)}
        judge = None
        if item.region == "judge_voxels":
            judge = np.asarray(self.judge_probabilities[(slice(None), *box)], dtype=np.float32)
        halves = [
            tuple(position[index] for index in half) if used_all else () for half in (item.top_half, item.bottom_half)
        ]
        rejected = preference_rejected(
            proposals, position[item.chosen], position[item.rejected], item.region, *halves, judge
        )
        return proposals[position[item.chosen]].astype(np.int16), rejected.astype(np.int16)

    def __getitem__(self, index) -> np.ndarray:
        channels, box, squeezed = _split_index(index, self.ndim)
        chosen, rejected = self.masks(box)
        # -1 outside the image's nonzero mask, as nnU-Net's preprocessing marks it (removed by its transforms)
        outside = np.asarray(self.outside[(0, *box)]) < 0
        chosen[outside] = -1
        if rejected is None:
            return chosen[None][(channels, *squeezed)]
        rejected[outside] = -1
        seg = np.stack([chosen, rejected])
        return seg[(channels, *squeezed)]

    def __array__(self, dtype=None, copy=None):
        seg = self[...]
        return seg if dtype is None else seg.astype(dtype)


def _split_index(index, ndim: int) -> tuple:
    """(channel index, spatial slices to compute, what to take of the computed block) of a basic numpy index."""
    index = index if isinstance(index, tuple) else (index,)
    if any(part is Ellipsis for part in index):
        at = next(i for i, part in enumerate(index) if part is Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (ndim - len(index))
    if len(index) != ndim:
        raise IndexError(f"too many indices for a {ndim}-dimensional segmentation: {index}")
    box, squeezed = [], []
    for part in index[1:]:
        if isinstance(part, slice) and part.step in (None, 1):
            box.append(part)
            squeezed.append(slice(None))
        elif isinstance(part, (int, np.integer)):
            box.append(slice(int(part), int(part) + 1) if part != -1 else slice(-1, None))
            squeezed.append(0)
        else:
            raise IndexError(f"a pair's segmentation takes slices (step 1) or integers, got {part!r}")
    return index[0], tuple(box), tuple(squeezed)


class UnpackedCases:
    """Memory-mappable copies of a store's cases under <store>/unpacked/<case>/<fingerprint>/, where the fingerprint
    names the case file's size and modification time: a rewritten case gets new files, the old folder is removed."""

    def __init__(self, store: ProposalStore):
        self.store = store
        self.folder = Path(store.folder) / UNPACKED_FOLDER

    def case_folder(self, case_id: str) -> Path:
        path = self.store.case_path(case_id)
        if not path.is_file():
            raise StoreError(f"case {case_id!r} is not in the proposal store {self.store.folder}")
        return self.folder / case_id / fingerprint(path)

    def proposals(self, case_id: str) -> np.ndarray:
        """(K, *spatial) uint8, memory-mapped."""
        return self._array(case_id, "proposals.npy", lambda: np.ascontiguousarray(self.store.load_proposals(case_id)))

    def judge_probabilities(self, judge_key: str, case_id: str) -> np.ndarray:
        """(num_classes, *spatial) float16 (as the store keeps them), memory-mapped."""
        name = f"voxels.{_safe(judge_key)}.{self.judge_fingerprint(judge_key, case_id)}.npy"
        return self._array(
            case_id, name, lambda: self.store.load_voxel_probabilities(judge_key, case_id).astype(np.float16)
        )

    def judge_fingerprint(self, judge_key: str, case_id: str) -> str:
        path = self.store.voxel_probabilities_path(judge_key, case_id)
        if not path.is_file():
            self.store.load_voxel_probabilities(judge_key, case_id)  # raises the store's error, naming what to do
        return fingerprint(path)

    def locations(self, case_id: str, item_name: str, version: str, make: Callable[[], dict]) -> dict:
        """The sampled locations of one item (`make()` on the first call), as {key: (N, 1 + dim) int64}; version:
        of what else they depend on (the judge's voxels), "-" for nothing."""
        item_hash = hashlib.sha1(item_name.encode()).hexdigest()[:20]
        path = self.case_folder(case_id) / f"locations.{item_hash}.{version}.npz"
        try:
            with np.load(path) as archive:
                return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError, KeyError):
            pass  # not made yet, or damaged: made again
        locations = make()
        self._write(path, lambda handle: np.savez(handle, **locations))
        return locations

    def _array(self, case_id: str, name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.case_folder(case_id) / name
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            pass  # not unpacked yet, or damaged: made again
        array = make()
        return np.load(path, mmap_mode="r") if self._write(path, lambda handle: np.save(handle, array)) else array

    def _write(self, path: Path, write: Callable) -> bool:
        """Write `path` atomically, first removing the folders of earlier versions of the case file; False (the
        caller keeps what it made in memory) where the store's folder cannot be written."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.parent.iterdir():
                if stale != path.parent and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            if path.name.count(".") == 3:  # <kind>.<name>.<version>.<ending>: earlier versions go
                kind_and_name, _, ending = path.name.rsplit(".", 2)
                for stale in path.parent.glob(f"{kind_and_name}.*.{ending}"):
                    if stale != path:
                        stale.unlink(missing_ok=True)
            with atomic_path(path) as temporary, open(temporary, "wb") as handle:
                write(handle)
        except PermissionError:
            return False
        return True


def fingerprint(path: Path) -> str:
    """A file's version: its size and modification time (ns)."""
    status = path.stat()
    return f"{status.st_size}-{status.st_mtime_ns}"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)


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
        `annotated_classes_key`); a proposal labels every voxel, so every voxel inside the image is listed.

        A store with a folder is unpacked beside it (`UnpackedCases`) and a reader with `open_case` gives lazy
        images; otherwise (hand-made stores and readers) cases are held in memory, `cache_cases` at most."""
        if not items:
            raise ValueError("no training items: every case of the pool yielded no preference pair")
        self.items = {item.key: item for item in items}
        self.identifiers = sorted(self.items)
        self.store = store
        self.reader = reader
        self.cache_cases = cache_cases
        self.single_mask = single_mask
        self.annotated_key = annotated_key
        self.unpacked = UnpackedCases(store) if getattr(store, "folder", None) is not None else None
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._locations: dict[str, dict] = {}  # per item: small (at most MAX_LOCATIONS coordinates)

    def __getstate__(self):
        # workers get a copy without the caches (open files, arrays of cases held in memory)
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        state["_locations"] = {}
        return state

    def prepare(self) -> None:
        """Unpack every case and sample every item's locations now (once, in this process), instead of in the
        loader's worker processes on first use."""
        for key in self.identifiers:
            self.load_case(key)

    def _case(self, case_id: str):
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            return self._cache[case_id]
        if hasattr(self.reader, "open_case"):
            data, outside, _ = self.reader.open_case(case_id)
        else:
            data, outside, _ = self.reader.load(case_id)
        if self.unpacked is not None:
            proposals = self.unpacked.proposals(case_id)
        else:
            proposals = self.store.load_case(case_id)["proposals"]  # a hand-made store (tests)
        if tuple(proposals.shape[1:]) != tuple(data.shape[1:]):
            raise ValueError(
                f"case {case_id}: proposals {proposals.shape[1:]} and image {data.shape[1:]} differ in shape"
            )
        entry = (data, outside, proposals, {})  # the last: the judge's voxel probabilities by key, when read
        self._cache[case_id] = entry
        while len(self._cache) > self.cache_cases:
            self._cache.popitem(last=False)
        return entry

    def _judge_probabilities(self, item: TrainingItem, judges: dict):
        if item.region != "judge_voxels":
            return None
        if item.voxel_judge_key not in judges:
            judges[item.voxel_judge_key] = (
                self.unpacked.judge_probabilities(item.voxel_judge_key, item.case_id)
                if self.unpacked is not None
                else self.store.load_voxel_probabilities(item.voxel_judge_key, item.case_id)
            )
        return judges[item.voxel_judge_key]

    def load_case(self, key: str):
        item = self.items[key]
        data, outside, proposals, judges = self._case(item.case_id)
        seg = PairSegmentation(item, proposals, outside, self.single_mask, self._judge_probabilities(item, judges))
        if key not in self._locations:
            if self.unpacked is None:
                self._locations[key] = self._sample_locations(key, seg)
            else:
                # the judge's voxels decide a judge_voxels pair's region: their version is part of the name
                voxels = (
                    self.unpacked.judge_fingerprint(item.voxel_judge_key, item.case_id)
                    if item.region == "judge_voxels"
                    else "-"
                )
                name = f"{key}|{item}|{self.single_mask}|{self.annotated_key}"
                self._locations[key] = self.unpacked.locations(
                    item.case_id, name, voxels, lambda: self._sample_locations(key, seg)
                )
        return data, seg, None, {"class_locations": self._renamed(self._locations[key])}

    def _renamed(self, locations: dict) -> dict:
        """The locations under the keys nnU-Net's loader looks up (the annotated key is a tuple of labels)."""
        return {self.annotated_key if key == "annotated" else key: value for key, value in locations.items()}

    def _sample_locations(self, key: str, seg: PairSegmentation) -> dict:
        """The pair's disagreeing voxels (self-training: the chosen mask's foreground) and, with an ignore label,
        the voxels inside the image; at most MAX_LOCATIONS each, one slab of the volume at a time."""
        item = self.items[key]
        shape = seg.shape[1:]
        rng = np.random.default_rng(zlib.crc32(key.encode()))

        def region_of(planes: slice) -> np.ndarray:
            box = (planes, *(slice(None),) * (len(shape) - 1))
            chosen, rejected = seg.masks(box)
            if item.chosen == item.rejected:
                return chosen > 0
            return chosen != (chosen if rejected is None else rejected)

        locations = {LOCATIONS_KEY: sample_locations_by_slab(region_of, shape, rng)}
        if self.annotated_key is not None:

            def inside(planes: slice) -> np.ndarray:
                return np.asarray(seg.outside[(0, planes)]) >= 0

            locations["annotated"] = sample_locations_by_slab(inside, shape, rng)
        return locations

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
