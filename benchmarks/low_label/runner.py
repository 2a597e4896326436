"""Running one arm: train it (a base, the upper bound, or a fine-tuning from its base with a judge), or score the
ensemble of a model's folds; score it on the test cases and the whole validation cases; record its result JSON.
Also the judge audit on the validation cases, which the plans read to choose the label-free judge."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from benchmarks.low_label import models
from benchmarks.low_label.arms import BASE_KINDS, FOLD_ENSEMBLE, Arm, arm_record
from benchmarks.low_label.catalogue import JUDGES, MEASURED_WITH, ORACLE_SWEEP
from benchmarks.low_label.data import validation_folder
from benchmarks.low_label.protocols import CONFIGURATION, Protocol, Schedule
from benchmarks.low_label.scheduling import claim, result_file, wait_for
from benchmarks.low_label.timings import phase_seconds

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")


@dataclass(frozen=True)
class Bench:
    """What every arm of a run shares: the work folder, the protocol, its schedule and the machine's settings."""

    work: Path
    protocol: Protocol
    schedule: Schedule
    threads: int = 2
    device: str = "cpu"

    def model_folder(self, arm: Arm) -> Path:
        return models.model_folder(arm, self.protocol.upper_id if arm.kind == "upper" else self.protocol.dataset_id)

    def scored_folders(self, arm: Arm) -> list[Path]:
        """The fold folders of the models an arm that does not train scores: every fold of its model (fold 0
        first) for an ensemble, else the one the arm without mirroring trained."""
        trained = replace(arm, mirroring=False)
        if arm.fold != FOLD_ENSEMBLE:
            return [self.model_folder(trained)]
        return [self.model_folder(replace(trained, fold=fold)) for fold in range(self.protocol.folds)]


def fine_tuning_settings(arm: Arm, schedule: Schedule, dataset_id: int) -> dict:
    """The RNDPO_SETTINGS of a fine-tuning arm: its base, judge, mining, seed and schedule, MEASURED_WITH, then the
    arm's own settings (a preference variant's change wins)."""
    judge, options = JUDGES[arm.judge]
    return {
        "base_checkpoint": str(models.base_folder(arm.seed, dataset_id, arm.fold) / "checkpoint_final.pth"),
        "judge": judge,
        "judge_options": options,
        "mining": arm.mining,
        "seed": arm.seed,
        "num_epochs": schedule.tune_epochs,
        "iterations_per_epoch": schedule.tune_iterations,
        "val_iterations_per_epoch": schedule.val_iterations,
        "initial_lr": schedule.tune_lr,
        **MEASURED_WITH,
        **arm.settings,
    }


def train(arm: Arm, bench: Bench) -> tuple[Path, dict]:
    """Trains the arm's model; returns its fold folder and the seconds it took."""
    import torch

    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.training.settings import SETTINGS_ENV_VARIABLE

    torch.set_num_threads(bench.threads)
    started = time.perf_counter()
    schedule, dataset_id = bench.schedule, bench.protocol.dataset_id
    if arm.kind in BASE_KINDS:
        folder = nnunet_steps.train_supervised(
            bench.protocol.upper_id if arm.kind == "upper" else dataset_id,
            CONFIGURATION,
            models.nnunet_fold(arm),
            num_epochs=schedule.base_epochs,
            iterations_per_epoch=schedule.base_iterations,
            val_iterations=schedule.val_iterations,
            trainer_class=models.unique_trainer(trainer_class(arm), arm),
            initial_lr=schedule.base_lr,
            seed=arm.seed,
            num_threads=bench.threads,
            device=bench.device,
            # a checkpoint every epoch, and an interrupted fold goes on from it in the next run (a session's
            # processes end with it; a base is hours of a 2-core CPU): training_s is then this run's part
            resume=True,
            save_every=1,
        )
        return folder, {"training_s": time.perf_counter() - started}
    settings = fine_tuning_settings(arm, schedule, dataset_id)
    os.environ[SETTINGS_ENV_VARIABLE] = str(write_settings_file(arm, bench, settings))
    folder = nnunet_steps.train_supervised(
        dataset_id,
        CONFIGURATION,
        models.nnunet_fold(arm),
        num_epochs=settings["num_epochs"],
        iterations_per_epoch=settings["iterations_per_epoch"],
        val_iterations=settings["val_iterations_per_epoch"],
        trainer_class=models.unique_trainer(trainer_class(arm), arm),
        initial_lr=settings["initial_lr"],  # an arm's own (e.g. the step-matched self-training) wins
        seed=arm.seed,
        num_threads=bench.threads,
        device=bench.device,
        resume=True,  # the preference trainers write checkpoint_latest every epoch; --c keeps the first pairs
    )
    os.environ.pop(SETTINGS_ENV_VARIABLE, None)
    return folder, {"total_s": time.perf_counter() - started}


