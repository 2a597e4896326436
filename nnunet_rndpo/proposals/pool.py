"""The pool of cases that get proposals, preprocessed by the plans' own preprocessor once and cached.

By default the pool is `nnUNet_raw/<Dataset>/imagesUnlabeled/` (named as imagesTr: `<case>_0000.nii.gz`, one
file per channel). Without that folder, the fold's training cases serve, their labels ignored.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from nnunet_rndpo.atomic import save_npz, save_pickle
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
    """Loads pool cases in preprocessed space (preprocessing and caching imagesUnlabeled cases once)."""

    def __init__(self, pool: CasePool, plans_manager, configuration_manager, dataset_json: dict):
        self.pool = pool
        self.plans_manager = plans_manager
        self.configuration_manager = configuration_manager
        self.dataset_json = dataset_json
        self._dataset = None

    def load(self, case_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """(data (C, *spatial) float32, seg (1, *spatial) int8 with -1 outside the image's nonzero mask, properties)."""
        if self.pool.preprocessed_folder is not None:
            return self._load_preprocessed(case_id)
        cached = self.pool.cache_folder / f"{case_id}.npz"
        properties_file = self.pool.cache_folder / f"{case_id}.pkl"
        if cached.is_file() and properties_file.is_file():
            try:
                with np.load(cached) as archive:
                    data, seg = archive["data"], archive["seg"]
                with open(properties_file, "rb") as handle:
                    return data, seg, pickle.load(handle)
            except Exception:
                pass  # a damaged cache entry is simply made again
        data, seg, properties = self._preprocess(case_id)
        # properties first: the npz is what marks a case as cached
        save_pickle(properties, properties_file)
        save_npz(cached, data=data, seg=seg)
        return data, seg, properties

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

    def _load_preprocessed(self, case_id: str):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        if self._dataset is None:
            folder = str(self.pool.preprocessed_folder)
            self._dataset = infer_dataset_class(folder)(folder, list(self.pool.case_ids))
        data, seg, _, properties = self._dataset.load_case(case_id)
        seg = np.asarray(seg[:])
        # labels are ignored: keep only where the image is (-1 outside the nonzero mask), as for unlabeled cases
        outside = np.where(seg < 0, -1, 0).astype(np.int8)
        return np.asarray(data[:], dtype=np.float32), outside, properties
