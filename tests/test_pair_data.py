"""Pairs through nnU-Net's own data loader and augmentation: masks stay aligned with the image, deep
supervision gets both masks at every scale, and patches favour the disagreement region."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunet_rndpo.proposals.store import StoreError
from nnunet_rndpo.training.pair_data import LOCATIONS_KEY, PairDataset, TrainingItem, sample_locations

SHAPE = (48, 48, 48)


class FakeStore:
    """Two proposals: a cube (chosen) and the same cube grown by 2 voxels on one side (rejected)."""

    def __init__(self):
        chosen = np.zeros(SHAPE, np.uint8)
        chosen[16:32, 16:32, 16:32] = 1
        rejected = chosen.copy()
        rejected[16:32, 16:32, 32:34] = 1
        self.proposals = np.stack([chosen, rejected])

    def load_case(self, case_id):
        return {"proposals": self.proposals}


class FakeReader:
    """The image is the chosen mask itself (plus a constant), so alignment can be read off the batch."""

    def __init__(self, store):
        self.image = store.proposals[0][None].astype(np.float32) * 2.0 + 1.0
        self.outside = np.zeros((1, *SHAPE), np.int8)

    def load(self, case_id):
        return self.image, self.outside, {}


def make_loader(oversample: float, transforms=None, patch=(32, 32, 32), initial=(32, 32, 32)):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 1)], store, FakeReader(store))
    labels = LabelManager({"background": 0, "thing": 1}, regions_class_order=None)
    return nnUNetDataLoader(
        dataset, 2, initial, patch, labels, oversample_foreground_percent=oversample, transforms=transforms
    )


def test_sample_locations_has_nnunets_layout():
    region = np.zeros((4, 4, 4), bool)
    region[1, 2, 3] = True
    locations = sample_locations(region, np.random.default_rng(0))
    assert locations.tolist() == [[0, 1, 2, 3]]  # leading channel index, as nnU-Net stores class_locations


def test_load_case_gives_two_mask_channels_and_disagreement_locations():
    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 1)], store, FakeReader(store))
    data, seg, seg_prev, properties = dataset.load_case("case::0>1")
    assert seg.shape == (2, *SHAPE) and seg_prev is None
    assert (seg[0] == store.proposals[0]).all() and (seg[1] == store.proposals[1]).all()
    coordinates = properties["class_locations"][LOCATIONS_KEY][:, 1:]
    assert len(coordinates) == 16 * 16 * 2
    assert all(store.proposals[0][tuple(c)] != store.proposals[1][tuple(c)] for c in coordinates)


def test_no_items_is_a_clear_error():
    store = FakeStore()
    with pytest.raises(ValueError, match="no preference pair"):
        PairDataset([], store, FakeReader(store))


def test_forced_patches_contain_the_disagreement_region():
    torch.manual_seed(0)
    np.random.seed(0)
    loader = make_loader(oversample=1.0)
    for _ in range(10):
        batch = loader.generate_train_batch()
        target = batch["target"]
        assert target.shape == (2, 2, 32, 32, 32)
        for sample in target:
            assert (sample[0] != sample[1]).any(), "a forced patch must hold disagreeing voxels"


def test_masks_stay_aligned_with_the_image_through_nnunets_augmentation():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    np.random.seed(1)
    torch.manual_seed(1)
    patch = (32, 32, 32)
    scales = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    transforms = nnUNetTrainer.get_training_transforms(
        patch,
        (-0.5, 0.5),
        scales,
        (0, 1, 2),
        False,
        use_mask_for_norm=[False],
        is_cascaded=False,
        foreground_labels=[1],
        regions=None,
        ignore_label=None,
    )
    loader = make_loader(oversample=1.0, transforms=transforms, patch=patch, initial=(44, 44, 44))
    for _ in range(5):
        batch = loader.generate_train_batch()
        targets = batch["target"]
        assert [tuple(t.shape) for t in targets] == [(2, 2, 32, 32, 32), (2, 2, 16, 16, 16), (2, 2, 8, 8, 8)]
        for data, chosen in zip(batch["data"], targets[0][:, 0]):
            inside = chosen > 0
            if inside.sum() < 50 or (~inside).sum() < 50:
                continue
            # the image is bright where the chosen mask is: intensity augmentation changes values, not places
            assert data[0][inside].mean() > data[0][~inside].mean()
        # the rejected mask only ever adds voxels to the chosen one (as built), at every scale
        for target in targets:
            assert ((target[:, 0] > 0) <= (target[:, 1] > 0)).all()


def test_single_mask_gives_nnunets_one_channel_layout():
    """Self-training: the chosen mask alone, as nnU-Net's supervised loader gives a label map."""
    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 0)], store, FakeReader(store), single_mask=True)
    data, seg, _, properties = dataset.load_case("case::0>0")
    assert seg.shape == (1, *SHAPE) and (seg[0] == store.proposals[0]).all()
    # patches centre on the chosen mask's foreground
    coordinates = properties["class_locations"][LOCATIONS_KEY][:, 1:]
    assert len(coordinates) and all(store.proposals[0][tuple(c)] == 1 for c in coordinates)