def trainer_class(arm: Arm) -> type:
    """The nnU-Net trainer an arm trains with: nnU-Net's own for a base, the package's preference trainers else."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_rndpo.training.trainers import nnUNetTrainerDPO, nnUNetTrainerRNDPO, nnUNetTrainerSelfTrain

    if arm.kind in BASE_KINDS:
        return nnUNetTrainer
    return {"rn_dpo": nnUNetTrainerRNDPO, "dpo": nnUNetTrainerDPO, "self_train": nnUNetTrainerSelfTrain}[arm.kind]


def write_settings_file(arm: Arm, bench: Bench, settings: dict) -> Path:
    """The arm's RNDPO_SETTINGS file, `<work>/settings/<arm>.json`."""
    settings_file = bench.work / "settings" / f"{arm.name}.json"
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2))
    return settings_file


def prepare_start_phase(arm: Arm, bench: Bench) -> None:
    """Runs a fine-tuning arm's start phase ahead of its training, as the training would (the settings resolved the
    same way, the same base, pool and store): the proposal store, the judge's scores and the pairs, which the training
    then reads instead of making. A part with nothing else to do runs it while other parts work; cases another process
    is generating or scoring are left to it."""
    import torch

    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.training.run_settings import prepare_start_phase as prepare_run_start_phase
    from nnunet_rndpo.training.settings import SETTINGS_ENV_VARIABLE

    torch.set_num_threads(bench.threads)
    settings_file = write_settings_file(
        arm, bench, fine_tuning_settings(arm, bench.schedule, bench.protocol.dataset_id)
    )
    prepared = prepare_run_start_phase(
        trainer_class(arm).settings_overrides,
        locate(bench.protocol.dataset_id, CONFIGURATION, models.nnunet_fold(arm)),
        bench.device,
        environ={**os.environ, SETTINGS_ENV_VARIABLE: str(settings_file)},
        log=lambda message: print(message, flush=True),
        progress=False,
    )
    print(f"start phase of {arm.name} made ahead: pairs {json.dumps(prepared.record['summary'])}", flush=True)


def run_arm(arm: Arm, bench: Bench) -> dict:
    """Trains (or, for an ensemble of folds, only scores) the arm; its result without the validation scores of a
    trained arm (`score_validation` adds them)."""
    if not arm.trains:
        return score_models(arm, bench)
    folder, phases = train(arm, bench)
    result = {"arm": arm_record(arm), "folder": str(folder), "seconds": phases, "schedule": asdict(bench.schedule)}
    result["validation_curve"] = validation_curve(folder)
    result["network_passes_per_case"] = arm.network_passes()
    result["test"] = {}
    for checkpoint in CHECKPOINTS:
        predictions = bench.work / "predictions" / arm.name / checkpoint.split(".")[0]
        result["test"][checkpoint.split(".")[0]] = evaluate_checkpoint(
            folder / checkpoint, predictions, bench.device, dataset_id=bench.protocol.dataset_id
        )
    if arm.kind not in BASE_KINDS:
        result["pairs"] = json.loads((folder / "rndpo_pairs.json").read_text())["summary"]
        result["log_timings"] = phase_seconds(folder)
    return result


