"""`nnunet_rndpo demo`: the whole story on an embedded default, in minutes on a CPU.

1. a synthetic 3D dataset (two classes, blurred and low-contrast boundaries) is written in nnU-Net raw layout:
   few labeled cases, an unlabeled pool, a held-out test set (or `--data` re-lays out a real raw dataset);
2. nnU-Net plans and preprocesses it; a small configuration inherits from 3d_fullres;
3. a supervised base nnU-Net is trained on the labeled cases only;
4. nnUNetTrainerRNDPO continues from it: proposals on the pool, judge, pairs, RN-DPO training;
5. base and RN-DPO predict the test set; Dice per class is printed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from nnunet_rndpo import nnunet_paths


DEMO_DATASET_ID = 990
DEMO_CONFIGURATION = "3d_demo"


@dataclass(frozen=True)
class DemoSchedule:
    base_epochs: int
    base_iterations: int
    rndpo_epochs: int
    rndpo_iterations: int
    val_iterations: int


FULL = DemoSchedule(base_epochs=30, base_iterations=50, rndpo_epochs=10, rndpo_iterations=50, val_iterations=5)
QUICK = DemoSchedule(base_epochs=2, base_iterations=10, rndpo_epochs=2, rndpo_iterations=5, val_iterations=2)


def _set_nnunet_environment(work: Path) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    from nnunet_rndpo.nnunet_env import ensure_ext_trainer

    ensure_ext_trainer()


def _step(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)


def relayout_real_dataset(source: Path, raw_root: Path, num_labeled: int, num_test: int, seed: int) -> Path:
    """Split a real raw dataset (imagesTr/labelsTr) into few labeled, an unlabeled pool and a test set.

    The pool's labels are kept aside in labelsUnlabeled (research only) and never used for training.
    """
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.demo.splits import labeled_case_ids, link_parts, split_cases

    source = Path(source)
    dataset_json = json.loads((source / "dataset.json").read_text())
    cases = labeled_case_ids(source)
    if len(cases) < num_labeled + num_test + 2:
        raise ValueError(f"{source} has {len(cases)} labeled cases; the demo needs at least {num_labeled + num_test + 2}")
    parts = split_cases(cases, seed, [("labeled", num_labeled), ("test", num_test)], rest="unlabeled")
    target = raw_root / f"Dataset{DEMO_DATASET_ID}_Demo{source.name.split('_', 1)[-1]}"
    link_parts(source, target, parts)
    save_json({**dataset_json, "numTraining": len(parts["labeled"])}, target / "dataset.json")
    save_json({**parts, "seed": seed, "source": str(source)}, target / "demo_split.json")
    return target


def run_demo(output: Path, data: Optional[Path] = None, quick: bool = False, seed: int = 0) -> int:
    started = time.perf_counter()
    work = Path(output).resolve()
    _set_nnunet_environment(work)
    import torch

    torch.set_flush_denormal(True)  # steady CPU speed (denormal floats made iterations 3-5x slower here)
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.synthetic import make_synthetic_dataset
    from nnunet_rndpo.training.settings import SETTINGS_ENV_VARIABLE

    schedule = QUICK if quick else FULL
    raw_root = Path(os.environ["nnUNet_raw"])
    if data is None:
        dataset_folder = make_synthetic_dataset(raw_root, DEMO_DATASET_ID, "RNDPODemo", num_labeled=6, num_unlabeled=20, num_test=8, seed=seed)
        _step(f"synthetic dataset written: {dataset_folder} (6 labeled, 20 unlabeled, 8 test cases)", started)
    else:
        dataset_folder = relayout_real_dataset(Path(data), raw_root, num_labeled=10, num_test=20, seed=seed)
        _step(f"real dataset {data} split into {dataset_folder} (see demo_split.json)", started)
    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    dataset_name = dataset_folder.name

    plans_file = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / "nnUNetPlans.json"
    if not plans_file.is_file():
        nnunet_steps.plan_and_preprocess(DEMO_DATASET_ID)
    configuration = nnunet_steps.add_configuration(
        DEMO_DATASET_ID, DEMO_CONFIGURATION, patch_size=(32, 32, 32), batch_size=2, features_per_stage=(8, 16, 32, 64)
    )
    _step("planned and preprocessed; configuration 3d_demo (patch 32^3, features 8-64) added", started)

    os.environ["nnUNet_n_proc_DA"] = "0"  # after planning: 0 crashes nnU-Net's planner, and is fastest on 2 cores
    base_folder = nnunet_paths.trainer_output_folder(DEMO_DATASET_ID, DEMO_CONFIGURATION, 0)
    if not (base_folder / "checkpoint_final.pth").is_file():
        nnunet_steps.train_supervised(
            DEMO_DATASET_ID, DEMO_CONFIGURATION, 0, num_epochs=schedule.base_epochs, iterations_per_epoch=schedule.base_iterations,
            val_iterations=schedule.val_iterations, initial_lr=1e-2, seed=seed,
        )
    _step(f"base model trained on the labeled cases only: {base_folder}", started)

    settings_file = work / "rndpo_settings.json"
    settings_file.write_text(json.dumps({
        "num_epochs": schedule.rndpo_epochs, "iterations_per_epoch": schedule.rndpo_iterations,
        "val_iterations_per_epoch": schedule.val_iterations, "initial_lr": 1e-3, "seed": seed,
    }, indent=2))
    os.environ[SETTINGS_ENV_VARIABLE] = str(settings_file)
    from nnunet_rndpo.training.trainers import nnUNetTrainerRNDPO

    rndpo_folder = nnunet_steps.train_supervised(
        DEMO_DATASET_ID, DEMO_CONFIGURATION, 0, num_epochs=schedule.rndpo_epochs, iterations_per_epoch=schedule.rndpo_iterations,
        val_iterations=schedule.val_iterations, trainer_class=nnUNetTrainerRNDPO, initial_lr=1e-3, seed=seed,
    )
    _step(f"RN-DPO fine-tuning done: {rndpo_folder} (pairs: rndpo_pairs.json, curves: progress_preference.png)", started)

    results = {}
    for name, folder in (("base", base_folder), ("rn_dpo", rndpo_folder)):
        predictions = nnunet_steps.predict_folder(folder.parent, dataset_folder / "imagesTs", work / "predictions" / name, folds=(0,))
        results[name] = nnunet_steps.evaluate_folder(predictions, dataset_folder / "labelsTs", dataset_json["labels"])
    _step("test set predicted by both models", started)

    labels = {int(v): k for k, v in dataset_json["labels"].items() if int(v) != 0}
    print()
    print(f"Held-out test Dice ({results['base']['num_cases']} cases never seen in training):")
    header = "model     " + "".join(f"{labels[l][:12]:>14}" for l in sorted(labels)) + f"{'mean':>10}"
    print(header)
    for name, result in results.items():
        row = f"{name:<10}" + "".join(f"{result['mean'][l]:14.4f}" for l in sorted(labels)) + f"{result['foreground_mean']:10.4f}"
        print(row)
    delta = results["rn_dpo"]["foreground_mean"] - results["base"]["foreground_mean"]
    print(f"RN-DPO minus base: {delta:+.4f} mean Dice, without any new label.")
    from nnunet_rndpo.atomic import save_json

    save_json({"results": results, "schedule": schedule.__dict__, "seconds": time.perf_counter() - started}, work / "demo_results.json")
    _step(f"report: {work / 'demo_results.json'}", started)
    return 0
