"""Where an arm's nnU-Net model lives: a trainer class named after its model (so each model has its own output
folder, `<Trainer>__<Plans>__<config>/fold_F`), and that folder. Callers use `models.base_folder` through the
module, so that tests can point it elsewhere."""

from __future__ import annotations

from pathlib import Path

from benchmarks.low_label.arms import FOLD_ENSEMBLE, Arm
from benchmarks.low_label.protocols import CONFIGURATION


def unique_trainer(base_class, arm: Arm):
    """A subclass of `base_class` named after the arm's model (`Bench_<model_name>`)."""
    return type("Bench_" + arm.model_name, (base_class,), {"__module__": __name__})


def nnunet_fold(arm: Arm) -> int:
    """The nnU-Net fold an arm trains: its own in the folds protocol, else fold 0 (every labeled case)."""
    if arm.fold == FOLD_ENSEMBLE:
        raise ValueError(f"{arm.name} is the ensemble of every fold's model: it has no fold of its own")
    return 0 if arm.fold is None else int(arm.fold)


def model_folder(arm: Arm, dataset_id: int) -> Path:
    """The fold folder of the arm's model in nnUNet_results."""
    from nnunet_rndpo import nnunet_paths

    return nnunet_paths.trainer_output_folder(
        dataset_id, CONFIGURATION, nnunet_fold(arm), trainer_name="Bench_" + arm.model_name
    )


def base_folder(seed: int, dataset_id: int, fold=None) -> Path:
    """The fold folder of the base model of `seed` (and `fold`, in the folds protocol)."""
    return model_folder(Arm("base", seed, fold=fold), dataset_id)
