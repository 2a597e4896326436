"""Thin wrappers around nnU-Net v2's own steps (plan/preprocess, add a configuration, train, predict, evaluate).

Used by the tests, the demo and the benchmarks. nnU-Net is imported inside the functions, so importing this module
costs nothing and leaves nnU-Net's environment variables (nnUNet_raw, nnUNet_preprocessed, nnUNet_results,
nnUNet_def_n_proc, ...) free to be set first. Folders are always taken from `nnunetv2.paths` at call time.

`in_process=True` (the default where offered) runs nnU-Net's worker pools as threads of this process: nnU-Net starts a
"spawn" process pool even for one worker, and each spawned worker re-imports torch and nnU-Net (5-10 s on the 2-core
machines), which dwarfs the work on small datasets. The steps themselves are nnU-Net's unchanged code.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import random
from copy import deepcopy
from multiprocessing.pool import ThreadPool
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping, Sequence

from nnunet_rndpo.atomic import save_json
from nnunet_rndpo.nnunet_paths import plans_path, preprocessed_dataset_folder

DEFAULT_PLANS_IDENTIFIER = "nnUNetPlans"
FILE_ENDING = ".nii.gz"

# nnU-Net modules that start `multiprocessing.get_context("spawn").Pool(...)`, by step (see `in_process_pools`).
PLANNING_POOL_MODULES = (
    "nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor",
    "nnunetv2.experiment_planning.verify_dataset_integrity",
    "nnunetv2.preprocessing.preprocessors.default_preprocessor",
)
VALIDATION_POOL_MODULES = (
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnunetv2.evaluation.evaluate_predictions",
)


# ----------------------------------------------------------------------------------------------------------------
# Planning and preprocessing


def plan_and_preprocess(
    dataset_id: int,
    configurations: Sequence[str] = ("3d_fullres",),
    num_processes: int = 1,
    verify: bool = False,
    quiet: bool = True,
    in_process: bool = True,
) -> Path:
    """Fingerprint, plan (default ExperimentPlanner, `nnUNetPlans`) and preprocess `configurations`.

    Equivalent to `nnUNetv2_plan_and_preprocess -d ID -c CONFIGS -np N [--verify_dataset_integrity]`, run in this
    process. `quiet` swallows nnU-Net's printing (errors still raise). Returns the preprocessed dataset folder.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    # The planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (a good value for training
    # on few cores): lift it for planning only.
    augmentation_workers = os.environ.get("nnUNet_n_proc_DA")
    planning_workers = None
    if augmentation_workers is not None and _as_int(augmentation_workers) < 1:
        planning_workers = str(max(1, num_processes))
    with (
        _maybe_quiet(quiet),
        _environment(nnUNet_n_proc_DA=planning_workers),
        in_process_pools(PLANNING_POOL_MODULES, enabled=in_process),
    ):
        extract_fingerprints(
            [dataset_id],
            num_processes=num_processes,
            check_dataset_integrity=verify,
            clean=True,
            verbose=False,
            show_progress_bar=False,
        )
        plans_identifier = plan_experiments([dataset_id])
        preprocess(
            [dataset_id],
            plans_identifier=plans_identifier,
            configurations=list(configurations),
            num_processes=[num_processes],
            verbose=False,
            show_progress_bar=False,
        )
    return preprocessed_dataset_folder(dataset_id)


# ----------------------------------------------------------------------------------------------------------------
# Smaller configurations without re-preprocessing

# Architecture lists with one entry per encoder stage, and per decoder stage (one fewer).
_PER_STAGE_KEYS = ("kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage")
_PER_DECODER_STAGE_KEYS = ("n_conv_per_stage_decoder",)


