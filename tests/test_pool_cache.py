"""The pool reader's cache of imagesUnlabeled cases: nnU-Net's blosc2 layout, written atomically, read lazily,
reused by a rerun, rebuilt when damaged; the .npz cache of earlier versions converted once."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from nnunet_rndpo.proposals.pool import CasePool, OutsideMarks, PoolReader

SHAPE = (20, 24, 28)


def case_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    data = rng.random((1, *SHAPE), dtype=np.float32)
    seg = np.zeros((1, *SHAPE), np.int8)
    seg[0, :3] = -1  # outside the image's nonzero mask
    return data, seg, {"spacing": (1.0, 1.0, 1.0), "seed": seed}


class CountingReader(PoolReader):
    """A PoolReader whose preprocessing is the hand-made arrays above, counted."""

    preprocessed = 0

    def _preprocess(self, case_id):
        type(self).preprocessed += 1
        return case_arrays(int(case_id.split("_")[1]))


def reader_for(tmp_path, case_ids=("case_0", "case_1")) -> CountingReader:
    pool = CasePool("Dataset999_X", "imagesUnlabeled", list(case_ids), cache_folder=tmp_path / "cache")
    configuration = SimpleNamespace(patch_size=(16, 16, 16))
    return CountingReader(pool, None, configuration, {"channel_names": {"0": "MR"}})


def test_cache_is_nnunets_blosc2_layout_read_lazily_and_reused(tmp_path):
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    CountingReader.preprocessed = 0
    reader = reader_for(tmp_path)
    data, seg, properties = reader.open_case("case_0")
    assert isinstance(data, blosc2.NDArray) and isinstance(seg, blosc2.NDArray)
    expected_data, expected_seg, expected_properties = case_arrays(0)
    assert np.array_equal(data[(slice(None), slice(2, 9), slice(0, 5), slice(3, 4))], expected_data[:, 2:9, :5, 3:4])
    assert properties == expected_properties
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["case_0.b2nd", "case_0.pkl", "case_0_seg.b2nd"]
    # nnU-Net's own dataset class reads it
    _, nnunet_seg, _, _ = nnUNetDatasetBlosc2(str(cache), ["case_0"]).load_case("case_0")
    assert np.array_equal(nnunet_seg[:], expected_seg)
    # `load` gives whole arrays as before; a new reader (a rerun) reuses the cache
    loaded = reader_for(tmp_path).load("case_0")
    assert np.array_equal(loaded[0], expected_data) and np.array_equal(loaded[1], expected_seg)
    assert loaded[0].dtype == np.float32 and loaded[1].dtype == np.int8
    assert CountingReader.preprocessed == 1
    # picklable for worker processes, without open files
    assert pickle.loads(pickle.dumps(reader)).load("case_0")[2] == expected_properties


@pytest.mark.parametrize("damage", ["garbage data", "missing seg", "shape"])
def test_a_damaged_entry_is_made_again(tmp_path, damage):
    CountingReader.preprocessed = 0
    reader = reader_for(tmp_path)
    reader.open_case("case_0")
    cache = tmp_path / "cache"
    if damage == "garbage data":
        (cache / "case_0.b2nd").write_bytes(b"not blosc2 at all")
    elif damage == "missing seg":
        (cache / "case_0_seg.b2nd").unlink()
    else:  # the seg of another case with another shape
        import blosc2

        (cache / "case_0_seg.b2nd").unlink()
        blosc2.asarray(np.zeros((1, 5, 5, 5), np.int8), urlpath=str(cache / "case_0_seg.b2nd"))
    data, seg, _ = reader_for(tmp_path).load("case_0")
    assert np.array_equal(data, case_arrays(0)[0]) and np.array_equal(seg, case_arrays(0)[1])
    assert CountingReader.preprocessed == 2


def test_the_npz_cache_of_earlier_versions_is_converted_once(tmp_path):
    CountingReader.preprocessed = 0
    cache = tmp_path / "cache"
    cache.mkdir()
    data, seg, properties = case_arrays(1)
    np.savez_compressed(cache / "case_1.npz", data=data, seg=seg)
    (cache / "case_1.pkl").write_bytes(pickle.dumps(properties))
    loaded = reader_for(tmp_path).load("case_1")
    assert np.array_equal(loaded[0], data) and loaded[2] == properties
    assert CountingReader.preprocessed == 0
    assert sorted(p.name for p in cache.iterdir()) == ["case_1.b2nd", "case_1.pkl", "case_1_seg.b2nd"]


def test_a_killed_writers_temporary_folder_is_removed_and_a_live_ones_kept(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = cache / f".case_1.pid{int(finished.stdout)}.abc.writing"
    live = cache / f".case_0.pid{os.getpid()}.def.writing"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "case.b2nd").write_bytes(b"half")
    reader_for(tmp_path).open_case("case_1")
    assert live.is_dir() and not dead.exists()


def test_outside_marks_hide_the_labels_and_read_only_the_slice():
    seg = np.zeros((1, 6, 6, 6), np.int16)
    seg[0, 0] = -1
    seg[0, 3, 3, 3] = 2  # a label: hidden
    marks = OutsideMarks(seg)
    assert marks.shape == (1, 6, 6, 6) and marks.dtype == np.int8
    patch = marks[(slice(None), slice(0, 4), slice(2, 5), slice(2, 5))]
    assert patch.shape == (1, 4, 3, 3) and patch.dtype == np.int8
    assert (patch[0, 0] == -1).all() and (patch[0, 1:] == 0).all()


def test_labeled_cases_are_read_from_nnunets_preprocessed_folder_lazily_with_their_labels_hidden(tmp_path):
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    data, _, _ = case_arrays(2)
    seg = np.zeros((1, *SHAPE), np.int16)
    seg[0, :3] = -1
    seg[0, 8:12, 8:12, 8:12] = 2  # a true label: hidden from the pool reader
    folder = tmp_path / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    blocks, chunks = comp_blosc2_params(data.shape, (16, 16, 16), 4)
    nnUNetDatasetBlosc2.save_case(data, seg, {"p": 1}, str(folder / "case_2"), chunks, blocks)
    pool = CasePool("Dataset999_X", "training cases", ["case_2"], preprocessed_folder=folder, in_sample=True)
    reader = PoolReader(pool, None, SimpleNamespace(patch_size=(16, 16, 16)), {"channel_names": {"0": "MR"}})
    lazy_data, outside, properties = reader.open_case("case_2")
    assert isinstance(lazy_data, blosc2.NDArray) and isinstance(outside, OutsideMarks) and properties == {"p": 1}
    loaded_data, loaded_outside, _ = reader.load("case_2")
    assert np.array_equal(loaded_data, data)
    assert np.array_equal(loaded_outside, np.where(seg < 0, -1, 0)) and loaded_outside.dtype == np.int8
    assert not (tmp_path / "cache").exists()  # nothing cached: nnU-Net's files are read in place
