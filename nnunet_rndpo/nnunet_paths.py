"""Where nnU-Net keeps a dataset's plans, data, splits, models and our proposal stores: the one place that knows
nnU-Net's folders (the subcommands, the trainers' start, the pipeline and the demo all ask `locate`). The bottom
layer of the package: it imports no other module of it but the atomic writer and the environment check; the pools
of cases built from these folders live in nnunet_rndpo/proposals/pool.py.

Reads nnunetv2.paths at call time (nnU-Net reads the environment at import).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nnunet_rndpo.atomic import save_json
from nnunet_rndpo.nnunet_env import require_nnunet_folders


@dataclass
class RunLocation:
    dataset_name: str
    configuration: str
    fold: object
    plans_name: str
    plans: dict
    dataset_json: dict
    raw_dataset_folder: Optional[Path]
    preprocessed_base: Path
    preprocessed_data_folder: Path
    results_root: Path

    def model_folder(self, trainer: str) -> Path:
        return self.results_root / self.dataset_name / f"{trainer}__{self.plans_name}__{self.configuration}"

    def checkpoint(self, trainer: str, checkpoint: str) -> Path:
        """`checkpoint` is a file path, or a checkpoint name inside the trainer's fold folder."""
        as_path = Path(checkpoint)
        if as_path.suffix == ".pth" and (as_path.is_absolute() or as_path.parent != Path(".")):
            return as_path
        return self.model_folder(trainer) / f"fold_{self.fold}" / checkpoint

    def store_folder(self, checkpoint_path: Path) -> Path:
        return default_store_folder(
            self.preprocessed_base.parent,
            self.dataset_name,
            self.plans_name,
            self.configuration,
            self.fold,
            checkpoint_path,
        )

    def fold_split(self, fold=None) -> tuple[list[str], list[str]]:
        """nnU-Net's (training, validation) case ids of this fold (or of `fold`)."""
        return fold_split(self.preprocessed_base, self.preprocessed_data_folder, self.fold if fold is None else fold)


def default_store_folder(
    preprocessed_root: Path, dataset_name: str, plans_name: str, configuration: str, fold, checkpoint_path: Path
) -> Path:
    """nnUNet_preprocessed/<Dataset>/rndpo_proposals/<plans>__<config>/fold_<F>/<base trainer folder>__<checkpoint>:
    the proposal store of one base checkpoint, outside nnU-Net's per-configuration data folder (every file there is
    taken for a case)."""
    checkpoint_path = Path(checkpoint_path)
    model_name = f"{checkpoint_path.parent.parent.name}__{checkpoint_path.parent.name}__{checkpoint_path.stem}"
    return (
        Path(preprocessed_root)
        / dataset_name
        / "rndpo_proposals"
        / f"{plans_name}__{configuration}"
        / f"fold_{fold}"
        / model_name
    )


def fold_split(preprocessed_base: Path, data_folder: Path, fold) -> tuple[list[str], list[str]]:
    """nnU-Net's split of the labeled cases for `fold` (creating splits_final.json as nnU-Net would)."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    identifiers = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    if fold == "all":
        return identifiers, identifiers
    splits_file = Path(preprocessed_base) / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
    else:
        splits = generate_crossval_split(identifiers, seed=12345, n_splits=5)
        save_json(splits, splits_file)
    fold = int(fold)
    if fold >= len(splits):
        # nnU-Net's own fallback for folds beyond the split file: a seeded random 80:20 split
        rng = np.random.RandomState(seed=12345 + fold)
        keys = np.sort(identifiers)
        train_index = rng.choice(len(keys), int(len(keys) * 0.8), replace=False)
        train = [keys[i] for i in train_index]
        return train, [k for k in keys if k not in train]
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def check_label_layout(dataset_json: dict, dataset_name: str, user: str) -> None:
    """Refuse a region-based dataset (labels given as lists of label values, trained with sigmoids) before any
    work: proposals, judges and pairs are label maps of one class per voxel. The error names the dataset.json
    keys that make it region-based."""
    regions = {
        name: value for name, value in dataset_json.get("labels", {}).items() if isinstance(value, (list, tuple))
    }
    if regions or "regions_class_order" in dataset_json:
        example = next(iter(regions.items()), None)
        shown = f' (e.g. "{example[0]}": {json.dumps(example[1])})' if example else ""
        raise ValueError(
            f"{user}: dataset {dataset_name} is region-based: dataset.json 'labels' define regions{shown}"
            f"{' with' if regions else ''} 'regions_class_order'. Region-based (sigmoid) training is not supported: "
            "proposals, judges and preference pairs are label maps with one class per voxel. Train the base on "
            "the dataset's plain labels (one integer per class in 'labels', no 'regions_class_order') to use it."
        )


def set_nnunet_folders(root: Path) -> None:
    """nnUNet_raw, nnUNet_preprocessed and nnUNet_results as folders of `root` (made if missing), for this process
    and its children. Call it before nnunetv2 is imported: nnU-Net reads them once, at import."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)