def add_configuration(
    dataset_id: int | str,
    name: str,
    *,
    inherits_from: str = "3d_fullres",
    patch_size: Sequence[int],
    batch_size: int,
    features_per_stage: Sequence[int],
    plans_identifier: str = DEFAULT_PLANS_IDENTIFIER,
) -> dict[str, Any]:
    """Add (or replace) configuration `name` in the plans JSON, inheriting the data of `inherits_from`.

    The new configuration keeps the parent's `data_identifier` (so it trains on the already preprocessed data)
    and overrides the patch size, the batch size and the network width/depth: `n_stages = len(features_per_stage)`,
    and every per-stage architecture list (kernel sizes, strides, convolutions per stage, decoder convolutions)
    is cut to (or extended by repeating its last entry to) that many stages. The plans file is rewritten
    atomically. Returns the configuration entry as written.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path = plans_path(dataset_id, plans_identifier)
    plans = load_json(str(path))
    if name == inherits_from:
        raise ValueError(f"configuration {name!r} cannot inherit from itself")
    # The resolved parent (its own inheritance applied), so that its architecture block is complete.
    parent = deepcopy(PlansManager(plans).get_configuration(inherits_from).configuration)

    patch_size = [int(p) for p in patch_size]
    features = [int(f) for f in features_per_stage]
    if len(patch_size) != len(parent["patch_size"]):
        raise ValueError(
            f"patch_size {patch_size} has {len(patch_size)} axes; {inherits_from} has {len(parent['patch_size'])}"
        )
    if len(features) < 1 or batch_size < 1 or min(patch_size) < 1:
        raise ValueError("features_per_stage needs at least one stage; batch_size and patch_size must be positive")

    architecture = dict(parent["architecture"])
    arch_kwargs = dict(architecture["arch_kwargs"])
    parent_stages = int(arch_kwargs["n_stages"])
    stages = len(features)
    arch_kwargs["n_stages"] = stages
    arch_kwargs["features_per_stage"] = features
    for key in _PER_STAGE_KEYS:
        if key in arch_kwargs:
            arch_kwargs[key] = _fit_stage_list(arch_kwargs[key], parent_stages, stages, key)
    for key in _PER_DECODER_STAGE_KEYS:
        if key in arch_kwargs:
            arch_kwargs[key] = _fit_stage_list(arch_kwargs[key], parent_stages - 1, stages - 1, key)
    _check_patch_divisible(patch_size, arch_kwargs.get("strides"))
    architecture["arch_kwargs"] = arch_kwargs

    # PlansManager merges a child over its parent key by key (shallow), so the architecture block goes in whole.
    configuration = {
        "inherits_from": inherits_from,
        "patch_size": patch_size,
        "batch_size": int(batch_size),
        "architecture": architecture,
    }
    plans["configurations"][name] = configuration
    save_json(plans, path)
    return configuration


def _fit_stage_list(values: list, parent_length: int, length: int, key: str) -> list:
    values = list(values)
    if len(values) != parent_length:
        raise ValueError(f"architecture list {key!r} has {len(values)} entries, expected {parent_length}")
    if length <= len(values):
        return values[:length]
    if not values:
        raise ValueError(f"cannot extend the empty architecture list {key!r}")
    return values + [values[-1]] * (length - len(values))


def _check_patch_divisible(patch_size: Sequence[int], strides: Sequence[Sequence[int]] | None) -> None:
    """The U-Net downsamples by the product of its strides: each patch axis must be divisible by it."""
    if strides is None:
        return
    for axis, size in enumerate(patch_size):
        factor = 1
        for stride in strides:
            factor *= int(stride[axis]) if isinstance(stride, (list, tuple)) else int(stride)
        if size % factor:
            raise ValueError(
                f"patch size {list(patch_size)}: axis {axis} ({size}) is not divisible by the network's total "
                f"downsampling {factor}; choose a multiple of {factor} or fewer stages"
            )


# ----------------------------------------------------------------------------------------------------------------
# Training


def train_supervised(
    dataset_id: int | str,
    configuration: str,
    fold: int | str,
    *,
    num_epochs: int,
    iterations_per_epoch: int,
    val_iterations: int,
    device: str = "cpu",
    trainer_class: type | None = None,
    initial_lr: float | None = None,
    run_final_validation: bool = False,
    plans_identifier: str = DEFAULT_PLANS_IDENTIFIER,
    seed: int | None = None,
    num_augmentation_workers: int | None = None,
    num_threads: int | None = None,
    in_process: bool = True,
    resume: bool = False,
    save_every: int | None = None,
) -> Path:
    """Train nnU-Net's stock `nnUNetTrainer` (or `trainer_class`) in this process; return the fold folder.

    The output lands where `nnUNetv2_train` would put it (`<Trainer>__<Plans>__<config>/fold_F`), with
    `checkpoint_final.pth`. The schedule attributes are set after construction, as nnU-Net's own length variants
    do. `seed` seeds Python, NumPy and torch first (network initialisation and patch sampling).
    `num_augmentation_workers` sets nnUNet_n_proc_DA for this call only (0: augment in this process; None: leave
    the environment as it is). `num_threads` sets torch's CPU threads for this call only: on a machine whose cores
    are shared with another busy process, 1 thread was 7x faster than 2 (threads that wait on each other).
    `run_final_validation` runs nnU-Net's sliding-window validation of the fold. `resume`: continue from the fold
    folder's checkpoint_latest.pth when there is one, as `nnUNetv2_train --c` does (a finished fold is not trained
    again); `save_every`: write checkpoint_latest.pth every so many epochs (nnU-Net: 50), what a resume starts from.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if trainer_class is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_class

    if seed is not None:
        seed_everything(seed)
    # Denormal floats made CPU iterations several times slower in stretches; flushing them keeps them steady.
    torch.set_flush_denormal(True)

    dataset_folder = preprocessed_dataset_folder(dataset_id)
    plans = load_json(str(dataset_folder / f"{plans_identifier}.json"))
    plans["continue_training"] = False  # the trainer pops it; the CLI sets it from --c
    dataset_json = load_json(str(dataset_folder / "dataset.json"))
    fold_value = fold if fold == "all" else int(fold)

    augmentation = None if num_augmentation_workers is None else str(num_augmentation_workers)
    with _environment(nnUNet_n_proc_DA=augmentation), _torch_threads(num_threads):
        trainer = trainer_class(
            plans=plans,
            configuration=configuration,
            fold=fold_value,
            dataset_json=dataset_json,
            device=torch.device(device),
        )
        trainer.num_epochs = int(num_epochs)
        trainer.num_iterations_per_epoch = int(iterations_per_epoch)
        trainer.num_val_iterations_per_epoch = int(val_iterations)
        if initial_lr is not None:
            trainer.initial_lr = float(initial_lr)
        if save_every is not None:
            trainer.save_every = int(save_every)
        output = Path(trainer.output_folder)
        if resume and (output / "checkpoint_final.pth").is_file():
            return output
        if resume and (output / "checkpoint_latest.pth").is_file():
            trainer.load_checkpoint(str(output / "checkpoint_latest.pth"))
            if seed is not None:
                # a stream of the epoch it resumes at: else the batches after each resume replay those of the first
                seed_everything(resumed_seed(seed, trainer.current_epoch))
        trainer.run_training()
        if run_final_validation:
            with in_process_pools(VALIDATION_POOL_MODULES, enabled=in_process):
                trainer.perform_actual_validation()
    return Path(trainer.output_folder)


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (network initialisation, nnU-Net's patch sampling)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resumed_seed(seed: int, epoch: int) -> int:
    """The seed of a training of `seed` resumed at `epoch`: its own for every epoch, the same on every machine."""
    return (seed * 1_000_003 + epoch) % 2**32


# ----------------------------------------------------------------------------------------------------------------
# Inference and evaluation


def predict_folder(
    model_folder: str | os.PathLike,
    input_folder: str | os.PathLike,
    output_folder: str | os.PathLike,
    folds: Sequence[int | str] = (0,),
    checkpoint_name: str = "checkpoint_final.pth",
    device: str = "cpu",
    use_mirroring: bool = False,
    save_probabilities: bool = False,
    in_process: bool = True,
) -> Path:
    """Predict every `<case>_0000.nii.gz` in `input_folder` into `output_folder/<case>.nii.gz` (nnUNetPredictor).

    `model_folder` is the trainer folder (`<Trainer>__<Plans>__<config>`) or one of its `fold_F` folders (then
    that fold is used). The trainer class is looked up by the name stored in the checkpoint, so a trainer of this
    package needs nnUNet_extTrainer (see `nnunet_rndpo env`). `in_process=True` preprocesses and exports in this
    process (nnU-Net's sequential path); False uses nnU-Net's worker processes (nnUNet_def_n_proc of them).
    """
    import torch
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model_folder = Path(model_folder)
    if model_folder.name.startswith("fold_") and not (model_folder / "plans.json").is_file():
        folds = (model_folder.name[len("fold_") :],)
        model_folder = model_folder.parent
    folds = tuple(f if f == "all" else int(f) for f in folds)
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=use_mirroring,
        perform_everything_on_device=True,
        device=torch.device(device),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=folds, checkpoint_name=checkpoint_name)
    if in_process:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per case
            predictor.predict_from_files_sequential(
                str(input_folder), str(output_folder), save_probabilities=save_probabilities, overwrite=True
            )
    else:
        predictor.predict_from_files(
            str(input_folder),
            str(output_folder),
            save_probabilities=save_probabilities,
            overwrite=True,
            num_processes_preprocessing=max(1, default_num_processes),
            num_processes_segmentation_export=max(1, default_num_processes),
        )
    return output_folder


