"""The pool of cases that get proposals, preprocessed by the plans' own preprocessor once and cached.

By default the pool is `nnUNet_raw/<Dataset>/imagesUnlabeled/` (named as imagesTr: `<case>_0000.nii.gz`, one
file per channel). Without that folder, the fold's training cases serve, their labels ignored.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from nnunet_rndpo.atomic import writer_is_alive
from nnunet_rndpo.nnunet_paths import RunLocation, fold_split

UNLABELED_FOLDER = "imagesUnlabeled"


class PoolError(RuntimeError):
    """A pool that cannot be read: no cases, wrong channels, file endings or geometry, unreadable images."""


@dataclass
class CasePool:
    """Cases that get proposals: the unlabeled pool (imagesUnlabeled), or labeled cases of nnU-Net's
    preprocessed folder (the fold's training cases as a fallback pool or for fitting judges; validation cases
    for the audit), their labels ignored by everything but judge fitting, the oracle and the audit."""

    dataset_name: str
    source: str  # "imagesUnlabeled", "training cases of fold F (labels ignored)", ...
    case_ids: list[str]
    raw_files: dict[str, list[Path]] = field(default_factory=dict)  # imagesUnlabeled only
    cache_folder: Optional[Path] = None
    preprocessed_folder: Optional[Path] = None  # nnU-Net's folder, for labeled cases
    in_sample: bool = False  # the base model was trained on these cases

    def shard(self, part_id: int, num_parts: int) -> list[str]:
        """Cases of one part, as nnUNetv2_predict splits its work: every num_parts-th case."""
        if num_parts < 1 or not 0 <= part_id < num_parts:
            raise ValueError(f"--part_id must lie in [0, --num_parts); got part_id={part_id}, num_parts={num_parts}")
        return self.case_ids[part_id::num_parts]


def split_channel_files(folder: Path, file_ending: str, num_channels: int) -> dict[str, list[Path]]:
    """Group `<case>_XXXX<ending>` files by case, checking endings and channel counts."""
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(file_ending)}$")
    channels: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        match = pattern.match(path.name)
        if match is None:
            raise PoolError(
                f"{path}: not an nnU-Net image name; expected <case>_<4-digit channel>{file_ending} "
                f"(the dataset's file_ending is {file_ending!r})"
            )
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    files = {}
    for case_id, per_channel in channels.items():
        if sorted(per_channel) != list(range(num_channels)):
            raise PoolError(
                f"unlabeled case {case_id!r} in {folder} has channel(s) {sorted(per_channel)}; "
                f"dataset.json declares {num_channels} channel(s) 0..{num_channels - 1}"
            )
        files[case_id] = [per_channel[c] for c in range(num_channels)]
    return files


def discover_pool(
    raw_root: Optional[Path], preprocessed_root: Path, dataset_name: str, dataset_json: dict, data_identifier: str, fold
) -> CasePool:
    """imagesUnlabeled when present (and non-empty), else the fold's training cases."""
    preprocessed_base = Path(preprocessed_root) / dataset_name
    unlabeled_folder = Path(raw_root) / dataset_name / UNLABELED_FOLDER if raw_root else None
    if unlabeled_folder is not None and unlabeled_folder.is_dir():
        files = split_channel_files(unlabeled_folder, dataset_json["file_ending"], len(_channel_names(dataset_json)))
        if not files:
            raise PoolError(f"the unlabeled pool {unlabeled_folder} is empty: add images or remove the folder")
        return CasePool(
            dataset_name=dataset_name,
            source=UNLABELED_FOLDER,
            case_ids=sorted(files),
            raw_files=files,
            cache_folder=preprocessed_base / "rndpo_pool" / data_identifier,
        )
    data_folder = preprocessed_base / data_identifier
    if not data_folder.is_dir():
        raise PoolError(
            f"no unlabeled pool for {dataset_name}: {unlabeled_folder} does not exist and the preprocessed training "
            f"data {data_folder} is missing (run nnUNetv2_plan_and_preprocess)"
        )
    train, _ = fold_split(preprocessed_base, data_folder, fold)
    if not train:
        raise PoolError(
            f"no unlabeled pool for {dataset_name}: no imagesUnlabeled folder and fold {fold} has no training cases"
        )
    return CasePool(
        dataset_name=dataset_name,
        source=f"training cases of fold {fold} (labels ignored)",
        case_ids=sorted(train),
        preprocessed_folder=data_folder,
        in_sample=True,
    )