def score_models(arm: Arm, bench: Bench) -> dict:
    """An arm that trains nothing, on the test and the whole validation cases: the ensemble of every fold's final
    checkpoint of the arm's model, as nnU-Net's predictor makes it from several folds (`nnUNetv2_predict -f 0 1 2 3
    4`: the folds' logits averaged), or one model's; with test-time mirroring if the arm says so."""
    started = time.perf_counter()
    checkpoints = [folder / "checkpoint_final.pth" for folder in bench.scored_folders(arm)]
    scores = {}
    for split, cases in (("test", None), ("validation", validation_folder(bench.work))):
        predictions = bench.work / "predictions" / arm.name / f"{split}_final"
        scores[split] = evaluate_ensemble(
            checkpoints, predictions, bench.device, cases, bench.protocol.dataset_id, arm.mirroring
        )
    return {
        "arm": arm_record(arm),
        "folder": str(checkpoints[0].parent.parent if len(checkpoints) > 1 else checkpoints[0].parent),
        "checkpoints": [str(path) for path in checkpoints],
        "seconds": {"scoring_s": time.perf_counter() - started},
        "schedule": asdict(bench.schedule),
        "network_passes_per_case": arm.network_passes(len(checkpoints)),
        "validation_curve": [],
        "test": {"checkpoint_final": scores["test"]},
        "validation": {"checkpoint_final": scores["validation"]},
    }


def validation_curve(folder: Path) -> list[float]:
    import torch

    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    return [float(v) for v in checkpoint["logging"]["mean_fg_dice"]]


def raw_cases(dataset_id: Optional[int]) -> Path:
    """The protocol's raw dataset folder (its imagesTs/labelsTs are the test cases)."""
    from nnunet_rndpo import nnunet_paths

    if dataset_id is None:
        raise ValueError("give the cases to score or the dataset whose test cases they are")
    return Path(os.environ["nnUNet_raw"]) / nnunet_paths.find_dataset_name(dataset_id)


def evaluate_checkpoint(
    checkpoint: Path,
    predictions: Path,
    device: str = "cpu",
    cases: Optional[Path] = None,
    dataset_id: Optional[int] = None,
) -> dict:
    """Predict the test images (or those of `cases`/imagesTs) with a checkpoint (no trainer look-up, no mirroring)
    and compute Dice per class."""
    from nnunet_rndpo.demo import nnunet_steps

    return nnunet_steps.evaluate_checkpoint(checkpoint, cases or raw_cases(dataset_id), predictions, device)


def evaluate_ensemble(
    checkpoints: list[Path],
    predictions: Path,
    device: str = "cpu",
    cases: Optional[Path] = None,
    dataset_id: Optional[int] = None,
    mirroring: bool = False,
) -> dict:
    """Predict the test images (or those of `cases`/imagesTs) with the ensemble of `checkpoints` (nnU-Net's predictor
    given every checkpoint's weights, as it loads several folds; no trainer look-up) and compute Dice per class."""
    from nnunet_rndpo.demo import nnunet_steps

    raw = Path(cases or raw_cases(dataset_id))
    return nnunet_steps.evaluate_checkpoint(checkpoints, raw, predictions, device, mirroring=mirroring)


def score_validation(work: Path, name: str, result: dict, device: str = "cpu") -> dict:
    """Adds the final checkpoint's Dice on the whole validation cases to a finished arm's result (once)."""
    if "validation" not in result:
        checkpoint = Path(result["folder"]) / "checkpoint_final.pth"
        predictions = work / "predictions" / name / "validation_final"
        scores = evaluate_checkpoint(checkpoint, predictions, device, validation_folder(work))
        result["validation"] = {"checkpoint_final": scores}
    return result