def test_disagreement_sampling_means_the_fraction_of_patches_it_names():
    # nnU-Net's default rule forces the last round(batch * p) patches: with batch 2, p = 0.67 forced one of two
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_rndpo.training.pair_data import pair_loader

    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 1)], store, FakeReader(store))
    labels = LabelManager({"background": 0, "thing": 1}, regions_class_order=None)
    np.random.seed(0)
    for fraction in (0.33, 0.67, 0.9):
        loader = pair_loader(dataset, 2, (32, 32, 32), (32, 32, 32), labels, fraction, None)
        forced = [loader.get_do_oversample(index % 2) for index in range(4000)]
        assert np.mean(forced) == pytest.approx(fraction, abs=0.03)


def test_a_dataset_with_an_ignore_label_gives_batches():
    # nnU-Net's loader looks unforced patches up under its annotated-classes key when an ignore label exists
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_rndpo.training.pair_data import annotated_key, pair_loader

    labels = LabelManager({"background": 0, "thing": 1, "ignore": 2}, regions_class_order=None)
    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 1)], store, FakeReader(store), annotated_key=annotated_key(labels))
    np.random.seed(0)
    loader = pair_loader(dataset, 2, (32, 32, 32), (32, 32, 32), labels, 0.5, None)
    for _ in range(5):
        batch = loader.generate_train_batch()
        assert batch["target"].shape == (2, 2, 32, 32, 32)
    assert annotated_key(LabelManager({"background": 0, "thing": 1}, regions_class_order=None)) is None


# ---------------------------------------------------------------- patches, not whole cases
REGIONS = ("disagreement", "majority", "ranked_consensus", "judge_voxels")


def random_case(shape=(20, 24, 22), count=4, seed=0):
    """K proposals of two labels (noisy boxes), judge probabilities and an outside rim, all random."""
    rng = np.random.default_rng(seed)
    proposals = np.zeros((count, *shape), np.uint8)
    for proposal in proposals:
        proposal[3 : shape[0] - 4, 4:18, 2:17] = 1
        proposal[rng.random(shape) < 0.15] = 2
        proposal[rng.random(shape) < 0.1] = 0
    judge = rng.random((3, *shape)).astype(np.float16)
    outside = np.zeros((1, *shape), np.int8)
    outside[0, :, :2] = -1
    return proposals, judge, outside


def whole_volume_masks(proposals, judge, outside, item, single_mask):
    """The computation before patches: whole volumes, then -1 outside."""
    from nnunet_rndpo.preference_region import preference_rejected

    chosen = proposals[item.chosen].astype(np.int16)
    if single_mask:
        rejected = chosen
    else:
        probabilities = judge.astype(np.float32) if item.region == "judge_voxels" else None
        rejected = preference_rejected(
            proposals, item.chosen, item.rejected, item.region, item.top_half, item.bottom_half, probabilities
        ).astype(np.int16)
    chosen[outside[0] < 0] = -1
    rejected[outside[0] < 0] = -1
    return chosen[None] if single_mask else np.stack([chosen, rejected])


