"""Export a fine-tuned model folder for users without this package: the checkpoints' trainer name becomes
plain `nnUNetTrainer` (same network, same weights), so stock `nnUNetv2_predict_from_modelfolder` loads it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from nnunet_rndpo.atomic import atomic_path
from nnunet_rndpo.proposals.model import read_checkpoint

MODEL_FOLDER_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
STOCK_TRAINER = "nnUNetTrainer"


def export_model_folder(
    model_folder: str | Path,
    output_folder: str | Path,
    checkpoint_names=("checkpoint_final.pth", "checkpoint_best.pth"),
    folds: Optional[Sequence[str]] = None,
) -> list[Path]:
    """Copy `model_folder` (…/<Trainer>__<Plans>__<config>) to `output_folder` with stock trainer names; `folds`:
    only these folds (nnU-Net's -f: "0", "all"), default every fold_* folder."""
    model_folder, output_folder = Path(model_folder), Path(output_folder)
    if not (model_folder / "plans.json").is_file():
        raise FileNotFoundError(f"{model_folder} is not an nnU-Net model folder (plans.json missing)")
    present = sorted(p for p in model_folder.glob("fold_*") if p.is_dir())
    if not present:
        raise FileNotFoundError(f"{model_folder} has no fold_* folders")
    if folds is not None:
        missing = [fold for fold in folds if not (model_folder / f"fold_{fold}").is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{model_folder} has no fold_{missing[0]}; its folds: {', '.join(p.name[5:] for p in present)}"
            )
        present = [model_folder / f"fold_{fold}" for fold in folds]
    folds = present
    written = []
    output_folder.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FOLDER_FILES:
        if (model_folder / name).is_file():
            with atomic_path(output_folder / name) as temporary:
                shutil.copyfile(model_folder / name, temporary)
            written.append(output_folder / name)
    for fold in folds:
        for checkpoint_name in checkpoint_names:
            source = fold / checkpoint_name
            if not source.is_file():
                continue
            checkpoint = read_checkpoint(source)
            checkpoint["trainer_name"] = STOCK_TRAINER
            target = output_folder / fold.name / checkpoint_name
            with atomic_path(target) as temporary:
                torch.save(checkpoint, temporary)
            written.append(target)
    if not any(p.suffix == ".pth" for p in written):
        raise FileNotFoundError(f"no checkpoints named {', '.join(checkpoint_names)} in {model_folder}/fold_*")
    return written
