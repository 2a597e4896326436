"""Shared test set-up: nnU-Net's environment and session-wide datasets, preprocessing and a base checkpoint.

Environment (set here at import time, before any test module can import nnunetv2):
- nnUNet_raw / nnUNet_preprocessed / nnUNet_results: folders in one fresh temporary directory, removed at the end
  of the session; or, if RNDPO_TEST_KEEP_DIR names a folder, in that folder, kept and reused across runs for fast
  local iteration (a fixture whose output is already there with the same parameters is not rebuilt; delete the
  folder after changing nnU-Net steps). The user's own nnU-Net folders are never used.
- nnUNet_n_proc_DA=0 (augment in the training process: fastest on 2 cores; note that `nnUNetv2_plan_and_preprocess`
  run as a subprocess crashes with it, so drop it from such a subprocess's environment), nnUNet_def_n_proc=1,
  nnUNet_compile=false, and nnUNet_extTrainer including this package's trainers folder.

Session fixtures (each built once per session; the slow ones are marked):
- `synthetic_dataset` -> SyntheticDataset: Dataset901_RNDPOSynthetic, 10 labeled, 4 unlabeled, 3 test cases
  of 40^3 (~2 s).
- `preprocessed_synthetic` -> PreprocessedDataset: the same, planned and preprocessed for 3d_fullres (slow, ~10 s).
- `tiny_configuration` -> "3d_tiny": patch 32^3, batch 2, features (8, 16, 32), on 3d_fullres's data.
- `base_checkpoint` -> Path of nnUNetTrainer__nnUNetPlans__3d_tiny/fold_0/checkpoint_final.pth, stock nnUNetTrainer
  trained 2 epochs x 10 iterations with seed 0 (slow, ~10 s).
- `hippocampus_dataset` -> PreprocessedDataset: 5 real cases of Dataset004_Hippocampus (MSD Task04, CC-BY-SA 4.0,
  Antonelli et al. 2022, Simpson et al. 2019) as Dataset904_Hippocampus5, preprocessed for 3d_fullres (slow,
  ~10 s). Skipped when the shared data folder is missing, except under CI=true, where that is a failure.

Tests that use a slow fixture carry `@pytest.mark.slow`; `-m "not slow"` runs only the fast ones.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnunet_rndpo import nnunet_paths

REPO_ROOT = Path(__file__).resolve().parents[1]


def _prepare_environment() -> Path:
    keep = os.environ.get("RNDPO_TEST_KEEP_DIR")
    if keep:
        root = Path(keep).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="rndpo_tests_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    nnunet_paths.set_nnunet_folders(root)
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ["nnUNet_def_n_proc"] = "1"
    os.environ["nnUNet_compile"] = "false"
    from nnunet_rndpo.nnunet_env import ensure_ext_trainer  # does not import nnunetv2

    ensure_ext_trainer()
    return root


TEST_ROOT = _prepare_environment()

SYNTHETIC_ID = 901
SYNTHETIC_NAME = "RNDPOSynthetic"
SYNTHETIC_COUNTS = {"num_labeled": 10, "num_unlabeled": 4, "num_test": 3}
SYNTHETIC_SHAPE = (40, 40, 40)
SYNTHETIC_SEED = 0
TINY_CONFIGURATION = "3d_tiny"
TINY_SETTINGS = {"patch_size": (32, 32, 32), "batch_size": 2, "features_per_stage": (8, 16, 32)}
BASE_TRAINING = {"num_epochs": 2, "iterations_per_epoch": 10, "val_iterations": 2, "seed": 0}
# One torch thread: the 2 cores are shared, and 2 threads slowed 7x whenever another process was busy.
TRAINING_THREADS = 1
HIPPOCAMPUS_ID = 904
HIPPOCAMPUS_NAME = "Hippocampus5"
HIPPOCAMPUS_CASES = 5


@dataclass(frozen=True)
class SyntheticDataset:
    dataset_id: int
    name: str  # DatasetXXX_Name
    raw_folder: Path
    labels: dict[str, int]
    num_labeled: int
    num_unlabeled: int
    num_test: int


@dataclass(frozen=True)
class PreprocessedDataset:
    dataset_id: int
    name: str
    raw_folder: Path
    preprocessed_folder: Path  # nnUNet_preprocessed/DatasetXXX_Name
    plans_file: Path
    configuration: str  # the preprocessed configuration
    data_folder: Path  # preprocessed_folder/<data_identifier>
    labels: dict[str, int]
    case_identifiers: tuple[str, ...]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: uses a fixture that preprocesses data or trains (seconds, not ms)")


# ---------------------------------------------------------------------------------------------------------------
# Reuse of fixture outputs in a kept folder: a stamp records the parameters each output was built with.


def _stamp_path(name: str) -> Path:
    return TEST_ROOT / ".fixture_stamps" / f"{name}.json"


def _stamp_matches(name: str, key: dict) -> bool:
    path = _stamp_path(name)
    return path.is_file() and json.loads(path.read_text()) == key


def _write_stamp(name: str, key: dict) -> None:
    from nnunet_rndpo.atomic import save_json

    # Round-trip through JSON so the comparison above sees the same types.
    save_json(json.loads(json.dumps(key)), _stamp_path(name))


def _source_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Synthetic dataset


@pytest.fixture(scope="session")
def synthetic_dataset() -> SyntheticDataset:
    from nnunet_rndpo.demo.synthetic import LABELS, make_synthetic_dataset

    raw_root = Path(os.environ["nnUNet_raw"])
    key = {
        "dataset_id": SYNTHETIC_ID,
        "name": SYNTHETIC_NAME,
        **SYNTHETIC_COUNTS,
        "shape": list(SYNTHETIC_SHAPE),
        "seed": SYNTHETIC_SEED,
        "generator": _source_digest(REPO_ROOT / "nnunet_rndpo" / "demo" / "synthetic.py"),
    }
    folder = raw_root / f"Dataset{SYNTHETIC_ID:03d}_{SYNTHETIC_NAME}"
    if not (_stamp_matches("synthetic_dataset", key) and (folder / "dataset.json").is_file()):
        if folder.exists():
            shutil.rmtree(folder)
        folder = make_synthetic_dataset(
            raw_root,
            dataset_id=SYNTHETIC_ID,
            name=SYNTHETIC_NAME,
            shape=SYNTHETIC_SHAPE,
            seed=SYNTHETIC_SEED,
            **SYNTHETIC_COUNTS,
        )
        _write_stamp("synthetic_dataset", key)
    return SyntheticDataset(
        dataset_id=SYNTHETIC_ID, name=folder.name, raw_folder=folder, labels=dict(LABELS), **SYNTHETIC_COUNTS
    )


def _preprocessed(
    dataset_id: int, stamp_name: str, key: dict, configuration: str = "3d_fullres"
) -> PreprocessedDataset:
    """Plan and preprocess `configuration` unless a kept folder already holds it for the same `key`."""
    from nnunet_rndpo.demo import nnunet_steps

    name = nnunet_paths.find_dataset_name(dataset_id)
    raw_folder = Path(os.environ["nnUNet_raw"]) / name
    preprocessed_folder = Path(os.environ["nnUNet_preprocessed"]) / name
    plans_file = preprocessed_folder / "nnUNetPlans.json"
    if not (_stamp_matches(stamp_name, key) and plans_file.is_file()):
        nnunet_steps.plan_and_preprocess(dataset_id, configurations=(configuration,), num_processes=1)
        _write_stamp(stamp_name, key)
    plans = json.loads(plans_file.read_text())
    data_folder = preprocessed_folder / plans["configurations"][configuration]["data_identifier"]
    dataset_json = json.loads((preprocessed_folder / "dataset.json").read_text())
    cases = tuple(sorted(p.name[: -len(".pkl")] for p in data_folder.glob("*.pkl")))
    return PreprocessedDataset(
        dataset_id=dataset_id,
        name=name,
        raw_folder=raw_folder,
        preprocessed_folder=preprocessed_folder,
        plans_file=plans_file,
        configuration=configuration,
        data_folder=data_folder,
        labels={k: int(v) for k, v in dataset_json["labels"].items()},
        case_identifiers=cases,
    )


@pytest.fixture(scope="session")
def preprocessed_synthetic(synthetic_dataset: SyntheticDataset) -> PreprocessedDataset:
    key = {"synthetic": json.loads(_stamp_path("synthetic_dataset").read_text())}
    return _preprocessed(synthetic_dataset.dataset_id, "preprocessed_synthetic", key)


@pytest.fixture(scope="session")
def tiny_configuration(preprocessed_synthetic: PreprocessedDataset) -> str:
    from nnunet_rndpo.demo.nnunet_steps import add_configuration

    # Cheap and idempotent, so always (re)written: the plans file is rewritten by each preprocessing.
    add_configuration(preprocessed_synthetic.dataset_id, TINY_CONFIGURATION, **TINY_SETTINGS)
    return TINY_CONFIGURATION


@pytest.fixture(scope="session")
def base_checkpoint(preprocessed_synthetic: PreprocessedDataset, tiny_configuration: str) -> Path:
    from nnunet_rndpo.demo import nnunet_steps

    key = {
        "preprocessed": json.loads(_stamp_path("preprocessed_synthetic").read_text()),
        "configuration": tiny_configuration,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_SETTINGS.items()},
        "training": BASE_TRAINING,
    }
    fold_folder = nnunet_paths.trainer_output_folder(preprocessed_synthetic.dataset_id, tiny_configuration, 0)
    checkpoint = fold_folder / "checkpoint_final.pth"
    if not (_stamp_matches("base_checkpoint", key) and checkpoint.is_file()):
        if fold_folder.exists():
            shutil.rmtree(fold_folder)  # no stale logs or checkpoints from another run
        fold_folder = nnunet_steps.train_supervised(
            preprocessed_synthetic.dataset_id,
            tiny_configuration,
            0,
            device="cpu",
            num_threads=TRAINING_THREADS,
            **BASE_TRAINING,
        )
        checkpoint = fold_folder / "checkpoint_final.pth"
        _write_stamp("base_checkpoint", key)
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Real data: five Hippocampus cases


def shared_hippocampus_folder() -> Path | None:
    """Dataset004_Hippocampus: RNDPO_SHARED_DATA (the dataset folder or its parent), else <repo>/../shared/data."""
    candidates = []
    override = os.environ.get("RNDPO_SHARED_DATA")
    if override:
        candidates += [Path(override), Path(override) / "Dataset004_Hippocampus"]
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "Dataset004_Hippocampus")
    for candidate in candidates:
        if (candidate / "dataset.json").is_file() and (candidate / "imagesTr").is_dir():
            return candidate.resolve()
    return None


@pytest.fixture(scope="session")
def hippocampus_dataset() -> PreprocessedDataset:
    source = shared_hippocampus_folder()
    if source is None:
        reason = (
            "Dataset004_Hippocampus not found (looked in $RNDPO_SHARED_DATA and "
            f"{REPO_ROOT.parent / 'shared' / 'data'}); real-data tests need it"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " and CI=true requires them to run")
        pytest.skip(reason)

    available = sorted(p.name[: -len("_0000.nii.gz")] for p in (source / "imagesTr").glob("*_0000.nii.gz"))
    cases = available[:HIPPOCAMPUS_CASES]
    assert len(cases) == HIPPOCAMPUS_CASES, f"{source} holds fewer than {HIPPOCAMPUS_CASES} cases"
    target = Path(os.environ["nnUNet_raw"]) / f"Dataset{HIPPOCAMPUS_ID:03d}_{HIPPOCAMPUS_NAME}"
    key = {"source": str(source), "cases": cases}
    if not (_stamp_matches("hippocampus_raw", key) and (target / "dataset.json").is_file()):
        if target.exists():
            shutil.rmtree(target)
        _copy_hippocampus_cases(source, target, cases)
        _write_stamp("hippocampus_raw", key)
    return _preprocessed(HIPPOCAMPUS_ID, "hippocampus_preprocessed", key)


def _copy_hippocampus_cases(source: Path, target: Path, cases: list[str]) -> None:
    """Copy (never link: nothing may write through into the shared folder) cases and a matching dataset.json."""
    from nnunet_rndpo.atomic import save_json

    for folder in ("imagesTr", "labelsTr"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copyfile(source / "imagesTr" / f"{case}_0000.nii.gz", target / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copyfile(source / "labelsTr" / f"{case}.nii.gz", target / "labelsTr" / f"{case}.nii.gz")
    dataset_json = json.loads((source / "dataset.json").read_text())
    dataset_json.update(
        {
            "name": HIPPOCAMPUS_NAME,
            "numTraining": len(cases),
            "description": f"{len(cases)} cases of Dataset004_Hippocampus (Medical Segmentation Decathlon Task04). "
            "Credit: Antonelli M. et al., Nature Communications 13, 4128 (2022); Simpson A.L. et al., "
            "arXiv:1902.09063 (2019); data from Vanderbilt University Medical Center. Licence CC-BY-SA 4.0.",
        }
    )
    save_json(dataset_json, target / "dataset.json")