def scored_results(work: Path, device: str = "cpu") -> dict:
    """Every finished arm's result by Arm, each with its validation Dice (scored and saved for arms finished before
    the gate read whole validation cases)."""
    from benchmarks.low_label.results import load_results, result_files
    from nnunet_rndpo.atomic import save_json

    for path in result_files(work):
        result = json.loads(path.read_text())
        if "arm" in result and "validation" not in result:
            save_json(score_validation(work, path.stem, result, device), path)
    return load_results(work)


def inputs(arm: Arm, bench: Bench) -> list[Path]:
    """The checkpoints an arm reads, which another part may still be training: the models it scores, or the base
    (of its seed and fold) a fine-tuning arm starts from."""
    if not arm.trains:
        return [folder / "checkpoint_final.pth" for folder in bench.scored_folders(arm)]
    if arm.kind not in BASE_KINDS:
        return [bench.model_folder(arm.base) / "checkpoint_final.pth"]
    return []


def ready(arm: Arm, bench: Bench) -> bool:
    """Whether every input of the arm is there (a queue stage runs a ready arm before one it would wait for)."""
    return all(path.is_file() for path in inputs(arm, bench))


def record(arm: Arm, bench: Bench) -> None:
    """Runs the arm unless it has finished or another process holds it (`claim`), after waiting for its inputs;
    writes <work>/arms/<name>.json with the machine and the date."""
    from nnunet_rndpo.atomic import save_json

    for path in inputs(arm, bench):
        wait_for(path)
    target = result_file(bench.work, arm)
    if target.is_file():
        print(f"skip {arm.name} (finished)", flush=True)
        return
    with claim(bench.work / "arms", arm.name) as claimed:
        if not claimed:
            print(f"skip {arm.name} (another process is running it)", flush=True)
            return
        print(f"=== {arm.name}", flush=True)
        result = score_validation(bench.work, arm.name, run_arm(arm, bench), bench.device)
        result["machine"] = {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": bench.threads,
            "device": bench.device,
        }
        result["date"] = time.strftime("%Y-%m-%d")
        save_json(result, target)
    best = result["test"].get("checkpoint_best")
    print(
        f"    test Dice final {result['test']['checkpoint_final']['foreground_mean']:.4f}"
        + (f", best {best['foreground_mean']:.4f}" if best else ""),
        flush=True,
    )


def audit_on_validation(
    bench: Bench,
    seed: int,
    label_free: tuple[str, ...],
    proposals: Optional[dict] = None,
    folder: str = "audit",
    fold=None,
    case_ids: Optional[list[str]] = None,
) -> dict:
    """The judge audit on the validation cases (default: the fold's validation cases; `case_ids` for the folds
    protocol, whose validation cases are in no fold): picks the best label-free judge (never the test set).
    `proposals` (a ProposalSettings dict, e.g. cross-model proposals) audits other proposals than the mirror
    members, into <work>/<folder>."""
    import torch

    from nnunet_rndpo.audit.run import run_audit
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.proposals.model import load_model_like
    from nnunet_rndpo.proposals.plan import ProposalSettings

    torch.set_num_threads(bench.threads)
    output = bench.work / folder
    if (output / "judge_audit.json").is_file():
        return json.loads((output / "judge_audit.json").read_text())
    base = Arm("base", seed, fold=fold)
    location = locate(bench.protocol.dataset_id, CONFIGURATION, models.nnunet_fold(base))
    model = load_model_like(bench.model_folder(base) / "checkpoint_final.pth", location, bench.device)
    # every label-free judge and every oracle level of the sweep, each under its benchmark name: the oracles'
    # measured reliability is the x axis of the reliability curve
    specs = [(name, *JUDGES[name]) for name in (*label_free, *ORACLE_SWEEP) if name in JUDGES] + ["oracle"]
    settings = ProposalSettings.from_dict(proposals or {})
    store = bench.work / "audit_proposals" / folder if proposals else None  # the default store: mirror members
    return run_audit(
        model,
        location,
        specs,
        settings,
        output,
        device=bench.device,
        case_ids=case_ids,
        margin=0.02,
        seed=seed,
        store_folder=store,
    )