def sibling_fold_checkpoints(checkpoint_path: Path) -> list[Path]:
    """The same checkpoint name in the other `fold_*` folders of a model's trainer folder (nnU-Net's layout
    `<Trainer>__<Plans>__<config>/fold_F/<checkpoint>`), sorted; [] when the checkpoint is not in such a folder."""
    checkpoint_path = Path(checkpoint_path)
    own_fold = checkpoint_path.parent
    if not own_fold.name.startswith("fold_"):
        return []
    return sorted(
        folder / checkpoint_path.name
        for folder in own_fold.parent.glob("fold_*")
        if folder != own_fold and (folder / checkpoint_path.name).is_file()
    )


def checkpoint_fold(checkpoint_path: Path):
    """The fold of a checkpoint in nnU-Net's layout (`.../fold_3/checkpoint_final.pth` -> 3, `fold_all` -> 'all');
    None outside that layout."""
    name = Path(checkpoint_path).parent.name
    fold = name[len("fold_") :] if name.startswith("fold_") else ""
    return parse_fold(fold) if fold == "all" or fold.isdigit() else None


def find_dataset_name(dataset: int | str) -> str:
    """`DatasetXXX_Name` for an id (searched in nnUNet_raw/preprocessed/results) or a name passed through."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(dataset)


def preprocessed_dataset_folder(dataset: int | str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed

    return Path(nnUNet_preprocessed) / find_dataset_name(dataset)


def plans_path(dataset: int | str, plans_name: str = "nnUNetPlans") -> Path:
    return preprocessed_dataset_folder(dataset) / f"{plans_name}.json"


def trainer_output_folder(
    dataset: int | str, configuration: str, fold, trainer_name: str = "nnUNetTrainer", plans_name: str = "nnUNetPlans"
) -> Path:
    """nnU-Net's `nnUNet_results/DatasetX/<Trainer>__<Plans>__<config>/fold_F` (before the plans exist, too)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(get_output_folder(find_dataset_name(dataset), trainer_name, plans_name, configuration, fold))


def parse_fold(fold: str):
    return fold if fold == "all" else int(fold)


def locate(dataset: str | int, configuration: str, fold, plans_name: str = "nnUNetPlans") -> RunLocation:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    require_nnunet_folders()
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as error:
        raise RuntimeError(
            f"dataset {dataset!r} not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results: {error}"
        ) from error
    preprocessed_base = Path(nnUNet_preprocessed) / dataset_name
    plans_file = preprocessed_base / f"{plans_name}.json"
    if not plans_file.is_file():
        raise RuntimeError(f"plans {plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans = json.loads(plans_file.read_text())
    if configuration not in plans["configurations"]:
        raise RuntimeError(
            f"configuration {configuration!r} is not in {plans_file}; valid: {', '.join(plans['configurations'])}"
        )
    dataset_json = json.loads((preprocessed_base / "dataset.json").read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    return RunLocation(
        dataset_name=dataset_name,
        configuration=configuration,
        fold=parse_fold(str(fold)),
        plans_name=plans_name,
        plans=plans,
        dataset_json=dataset_json,
        raw_dataset_folder=Path(nnUNet_raw) / dataset_name if nnUNet_raw else None,
        preprocessed_base=preprocessed_base,
        preprocessed_data_folder=preprocessed_base / data_identifier,
        results_root=Path(nnUNet_results),
    )