def unlabeled_pool(location: RunLocation) -> CasePool:
    """imagesUnlabeled when present, else the fold's training cases (marked in-sample)."""
    return discover_pool(
        location.raw_dataset_folder.parent if location.raw_dataset_folder else None,
        location.preprocessed_base.parent,
        location.dataset_name,
        location.dataset_json,
        location.preprocessed_data_folder.name,
        location.fold,
    )


def labeled_training_pool(location: RunLocation) -> CasePool:
    """The fold's labeled training cases (for fitting learning judges: in-sample for the base model)."""
    train, _ = location.fold_split()
    return CasePool(
        dataset_name=location.dataset_name,
        source=f"labeled training cases of fold {location.fold} (for fitting judges)",
        case_ids=sorted(train),
        preprocessed_folder=location.preprocessed_data_folder,
        in_sample=True,
    )


def held_out_pool(location: RunLocation, fold, exclude=()) -> CasePool:
    """The labeled cases that fold `fold`'s model never trained on (its validation cases, minus `exclude`): honest
    examples of that model's proposals, for fitting judges that learn from proposals."""
    train, validation = location.fold_split(fold)
    return CasePool(
        dataset_name=location.dataset_name,
        source=f"validation cases of fold {fold} (held out of its model's training)",
        case_ids=sorted(set(validation) - set(train) - set(exclude)),
        preprocessed_folder=location.preprocessed_data_folder,
    )


def validation_pool(location: RunLocation, case_ids=None) -> CasePool:
    """The fold's labeled validation cases (or the given labeled cases), for the audit."""
    cases = sorted(case_ids if case_ids is not None else location.fold_split()[1])
    if not cases:
        raise ValueError(f"no labeled cases to audit for fold {location.fold}")
    return CasePool(
        dataset_name=location.dataset_name,
        source=f"labeled validation cases of fold {location.fold} (audit)",
        case_ids=cases,
        preprocessed_folder=location.preprocessed_data_folder,
    )


def _channel_names(dataset_json: dict) -> dict:
    return dataset_json.get("channel_names", dataset_json.get("modality", {}))