def evaluate_checkpoint(
    checkpoint: Path | Sequence[Path],
    raw_dataset_folder: Path,
    predictions: Path,
    device: str = "cpu",
    mirroring: bool = False,
) -> dict:
    """Predict `raw_dataset_folder/imagesTs` with one checkpoint, or the ensemble of several (their logits averaged,
    as nnU-Net's predictor does with several folds), into a fresh `predictions` folder and score it against
    `labelsTs` (evaluate_folder). The networks are given to nnU-Net's predictor by hand, so a checkpoint of a trainer
    class nnU-Net cannot import (a benchmark's per-arm subclass) predicts too. `mirroring`: nnU-Net's test-time
    mirroring (its default in nnUNetv2_predict)."""
    import shutil

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_rndpo.proposals.model import load_model, load_model_like

    checkpoints = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    model = load_model(checkpoints[0], device)
    weights = [model.network.state_dict()]
    for other_checkpoint in checkpoints[1:]:
        weights.append(load_model_like(other_checkpoint, model, device).network.state_dict())
    predictor = nnUNetPredictor(use_mirroring=mirroring, device=torch.device(device), verbose=False, allow_tqdm=False)
    predictor.manual_initialization(
        model.network,
        model.plans_manager,
        model.configuration_manager,
        weights,
        model.dataset_json,
        "nnUNetTrainer",
        model.mirror_axes,
    )
    predictions = Path(predictions)
    if predictions.exists():
        shutil.rmtree(predictions)
    predictions.mkdir(parents=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per case
        predictor.predict_from_files_sequential(
            str(Path(raw_dataset_folder) / "imagesTs"), str(predictions), save_probabilities=False, overwrite=True
        )
    return evaluate_folder(predictions, Path(raw_dataset_folder) / "labelsTs", model.dataset_json["labels"])


def evaluate_folder(
    prediction_folder: str | os.PathLike,
    reference_folder: str | os.PathLike,
    labels: Sequence[int] | Mapping[str, int],
    file_ending: str = FILE_ENDING,
) -> dict[str, Any]:
    """Dice per foreground class between each prediction and its reference (same file name), and the means.

    `labels`: the foreground label values, or a dataset.json "labels" mapping (its 0/background is dropped).
    Every prediction needs a reference; references without a prediction are ignored. A class absent from both
    maps of a case scores 1.0 (the package's convention, see segmentation_metrics). Returns
    {"num_cases", "labels", "per_case": {case: {label: dice}}, "mean": {label: dice}, "foreground_mean": dice}.
    """
    import numpy as np

    from nnunet_rndpo.segmentation_metrics import dice_per_class

    foreground = _foreground_labels(labels)
    prediction_folder = Path(prediction_folder)
    reference_folder = Path(reference_folder)
    predictions = sorted(
        p for p in prediction_folder.iterdir() if p.name.endswith(file_ending) and not p.name.startswith(".")
    )
    if not predictions:
        raise FileNotFoundError(f"no *{file_ending} predictions in {prediction_folder}")
    per_case: dict[str, dict[int, float]] = {}
    for prediction_file in predictions:
        case = prediction_file.name[: -len(file_ending)]
        reference_file = reference_folder / prediction_file.name
        if not reference_file.is_file():
            raise FileNotFoundError(f"no reference {reference_file} for prediction {prediction_file}")
        dice = dice_per_class(_read_label_map(prediction_file), _read_label_map(reference_file), foreground)
        per_case[case] = {label: float(value) for label, value in zip(foreground, dice)}
    mean = {label: float(np.mean([scores[label] for scores in per_case.values()])) for label in foreground}
    return {
        "num_cases": len(per_case),
        "labels": foreground,
        "per_case": per_case,
        "mean": mean,
        "foreground_mean": float(np.mean(list(mean.values()))),
    }


def _foreground_labels(labels: Sequence[int] | Mapping[str, int]) -> list[int]:
    values = labels.values() if isinstance(labels, Mapping) else labels
    foreground = sorted({int(v) for v in values if not isinstance(v, (list, tuple)) and int(v) != 0})
    if not foreground:
        raise ValueError(f"no foreground labels in {labels!r}")
    return foreground


def _read_label_map(path: Path):
    import numpy as np
    import SimpleITK as sitk

    # Some real label files are stored as float32 holding integer values.
    return np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).astype(np.int16)


