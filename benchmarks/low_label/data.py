"""The protocol's data: the split (fixed seed, written to <work>/split.json), laid out as nnU-Net raw datasets,
planned and preprocessed, with nnU-Net's splits_final.json saying which labeled cases each fold trains on."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks.low_label.protocols import CONFIGURATION, Protocol
from benchmarks.low_label.scheduling import claim

PARTS = ("labeled", "validation", "unlabeled", "test")


def make_split(data: Path, seed: int, labeled: int, validation: int, unlabeled: int) -> dict:
    from nnunet_rndpo.demo.splits import labeled_case_ids, split_cases

    sizes = [("labeled", labeled), ("validation", validation), ("unlabeled", unlabeled)]
    return {"seed": seed, "source": str(data), **split_cases(labeled_case_ids(data), seed, sizes, rest="test")}


def write_raw(data: Path, raw_root: Path, split: dict, protocol: Protocol) -> None:
    """The protocol's dataset (labeled and validation cases in imagesTr, the pool in imagesUnlabeled, the test cases
    in imagesTs) and, where it has one, the upper bound's (every labeled and pool case with its label)."""
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.demo.splits import link_parts

    dataset_json = json.loads((data / "dataset.json").read_text())
    low = raw_root / f"Dataset{protocol.dataset_id}_HippoLowLabel"
    link_parts(data, low, {part: split[part] for part in PARTS})
    save_json(
        {**dataset_json, "name": "HippoLowLabel", "numTraining": len(split["labeled"]) + len(split["validation"])},
        low / "dataset.json",
    )
    if protocol.upper_id is None:
        return
    upper = raw_root / f"Dataset{protocol.upper_id}_HippoUpperBound"
    link_parts(data, upper, {"labeled": split["labeled"] + split["validation"] + split["unlabeled"]})
    save_json(
        {
            **dataset_json,
            "name": "HippoUpperBound",
            "numTraining": len(split["labeled"]) + len(split["validation"]) + len(split["unlabeled"]),
        },
        upper / "dataset.json",
    )


def fold_splits(labeled: list[str], validation: list[str], folds: int) -> list[dict]:
    """nnU-Net's splits_final.json of a protocol. One fold: train on every labeled case, validate on the validation
    cases (never on test). Several: nnU-Net's own cross-validation split of the labeled cases
    (`generate_crossval_split`, as `nnUNetv2_train` makes it); the validation cases are in no fold, scored apart."""
    if folds == 1:
        return [{"train": sorted(labeled), "val": sorted(validation)}]
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if len(labeled) < folds:
        raise SystemExit(f"{folds} folds need at least {folds} labeled cases, the split has {len(labeled)}")
    return [
        {"train": sorted(fold["train"]), "val": sorted(fold["val"])}
        for fold in generate_crossval_split(sorted(labeled), n_splits=folds)
    ]


def prepare(work: Path, data: Path, seed: int, protocol: Protocol) -> dict:
    from nnunet_rndpo import nnunet_paths
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.splits import link_parts

    split_file = work / "split.json"
    sizes = {"labeled": protocol.labeled, "validation": protocol.validation, "unlabeled": protocol.unlabeled}
    if split_file.is_file():
        split = json.loads(split_file.read_text())
        found = {part: len(split[part]) for part in sizes}
        if found != sizes:
            raise SystemExit(
                f"{split_file} holds a split of {found}, protocol {protocol.name} needs {sizes}: "
                "give each protocol its own --work folder"
            )
    else:
        split = make_split(data, seed, **sizes)
        save_json(split, split_file)
    raw_root = Path(os.environ["nnUNet_raw"])
    write_raw(data, raw_root, split, protocol)
    datasets = [(protocol.dataset_id, fold_splits(split["labeled"], split["validation"], protocol.folds))]
    if protocol.upper_id is not None:
        datasets.append((protocol.upper_id, fold_splits(split["labeled"] + split["unlabeled"], split["validation"], 1)))
    for dataset_id, splits in datasets:
        base = Path(os.environ["nnUNet_preprocessed"]) / nnunet_paths.find_dataset_name(dataset_id)
        if not (base / "nnUNetPlans.json").is_file():
            os.environ.pop("nnUNet_n_proc_DA", None)
            nnunet_steps.plan_and_preprocess(dataset_id, num_processes=2)
        plans = json.loads((base / "nnUNetPlans.json").read_text())
        patch = plans["configurations"]["3d_fullres"]["patch_size"]
        nnunet_steps.add_configuration(
            dataset_id, CONFIGURATION, patch_size=patch, batch_size=2, features_per_stage=protocol.features
        )
        save_json(splits, base / "splits_final.json")
    # the validation cases as a test-like folder (imagesTs/labelsTs), so that checkpoints are scored on them
    # exactly as on the test split
    link_parts(data, validation_folder(work), {"test": split["validation"]})
    os.environ["nnUNet_n_proc_DA"] = "0"
    return split


def prepare_once(work: Path, data: Path, seed: int, protocol: Protocol, poll_seconds: float = 20.0) -> None:
    """`prepare`, one process at a time: two parts started together on a fresh work folder both planned and
    preprocessed, and nnU-Net's preprocessing of one removed the files the other had written (seen 2026-12-01).
    A later process still runs `prepare`, which then finds the plans and only rewrites the small files."""
    work.mkdir(parents=True, exist_ok=True)
    while True:
        with claim(work, "prepare") as claimed:
            if claimed:
                prepare(work, data, seed, protocol)
                return
        print("waiting for another part to prepare the datasets", flush=True)
        time.sleep(poll_seconds)


def validation_folder(work: Path) -> Path:
    return work / "validation_cases"
