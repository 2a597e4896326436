"""Data-loading seconds per training iteration: the pair loader against nnU-Net's own loader on the same cases,
side by side in one run (issue 29, item 4).

The script makes its cases itself, per size (`--sizes`, e.g. 256 for 256^3 voxels and hippocampus for 40 x 56 x
40): an image (float32, one channel) with a label map of two classes, written as nnU-Net's preprocessed blosc2 case
(what nnUNetDataLoader reads in training), the same image as the pair loader's pool cache (PoolReader, nnU-Net's
blosc2 layout), and K proposals of the label map (slightly moved copies) with their mean probabilities in a
ProposalStore. Rows, each `--iterations` calls of `generate_train_batch` after `--warmup` calls, at the batch and
patch of that size (the patch nnU-Net's loader crops, enlarged for rotation as nnUNetTrainer does), no transforms:
- nnunet: nnUNetDataLoader over nnUNetDatasetBlosc2 (its foreground oversampling 0.33);
- pairs: the pair loader now (PairDataset: blosc2 image, unpacked memory-mapped proposals, masks on the patch);
- pairs_before_cold / pairs_before_warm, with `--before REV`: the pair loader of git revision REV (whole cases
  decompressed into an LRU cache of `cache_cases`): cold with cache_cases=1, a pool larger than its cache (each
  draw of another case decompresses it again), warm with every case cached (only the whole-volume mask work).
Data loading only: nnU-Net's augmentation (the same for all rows) and its worker processes are left out.

    python benchmarks/bench_loading.py --sizes 256,hippocampus --before ec44c5d --work /tmp/bench_loading \
        -o benchmarks/results/bench_loading_<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import types
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import numpy as np

SIZES = {  # name -> (shape, patch, batch, cases)
    "hippocampus": ((40, 56, 40), (40, 56, 40), 2, 20),
    "128": ((128, 128, 128), (96, 96, 96), 2, 4),
    "256": ((256, 256, 256), (128, 128, 128), 2, 2),
    "320": ((320, 320, 320), (128, 128, 128), 2, 2),
}
NUM_PROPOSALS = 8
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def make_case(shape, seed: int):
    """(image (1, *shape) float32, label map (*shape) uint8): a two-class ellipsoid in noise."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, size) for size in shape)]
    centre = [size / 2 + rng.uniform(-0.05, 0.05) * size for size in shape]
    radius = sum(((axis - c) / (0.3 * size)) ** 2 for axis, c, size in zip(grid, centre, shape))
    label_map = np.zeros(shape, np.uint8)
    label_map[radius < 1] = 1
    label_map[radius < 0.15] = 2
    image = (label_map.astype(np.float32) + rng.standard_normal(shape, dtype=np.float32) * 0.3)[None]
    return image, label_map


def proposals_of(label_map: np.ndarray, seed: int) -> np.ndarray:
    """K copies of the label map, each moved by up to 2 voxels per axis."""
    rng = np.random.default_rng(seed)
    return np.stack([np.roll(label_map, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2)) for _ in range(NUM_PROPOSALS)])