def items_of_every_region():
    return [TrainingItem("case", 0, 1, region, (0, 2), (1, 3), "atlas") for region in REGIONS]


def test_a_patch_of_the_pair_segmentation_is_that_patch_of_the_whole_volume():
    from nnunet_rndpo.training.pair_data import PairSegmentation

    proposals, judge, outside = random_case()
    boxes = [
        (slice(0, 20), slice(0, 24), slice(0, 22)),
        (slice(5, 9), slice(0, 3), slice(10, 22)),
        (slice(19, 20),) * 3,
    ]
    for item, single in [(item, False) for item in items_of_every_region()] + [(TrainingItem("case", 2, 2), True)]:
        seg = PairSegmentation(item, proposals, outside, single, judge)
        whole = whole_volume_masks(proposals, judge, outside, item, single)
        assert seg.shape == whole.shape and seg.dtype == np.int16
        for box in boxes:
            assert np.array_equal(seg[(slice(None), *box)], whole[(slice(None), *box)]), (item.region, box)
        assert np.array_equal(seg[0], whole[0]) and np.array_equal(seg[..., 3], whole[..., 3])
        assert np.array_equal(np.asarray(seg), whole)


@pytest.mark.parametrize("size", [0, 5, 9_999, 10_000, 10_001, 30_000])
def test_sampling_by_slab_gives_the_whole_volumes_locations(size):
    from nnunet_rndpo.training.pair_data import sample_locations_by_slab

    rng = np.random.default_rng(size)
    region = np.zeros(40 * 30 * 50, bool)
    region[rng.choice(region.size, size, replace=False)] = True
    region = region.reshape(40, 30, 50)
    whole_rng = np.random.default_rng(7)
    expected = sample_locations(region, whole_rng)
    next_draw = whole_rng.random()  # the annotated locations draw next from the same rng
    for slab_voxels in (1, 1_500, 7_000, 10**7):  # one plane, one plane, four planes, everything
        slab_rng = np.random.default_rng(7)
        found = sample_locations_by_slab(lambda planes: region[planes], region.shape, slab_rng, slab_voxels=slab_voxels)
        assert np.array_equal(found, expected) and found.dtype == expected.dtype
        assert slab_rng.random() == next_draw


def make_store(tmp_path, proposals, judge=None, case_id="case"):
    from nnunet_rndpo.proposals.store import ProposalStore

    store = ProposalStore(tmp_path / "store").open({"members": [{"source": "tta"}] * len(proposals)})
    store.save_case(case_id, proposals, np.zeros((2, *proposals.shape[1:]), np.float32), 0)
    if judge is not None:
        store.save_voxel_probabilities("atlas", case_id, judge)
    return store


class ArrayReader:
    """A pool reader of hand-made arrays with the PoolReader's lazy `open_case`."""

    def __init__(self, data, outside):
        self.data, self.outside = data, outside

    def open_case(self, case_id):
        return self.data, self.outside, {}


class InMemoryStore:
    """A store without a folder: PairDataset holds its cases in memory (the behaviour before patches)."""

    def __init__(self, store):
        self.store = store

    def load_case(self, case_id):
        return self.store.load_case(case_id)

    def load_voxel_probabilities(self, key, case_id):
        return self.store.load_voxel_probabilities(key, case_id)