class PoolReader:
    """Loads pool cases in preprocessed space (preprocessing and caching imagesUnlabeled cases once).

    The cache of imagesUnlabeled cases is nnU-Net's own blosc2 layout (`<case>.b2nd`, `<case>_seg.b2nd`,
    `<case>.pkl`, written and read by nnUNetDatasetBlosc2 with chunks sized for the plans' patch), so `open_case`
    gives arrays that read only the chunks a patch touches. A case is written into a temporary folder and its
    files renamed into place, the data file last: it marks the case as cached. A case whose files are missing or
    do not open is preprocessed again; the compressed .npz of earlier versions is converted once.
    """

    def __init__(self, pool: CasePool, plans_manager, configuration_manager, dataset_json: dict):
        self.pool = pool
        self.plans_manager = plans_manager
        self.configuration_manager = configuration_manager
        self.dataset_json = dataset_json
        self._dataset = None

    def __getstate__(self):
        # worker processes open their own dataset (and blosc2 files)
        return {**self.__dict__, "_dataset": None}

    def load(self, case_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """(data (C, *spatial) float32, seg (1, *spatial) int8 with -1 outside the image's nonzero mask, properties)."""
        data, outside, properties = self.open_case(case_id)
        return np.asarray(data[:], dtype=np.float32), np.asarray(outside[:], dtype=np.int8), properties

    def open_case(self, case_id: str) -> tuple[Any, Any, dict]:
        """Like `load`, but data and seg are arrays that read only what is sliced from them (blosc2 chunks or
        memory maps, as nnU-Net's dataset gives them): `data[(slice(None), *box)]` reads a patch."""
        if self.pool.preprocessed_folder is not None:
            data, seg, _, properties = self._nnunet_dataset(self.pool.preprocessed_folder).load_case(case_id)
            # labels are ignored: only where the image is (-1 outside the nonzero mask), as for unlabeled cases
            return data, OutsideMarks(seg), properties
        try:
            return self._open_cached(case_id)
        except Exception:
            pass  # not cached yet, or a damaged entry: made again
        self._write_cache(case_id, *self._cached_npz_or_preprocessed(case_id))
        return self._open_cached(case_id)

    def _nnunet_dataset(self, folder: Path):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetBlosc2

        if self._dataset is None:
            dataset_class = (
                infer_dataset_class(str(folder)) if self.pool.preprocessed_folder is not None else nnUNetDatasetBlosc2
            )
            self._dataset = dataset_class(str(folder), list(self.pool.case_ids))
        return self._dataset

    def _open_cached(self, case_id: str):
        folder = self.pool.cache_folder
        if not all((folder / f"{case_id}{ending}").is_file() for ending in CACHE_ENDINGS):
            raise FileNotFoundError(f"case {case_id!r} is not in the pool cache {folder}")
        data, seg, _, properties = self._nnunet_dataset(folder).load_case(case_id)
        expected_channels = len(_channel_names(self.dataset_json))
        if data.ndim != seg.ndim or data.shape[1:] != seg.shape[1:] or data.shape[0] != expected_channels:
            raise ValueError(f"pool cache entry {case_id!r} in {folder} has data {data.shape} and seg {seg.shape}")
        return data, seg, properties

    def _cached_npz_or_preprocessed(self, case_id: str):
        """(data, seg, properties) from the .npz cache of earlier versions when it is whole, else preprocessed."""
        legacy = self.pool.cache_folder / f"{case_id}.npz"
        properties_file = self.pool.cache_folder / f"{case_id}.pkl"
        if legacy.is_file() and properties_file.is_file():
            try:
                with np.load(legacy) as archive:
                    data, seg = archive["data"], archive["seg"]
                with open(properties_file, "rb") as handle:
                    return data, seg, pickle.load(handle)
            except Exception:
                pass  # damaged: preprocessed again
        return self._preprocess(case_id)

    def _write_cache(self, case_id: str, data: np.ndarray, seg: np.ndarray, properties: dict) -> None:
        """nnU-Net's save_case into a temporary folder, then each file renamed into the cache, the data last."""
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

        folder = self.pool.cache_folder
        folder.mkdir(parents=True, exist_ok=True)
        remove_dead_writers(folder)
        patch_size = tuple(self.configuration_manager.patch_size)
        data_blocks, data_chunks = comp_blosc2_params(data.shape, patch_size, data.itemsize)
        seg_blocks, seg_chunks = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)
        temporary = Path(tempfile.mkdtemp(prefix=f".{case_id}.pid{os.getpid()}.", suffix=WRITING_SUFFIX, dir=folder))
        try:
            nnUNetDatasetBlosc2.save_case(
                np.ascontiguousarray(data, dtype=np.float32),
                np.ascontiguousarray(seg, dtype=np.int8),
                properties,
                str(temporary / case_id),
                chunks=data_chunks,
                blocks=data_blocks,
                chunks_seg=seg_chunks,
                blocks_seg=seg_blocks,
            )
            for ending in CACHE_ENDINGS:  # the data file last: it marks the case as cached
                os.replace(temporary / f"{case_id}{ending}", folder / f"{case_id}{ending}")
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        (folder / f"{case_id}.npz").unlink(missing_ok=True)  # the earlier format, now converted

    def _preprocess(self, case_id: str):
        files = [str(p) for p in self.pool.raw_files[case_id]]
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        printed = io.StringIO()
        try:
            # nnU-Net's readers print what is wrong (e.g. the channels' shapes) and raise a bare RuntimeError()
            with contextlib.redirect_stdout(printed):
                data, seg, properties = preprocessor.run_case(
                    files, None, self.plans_manager, self.configuration_manager, self.dataset_json
                )
        except Exception as error:
            detail = str(error) or " ".join(printed.getvalue().split()) or "no message"
            raise PoolError(
                f"unlabeled case {case_id!r} could not be read or preprocessed ({', '.join(files)}): "
                f"{type(error).__name__}: {detail}. Check that the files are readable images and that all channels "
                "share one geometry (size, spacing, origin, direction)."
            ) from error
        finally:
            sys.stdout.write(printed.getvalue())
        expected_channels = len(_channel_names(self.dataset_json))
        if data.shape[0] != expected_channels:
            raise PoolError(
                f"unlabeled case {case_id!r} has {data.shape[0]} channels after reading; expected {expected_channels}"
            )
        return data.astype(np.float32), seg.astype(np.int8), properties


# blosc2 cache of a pool case, in the order the files are renamed into place (the data file last)
CACHE_ENDINGS = (".pkl", "_seg.b2nd", ".b2nd")
WRITING_SUFFIX = ".writing"


def remove_dead_writers(folder: Path) -> None:
    """Remove the temporary folders of cache writers that no longer run (killed mid-write)."""
    for stale in folder.glob(f".*{WRITING_SUFFIX}"):
        if stale.is_dir() and not writer_is_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)


class OutsideMarks:
    """A lazy (1, *spatial) int8 view of a preprocessed segmentation: -1 outside the image's nonzero mask, 0 inside
    (the labels hidden); slicing it reads only the slice."""

    dtype = np.dtype(np.int8)

    def __init__(self, seg):
        self.seg = seg
        self.shape = tuple(seg.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        return np.where(np.asarray(self.seg[index]) < 0, -1, 0).astype(np.int8)