def write_cases(work: Path, size: str, patch):
    """nnU-Net's preprocessed folder, the pair loader's pool cache and the proposal store of one size."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    from nnunet_rndpo.proposals.pool import CasePool, PoolReader
    from nnunet_rndpo.proposals.store import ProposalStore

    shape, _, _, count = SIZES[size]
    folder = work / size
    if folder.exists():
        shutil.rmtree(folder)
    preprocessed = folder / "preprocessed"
    preprocessed.mkdir(parents=True)
    store = ProposalStore(folder / "store").open({"members": [{"source": "tta"}] * NUM_PROPOSALS})
    case_ids = [f"case_{index:03d}" for index in range(count)]
    arrays = {}
    for index, case_id in enumerate(case_ids):
        image, label_map = make_case(shape, index)
        seg = label_map[None].astype(np.int16)
        properties = {"class_locations": DefaultPreprocessor._sample_foreground_locations(seg, [1, 2], seed=index)}
        data_blocks, data_chunks = comp_blosc2_params(image.shape, patch, image.itemsize)
        seg_blocks, seg_chunks = comp_blosc2_params(seg.shape, patch, seg.itemsize)
        nnUNetDatasetBlosc2.save_case(
            image, seg, properties, str(preprocessed / case_id), data_chunks, data_blocks, seg_chunks, seg_blocks
        )
        proposals = proposals_of(label_map, index)
        mean = np.stack([(proposals == label).mean(axis=0) for label in LABELS.values()]).astype(np.float16)
        store.save_case(case_id, proposals, mean, index)
        arrays[case_id] = (image, np.zeros((1, *shape), np.int8), {})

    class SyntheticPoolReader(PoolReader):
        def _preprocess(self, case_id):  # what nnU-Net's preprocessor would give for an unlabeled image
            return arrays[case_id]

    pool = CasePool("Dataset999_Bench", "imagesUnlabeled", case_ids, cache_folder=folder / "pool_cache")
    reader = SyntheticPoolReader(pool, None, SimpleNamespace(patch_size=patch), {"channel_names": {"0": "CT"}})
    for case_id in case_ids:
        reader.open_case(case_id)  # the pool cache, written once as in the proposal step
    return preprocessed, store, reader, case_ids


def old_pair_data(revision: str):
    """The module nnunet_rndpo/training/pair_data.py as it was at git revision `revision`."""
    source = subprocess.run(
        ["git", "show", f"{revision}:nnunet_rndpo/training/pair_data.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    module = types.ModuleType(f"pair_data_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"pair_data.py@{revision}", "exec"), module.__dict__)
    return module


def timed(loaders: dict, warmups: dict, iterations: int) -> dict:
    """Seconds per `generate_train_batch` of each loader, the loaders taking turns call by call (so that a load
    of the machine that comes and goes falls on all of them alike)."""
    for name, loader in loaders.items():
        for _ in range(warmups[name]):
            loader.generate_train_batch()
    seconds = {name: [] for name in loaders}
    for _ in range(iterations):
        for name, loader in loaders.items():
            started = time.perf_counter()
            loader.generate_train_batch()
            seconds[name].append(time.perf_counter() - started)
    return {
        name: {"seconds_per_iteration": statistics.mean(runs), "median": statistics.median(runs), "runs": runs}
        for name, runs in seconds.items()
    }


def bench_size(work: Path, size: str, args) -> dict:
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_rndpo.training.pair_data import PairDataset, TrainingItem, pair_loader

    shape, patch, batch, count = SIZES[size]
    rotation = (-30.0 / 360 * 2.0 * np.pi, 30.0 / 360 * 2.0 * np.pi)
    initial_patch = tuple(int(p) for p in get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25)))
    started = time.perf_counter()
    preprocessed, store, reader, case_ids = write_cases(work, size, patch)
    print(f"{size}: {count} cases of {shape} written in {time.perf_counter() - started:.0f} s", flush=True)
    labels = LabelManager(LABELS, regions_class_order=None)
    items = [TrainingItem(case_id, 0, 1) for case_id in case_ids]
    np.random.seed(0)
    dataset = PairDataset(items, store, reader)
    started = time.perf_counter()
    dataset.prepare()
    prepare_seconds = time.perf_counter() - started
    loaders = {
        "nnunet": nnUNetDataLoader(
            nnUNetDatasetBlosc2(str(preprocessed), case_ids), batch, initial_patch, patch, labels, 0.33
        ),
        "pairs": pair_loader(dataset, batch, initial_patch, patch, labels, 0.5, None),
    }
    warmups = {"nnunet": args.warmup, "pairs": args.warmup}
    if args.before:
        old = old_pair_data(args.before)
        for name, cache_cases in (("pairs_before_cold", 1), ("pairs_before_warm", count)):
            old_dataset = old.PairDataset(items, store, reader, cache_cases=cache_cases)
            loaders[name] = old.pair_loader(old_dataset, batch, initial_patch, patch, labels, 0.5, None)
            # warm: every case drawn once before timing
            warmups[name] = args.warmup if cache_cases == 1 else args.warmup + 4 * count
    rows = timed(loaders, warmups, args.iterations)
    rows["pairs"]["prepare_seconds"] = prepare_seconds
    for name, row in rows.items():
        ratio = row["seconds_per_iteration"] / rows["nnunet"]["seconds_per_iteration"]
        row["ratio_to_nnunet"] = ratio
        print(
            f"{size:12s} {name:18s} {row['seconds_per_iteration']:.4f} s/iteration  {ratio:.2f} x nnU-Net", flush=True
        )
    if not args.keep:
        shutil.rmtree(work / size, ignore_errors=True)
    return {
        "shape": shape,
        "patch": patch,
        "initial_patch": initial_patch,
        "batch": batch,
        "cases": count,
        "rows": rows,
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,hippocampus", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_loading"))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--before", default=None, help="git revision of the pair loader to compare with")
    parser.add_argument("--keep", action="store_true", help="keep the cases written under --work")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if unknown := set(sizes) - set(SIZES):
        raise SystemExit(f"--sizes: unknown {sorted(unknown)}; valid: {', '.join(SIZES)}")
    results = {
        "command": " ".join(sys.argv),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "date": date.today().isoformat(),
        "sizes": {size: bench_size(args.work, size, args) for size in sizes},
    }
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