def test_batches_from_unpacked_cases_equal_those_from_whole_cases_in_memory(tmp_path):
    """The same seeds give the same batches, every region, with an ignore label: the patches read from the
    memory-mapped proposals equal the patches of the whole-volume computation."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_rndpo.training.pair_data import annotated_key, pair_loader

    proposals, judge, outside = random_case()
    store = make_store(tmp_path, proposals, judge)
    data = np.random.default_rng(1).random((1, *proposals.shape[1:]), dtype=np.float32)
    labels = LabelManager({"background": 0, "a": 1, "b": 2, "ignore": 3}, regions_class_order=None)
    batches = {}
    for mode, used_store, reader in [
        ("memory", InMemoryStore(store), FakeArrayReader(data, outside)),
        ("unpacked", store, ArrayReader(data, outside)),
    ]:
        dataset = PairDataset(items_of_every_region(), used_store, reader, annotated_key=annotated_key(labels))
        assert (dataset.unpacked is None) == (mode == "memory")
        loader = pair_loader(dataset, 2, (16, 16, 16), (16, 16, 16), labels, 0.5, None)
        np.random.seed(3)
        batches[mode] = [loader.generate_train_batch() for _ in range(8)]
    for memory, unpacked in zip(batches["memory"], batches["unpacked"]):
        assert list(memory["keys"]) == list(unpacked["keys"])
        assert torch.equal(memory["data"], unpacked["data"]) and torch.equal(memory["target"], unpacked["target"])


class FakeArrayReader:
    """A reader with `load` only (no lazy `open_case`): whole arrays, as hand-made readers give."""

    def __init__(self, data, outside):
        self.data, self.outside = data, outside

    def load(self, case_id):
        return self.data, self.outside, {}


def test_unpacked_files_are_reused_rebuilt_when_damaged_and_replaced_when_the_case_changes(tmp_path):
    proposals, judge, outside = random_case()
    store = make_store(tmp_path, proposals, judge)
    data = np.zeros((1, *proposals.shape[1:]), np.float32)
    item = TrainingItem("case", 0, 1, "judge_voxels", voxel_judge_key="atlas")

    def loaded(expected_reads):
        calls = []
        original = store.load_proposals
        store.load_proposals = lambda case_id: calls.append(case_id) or original(case_id)
        try:
            dataset = PairDataset([item], store, ArrayReader(data, outside))
            _, seg, _, properties = dataset.load_case(item.key)
            result = np.asarray(seg), properties["class_locations"]["disagreement"]
        finally:
            store.load_proposals = original
        assert len(calls) == expected_reads
        return result

    first_seg, first_locations = loaded(expected_reads=1)
    assert np.array_equal(first_seg, whole_volume_masks(proposals, judge, outside, item, False))
    folder = tmp_path / "store" / "unpacked" / "case"
    (version,) = folder.iterdir()
    assert sorted(p.name.split(".")[0] for p in version.iterdir()) == ["locations", "proposals", "voxels"]
    # a rerun reads the unpacked files (no store read, same locations)
    seg, locations = loaded(expected_reads=0)
    assert np.array_equal(seg, first_seg) and np.array_equal(locations, first_locations)
    # damaged files are made again
    (version / "proposals.npy").write_bytes(b"\x93NUMPY broken")
    for path in version.glob("locations.*"):
        path.write_bytes(b"PK broken")
    seg, locations = loaded(expected_reads=1)
    assert np.array_equal(seg, first_seg) and np.array_equal(locations, first_locations)
    # a rewritten case file: new files in a folder of its own, the old folder removed
    changed = proposals.copy()
    changed[1] = 0
    os.utime(store.case_path("case"), ns=(1, 1))  # a time of its own even on a coarse clock
    store.save_case("case", changed, np.zeros((2, *proposals.shape[1:]), np.float32), 0)
    seg, _ = loaded(expected_reads=1)
    assert np.array_equal(seg, whole_volume_masks(changed, judge, outside, item, False))
    assert [p.name for p in folder.iterdir()] != [version.name] and len(list(folder.iterdir())) == 1
    # the judge scored again: its new voxel probabilities replace the old ones, and so do the item's locations
    rescored = judge.copy()
    rescored[2] = 1 - rescored[2]
    os.utime(store.voxel_probabilities_path("atlas", "case"), ns=(1, 1))
    store.save_voxel_probabilities("atlas", "case", rescored)
    seg, _ = loaded(expected_reads=0)
    assert np.array_equal(seg, whole_volume_masks(changed, rescored, outside, item, False))
    (version,) = folder.iterdir()
    assert len(list(version.glob("voxels.*"))) == 1 and len(list(version.glob("locations.*"))) == 1
    assert not list((tmp_path / "store").rglob("*.partial"))
    with pytest.raises(StoreError, match="case 'other' is not in the proposal store"):
        PairDataset([TrainingItem("other", 0, 1)], store, ArrayReader(data, outside)).load_case("other::0>1")


def test_a_patch_load_of_a_large_case_reads_only_a_bounded_part_of_it(tmp_path, monkeypatch):
    """After a case is unpacked, sampling an item's locations walks the volume a slab at a time and each batch
    reads patches: the memory allocated stays far below one volume of the case."""
    import tracemalloc

    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_rndpo.proposals.pool import CasePool
    from nnunet_rndpo.training import pair_data
    from nnunet_rndpo.training.pair_data import pair_loader
    from tests.test_pool_cache import CountingReader

    shape = (160, 160, 160)
    proposals = np.zeros((4, *shape), np.uint8)
    proposals[:, 20:120, 20:120, 20:120] = 1
    proposals[1, 20:120, 20:120, 120:122] = 1  # 20,000 voxels differ
    proposals[2, 30:60] = 2  # 768,000 voxels differ
    store = make_store(tmp_path, proposals)
    data = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    outside = np.zeros((1, *shape), np.int8)
    monkeypatch.setattr(CountingReader, "_preprocess", lambda self, case_id: (data, outside, {}))
    pool = CasePool("Dataset999_X", "imagesUnlabeled", ["case"], cache_folder=tmp_path / "cache")
    reader = CountingReader(pool, None, SimpleNamespace(patch_size=(32, 32, 32)), {"channel_names": {"0": "CT"}})
    monkeypatch.setattr(pair_data, "SLAB_VOXELS", 160 * 160 * 4)
    items = [TrainingItem("case", 0, 1), TrainingItem("case", 0, 2, "majority")]
    dataset = PairDataset(items, store, reader)
    dataset.unpacked.proposals("case")  # unpacking reads the compressed case whole, once
    reader.open_case("case")  # and the pool cache is written once
    labels = LabelManager({"background": 0, "a": 1, "b": 2}, regions_class_order=None)
    loader = pair_loader(dataset, 2, (32, 32, 32), (32, 32, 32), labels, 0.5, None)
    volume_bytes = data.nbytes  # one channel of the case, float32: 16 MB
    tracemalloc.start()
    try:
        dataset.prepare()  # every item's locations, a slab at a time
        for _ in range(4):
            batch = loader.generate_train_batch()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batch["target"].shape == (2, 2, 32, 32, 32)
    assert peak < volume_bytes / 4, f"{peak / 1e6:.1f} MB allocated, a volume is {volume_bytes / 1e6:.1f} MB"


def test_a_worker_gets_a_pickled_dataset_without_open_files_that_reads_the_same_patches(tmp_path):
    import pickle

    proposals, judge, outside = random_case()
    store = make_store(tmp_path, proposals, judge)
    data = np.random.default_rng(1).random((1, *proposals.shape[1:]), dtype=np.float32)
    dataset = PairDataset(items_of_every_region(), store, ArrayReader(data, outside))
    dataset.prepare()
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._cache == {} and copy._locations == {}
    box = (slice(None), slice(2, 12), slice(5, 20), slice(0, 9))
    for key in dataset.identifiers:
        _, seg, _, properties = dataset.load_case(key)
        _, copied_seg, _, copied_properties = copy.load_case(key)
        assert np.array_equal(seg[box], copied_seg[box])
        assert np.array_equal(
            properties["class_locations"][LOCATIONS_KEY], copied_properties["class_locations"][LOCATIONS_KEY]
        )