# ----------------------------------------------------------------------------------------------------------------
# Process-pool and environment helpers


class _ThreadPoolContext:
    """Stands in for `multiprocessing.get_context(...)`: its Pool is a thread pool of the same size."""

    @staticmethod
    def Pool(processes: int | None = None, *args: Any, **kwargs: Any) -> ThreadPool:  # noqa: N802 (mirrors the API)
        return ThreadPool(processes)


class _ThreadingMultiprocessing(ModuleType):
    """`multiprocessing` whose contexts make thread pools; every other attribute is the real module's."""

    def __init__(self) -> None:
        super().__init__("multiprocessing")

    def get_context(self, method: str | None = None) -> _ThreadPoolContext:
        return _ThreadPoolContext()

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


@contextlib.contextmanager
def in_process_pools(module_names: Sequence[str], enabled: bool = True) -> Iterator[None]:
    """Within the block, the process pools that the nnU-Net modules `module_names` start are thread pools.

    The same nnU-Net code runs; only the pool is a `ThreadPool` (same API, workers are threads with
    `is_alive()`), so no worker re-imports torch. Not for use while other threads call those modules.
    """
    if not enabled:
        yield
        return
    import importlib

    replacement = _ThreadingMultiprocessing()
    patched: list[tuple[ModuleType, Any]] = []
    try:
        for module_name in module_names:
            module = importlib.import_module(module_name)
            patched.append((module, module.multiprocessing))
            module.multiprocessing = replacement
        yield
    finally:
        for module, original in reversed(patched):
            module.multiprocessing = original


@contextlib.contextmanager
def _environment(**variables: str | None) -> Iterator[None]:
    """Set environment variables for the block (None: leave as is) and restore them afterwards."""
    saved = {name: os.environ.get(name) for name, value in variables.items() if value is not None}
    try:
        for name, value in variables.items():
            if value is not None:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads for the block (None: unchanged)."""
    if num_threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


@contextlib.contextmanager
def _maybe_quiet(quiet: bool) -> Iterator[None]:
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
