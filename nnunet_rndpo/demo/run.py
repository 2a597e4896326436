"""`nnunet_rndpo demo`: the whole story on an embedded default, in minutes on a CPU.

    data -> plan -> base (few labels) -> proposals -> judge and pairs -> RN-DPO | self-training -> test Dice

1. a synthetic 3D dataset (two classes, blurred and low-contrast boundaries) in nnU-Net raw layout: few labeled
   cases, an unlabeled pool, a held-out test set (or `--data` splits a real raw dataset, demo/splits.py);
2. nnU-Net plans and preprocesses it; a small configuration inherits from 3d_fullres;
3. a supervised base nnU-Net is trained on the labeled cases only;
4. proposals on the pool, the judge's scores and the mined pairs (pipeline.prepare_pairs, as the trainers do);
5. nnUNetTrainerRNDPO and, for the honest comparison, nnUNetTrainerSelfTrain continue from the base;
6. every model predicts the test set; Dice per class and the time of each phase are printed.

The screen shows one line per phase; nnU-Net's own output goes to <output>/logs/ (`--verbose` shows it).
Same seed, same machine, same figures: every random source is seeded, augmentation runs in this process,
torch uses a fixed number of threads and MKL its strict reproducible mode (floating-point results can still differ
between processor types).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, TextIO

from nnunet_rndpo import nnunet_paths

DEMO_DATASET_ID = 990
DEMO_CONFIGURATION = "3d_demo"
DEMO_THREADS = 2  # fixed, so that a run's floating-point reductions do not depend on the machine's core count
QUICK_WARNING = "--quick is a smoke run of every step: its numbers mean nothing."


@dataclass(frozen=True)
class DemoSchedule:
    base_epochs: int
    base_iterations: int
    tune_epochs: int
    tune_iterations: int
    val_iterations: int

    @property
    def base_total(self) -> int:
        return self.base_epochs * self.base_iterations

    @property
    def tune_total(self) -> int:
        return self.tune_epochs * self.tune_iterations


FULL = DemoSchedule(base_epochs=30, base_iterations=50, tune_epochs=10, tune_iterations=50, val_iterations=5)
QUICK = DemoSchedule(base_epochs=2, base_iterations=10, tune_epochs=2, tune_iterations=5, val_iterations=2)


# ------------------------------------------------------------------------------------------------ screen
class Screen:
    """One line per phase on the terminal, with its time; nnU-Net's output of the phase into a log file."""

    def __init__(self, log_folder: Path, verbose: bool, total_phases: int):
        self.log_folder = log_folder
        self.verbose = verbose
        self.total_phases = total_phases
        self.terminal: TextIO = sys.stdout
        self.seconds: dict[str, float] = {}
        log_folder.mkdir(parents=True, exist_ok=True)

    def say(self, line: str = "") -> None:
        print(line, file=self.terminal, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str, what: str, epochs: Optional[int] = None):
        """Runs a phase: its line, its output to logs/<name>.log, an epoch bar for trainings, its time."""
        index = len(self.seconds) + 1
        self.say(f"[{index}/{self.total_phases}] {name:<13} {what}")
        log_file = self.log_folder / f"{name.replace(' ', '_').replace('-', '_').lower()}.log"
        started = time.perf_counter()
        # line-buffered, so that `tail -f logs/<phase>.log` follows a running phase
        with open(log_file, "a", buffering=1) as log, self._progress(epochs) as on_line:
            stream = _LineStream(log, on_line)
            with contextlib.ExitStack() as stack:
                if not self.verbose:
                    stack.enter_context(contextlib.redirect_stdout(stream))
                    stack.enter_context(contextlib.redirect_stderr(stream))
                yield
        self.seconds[name] = time.perf_counter() - started
        self.say(f"{'':>6}{'':<13} done in {_duration(self.seconds[name])}")

    @contextlib.contextmanager
    def _progress(self, epochs: Optional[int]):
        if epochs is None or self.verbose:
            yield lambda line: None
            return
        from tqdm import tqdm

        # disable=None: no bar where the terminal is not one (a pipe, a CI log)
        bar = tqdm(
            total=epochs,
            desc=f"{'':>6}epochs",
            unit="epoch",
            file=self.terminal,
            leave=False,
            dynamic_ncols=True,
            disable=None,
        )
        epoch_line = re.compile(r": Epoch (\d+)\s*$")

        def on_line(line: str) -> None:
            match = epoch_line.search(line)
            if match:
                bar.n = int(match.group(1))
                bar.refresh()

        try:
            yield on_line
        finally:
            bar.close()


class _LineStream:
    """A text stream that writes to a log file and hands each complete line to a callback."""

    def __init__(self, log: TextIO, on_line):
        self.log = log
        self.on_line = on_line
        self._partial = ""

    def write(self, text: str) -> int:
        self.log.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.on_line(line)
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False


def _duration(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole} s" if whole < 90 else f"{whole // 60} min {whole % 60:02d} s"


# ------------------------------------------------------------------------------------------------ set-up
def _set_nnunet_environment(work: Path) -> None:
    nnunet_paths.set_nnunet_folders(work)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    from nnunet_rndpo.nnunet_env import ensure_ext_trainer

    ensure_ext_trainer()


def make_deterministic(seed: int) -> None:
    """Every random source seeded, deterministic torch algorithms, a fixed thread count: the same figures on a
    rerun on the same machine. (Trainings are seeded again at their start: nnunet_steps.train_supervised.)"""
    # MKL picks its code path per call (data alignment among others): without strict conditional numerical
    # reproducibility, 12 runs of the quick demo on one idle machine gave two first-epoch losses (5 and 7 runs,
    # apart in the 7th digit) and tables apart in the 4th decimal. Read when MKL first computes, so set before any
    # training; AUTO keeps the fastest path of the processor. A user's own setting wins.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    import torch

    from nnunet_rndpo.demo.nnunet_steps import seed_everything

    seed_everything(seed)
    torch.set_num_threads(DEMO_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)  # steady CPU speed (denormal floats made iterations 3-5x slower here)


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
        raise ValueError(
            f"{source} has {len(cases)} labeled cases; the demo needs at least {num_labeled + num_test + 2}"
        )
    parts = split_cases(cases, seed, [("labeled", num_labeled), ("test", num_test)], rest="unlabeled")
    target = raw_root / f"Dataset{DEMO_DATASET_ID}_Demo{source.name.split('_', 1)[-1]}"
    link_parts(source, target, parts)
    save_json({**dataset_json, "numTraining": len(parts["labeled"])}, target / "dataset.json")
    save_json({**parts, "seed": seed, "source": str(source)}, target / "demo_split.json")
    return target


# ------------------------------------------------------------------------------------------------ the story
def run_demo(
    output: Path, data: Optional[Path] = None, quick: bool = False, seed: int = 0, verbose: bool = False
) -> int:
    started = time.perf_counter()
    work = Path(output).resolve()
    _set_nnunet_environment(work)
    make_deterministic(seed)
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.synthetic import make_synthetic_dataset
    from nnunet_rndpo.training.settings import SETTINGS_ENV_VARIABLE

    schedule = QUICK if quick else FULL
    screen = Screen(work / "logs", verbose, total_phases=8)
    screen.say(
        f"nnunet_rndpo demo (seed {seed}{', quick' if quick else ''}): working folder {work}; "
        f"nnU-Net's logs in {work / 'logs'}"
    )
    if quick:
        screen.say(QUICK_WARNING)
    raw_root = Path(os.environ["nnUNet_raw"])
    if data is None:
        with screen.phase("data", "a synthetic 3D dataset: 6 labeled, 20 unlabeled and 8 test cases, two classes"):
            dataset_folder = make_synthetic_dataset(
                raw_root, DEMO_DATASET_ID, "RNDPODemo", num_labeled=6, num_unlabeled=20, num_test=8, seed=seed
            )
    else:
        with screen.phase(
            "data", f"{data} split into 10 labeled, 20 test cases and an unlabeled pool (demo_split.json)"
        ):
            dataset_folder = relayout_real_dataset(Path(data), raw_root, num_labeled=10, num_test=20, seed=seed)
    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())

    with screen.phase(
        "plan", f"nnU-Net plans and preprocesses; configuration {DEMO_CONFIGURATION} (patch 32^3, features 8-64)"
    ):
        if not nnunet_paths.plans_path(DEMO_DATASET_ID).is_file():
            nnunet_steps.plan_and_preprocess(DEMO_DATASET_ID)
        nnunet_steps.add_configuration(
            DEMO_DATASET_ID,
            DEMO_CONFIGURATION,
            patch_size=(32, 32, 32),
            batch_size=2,
            features_per_stage=(8, 16, 32, 64),
        )
    os.environ["nnUNet_n_proc_DA"] = "0"  # after planning: 0 crashes nnU-Net's planner; augmentation in this process

    base_folder = nnunet_paths.trainer_output_folder(DEMO_DATASET_ID, DEMO_CONFIGURATION, 0)
    with screen.phase(
        "base",
        f"nnUNetTrainer on the labeled cases only, {schedule.base_total:,} iterations",
        epochs=schedule.base_epochs,
    ):
        if not (base_folder / "checkpoint_final.pth").is_file():
            nnunet_steps.train_supervised(
                DEMO_DATASET_ID,
                DEMO_CONFIGURATION,
                0,
                num_epochs=schedule.base_epochs,
                iterations_per_epoch=schedule.base_iterations,
                val_iterations=schedule.val_iterations,
                initial_lr=1e-2,
                seed=seed,
            )

    settings_file = work / "rndpo_settings.json"
    save_json(
        {
            "num_epochs": schedule.tune_epochs,
            "iterations_per_epoch": schedule.tune_iterations,
            "val_iterations_per_epoch": schedule.val_iterations,
            "initial_lr": 1e-3,
            "seed": seed,
            # the agreement judge on the base's mirror members, the set-up this demo has always shown; on your
            # data `recipe: auto` starts from what gained there (README, "Which judge")
            "recipe": "none",
        },
        settings_file,
    )
    os.environ[SETTINGS_ENV_VARIABLE] = str(settings_file)
    prepared = _proposals_and_pairs(screen, base_folder / "checkpoint_final.pth")

    from nnunet_rndpo.training.trainers import nnUNetTrainerRNDPO, nnUNetTrainerSelfTrain

    folders = {"base": base_folder}
    for name, label, trainer_class, what in (
        (
            "rn_dpo",
            "RN-DPO",
            nnUNetTrainerRNDPO,
            "on the mined pairs, frozen base as reference, + Dice+CE on the chosen mask",
        ),
        (
            "self_train",
            "self-training",
            nnUNetTrainerSelfTrain,
            "Dice+CE on the judge's top proposal of each case (the baseline)",
        ),
    ):
        with screen.phase(
            label, f"{schedule.tune_total:,} iterations from the base, {what}", epochs=schedule.tune_epochs
        ):
            folders[name] = nnunet_steps.train_supervised(
                DEMO_DATASET_ID,
                DEMO_CONFIGURATION,
                0,
                num_epochs=schedule.tune_epochs,
                iterations_per_epoch=schedule.tune_iterations,
                val_iterations=schedule.val_iterations,
                trainer_class=trainer_class,
                initial_lr=1e-3,
                seed=seed,
            )

    results = {}
    test_cases = len(list((dataset_folder / "labelsTs").glob(f"*{dataset_json['file_ending']}")))
    with screen.phase("test", f"the {len(folders)} models predict the {test_cases} held-out test cases"):
        for name, folder in folders.items():
            predictions = nnunet_steps.predict_folder(
                folder.parent, dataset_folder / "imagesTs", work / "predictions" / name, folds=(0,)
            )
            results[name] = nnunet_steps.evaluate_folder(
                predictions, dataset_folder / "labelsTs", dataset_json["labels"]
            )

    screen.say()
    for line in result_table(results, dataset_json["labels"]):
        screen.say(line)
    total = time.perf_counter() - started
    screen.say(
        "\nTime: "
        + ", ".join(f"{name} {_duration(seconds)}" for name, seconds in screen.seconds.items())
        + f"; total {_duration(total)}"
    )
    if quick:
        screen.say(QUICK_WARNING)
    report = {
        "results": results,
        "schedule": asdict(schedule),
        "seed": seed,
        "pairs": prepared.record["summary"],
        "judge": prepared.record["judge"],
        "phase_seconds": screen.seconds,
        "seconds": total,
        "machine": _machine(),
    }
    save_json(report, work / "demo_results.json")
    screen.say(f"Report: {work / 'demo_results.json'}; models and nnU-Net's logs under {work / 'nnUNet_results'}")
    return 0


def _proposals_and_pairs(screen: Screen, checkpoint: Path):
    """Proposals, judge scores and pairs, made here with the settings the trainers resolve (RNDPO_SETTINGS, as
    `nnunet_rndpo prepare` makes them): the trainers then find them done and read the pairs file."""
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.pairs import PairSettings
    from nnunet_rndpo.pipeline import prepare_pairs
    from nnunet_rndpo.proposals.model import load_model_like
    from nnunet_rndpo.proposals.plan import plan_members
    from nnunet_rndpo.proposals.pool import unlabeled_pool
    from nnunet_rndpo.proposals.run import generate_proposals
    from nnunet_rndpo.training.run_settings import run_settings
    from nnunet_rndpo.training.trainers import nnUNetTrainerRNDPO

    location = locate(DEMO_DATASET_ID, DEMO_CONFIGURATION, 0)
    model = load_model_like(checkpoint, location, "cpu")
    settings, _ = run_settings(nnUNetTrainerRNDPO.settings_overrides, location)
    pair_settings = PairSettings.from_run_settings(settings)
    members = plan_members(pair_settings.proposals, model.mirror_axes)
    sources = sorted({member.source for member in members})
    pool = unlabeled_pool(location)
    with screen.phase(
        "proposals", f"{len(members)} per unlabeled case ({' + '.join(sources)}) for {len(pool.case_ids)} cases"
    ):
        generate_proposals(model, pool, location.store_folder(checkpoint), pair_settings.proposals, progress=False)
    with screen.phase(
        "judge",
        f"'{pair_settings.judge}' scores every proposal; pairs mined '{pair_settings.selection}' "
        "(chosen = judge's best)",
    ):
        prepared = prepare_pairs(location, model, pair_settings, progress=False, log=print)
    summary = prepared.record["summary"]
    screen.say(
        f"{'':>6}{'':<13} {summary['pairs']} pairs from {summary['cases_total']} cases; the two masks of a pair "
        f"differ in {summary['mean_disagreement_voxels']:.0f} voxels on average"
    )
    return prepared


def result_table(results: dict, labels: dict) -> list[str]:
    """The held-out Dice table, each fine-tuned model against the base."""
    names = {int(v): k for k, v in labels.items() if int(v) != 0}
    titles = {"base": "base", "rn_dpo": "RN-DPO", "self_train": "self-training"}
    lines = [f"Held-out test Dice ({results['base']['num_cases']} cases never seen in training):"]
    lines.append(
        f"{'model':<15}"
        + "".join(f"{names[label][:12]:>14}" for label in sorted(names))
        + f"{'mean':>10}{'vs base':>10}"
    )
    base = results["base"]["foreground_mean"]
    for name, result in results.items():
        mean = result["foreground_mean"]
        versus = "" if name == "base" else f"{mean - base:+10.4f}"
        lines.append(
            f"{titles.get(name, name):<15}"
            + "".join(f"{_class_dice(result, label):14.4f}" for label in sorted(names))
            + f"{mean:10.4f}{versus}"
        )
    lines.append("No new label was used: the fine-tuned models saw only the base's 6 labels and the unlabeled pool.")
    return lines


def _class_dice(result: dict, label: int) -> float:
    mean = result["mean"]
    return mean[label] if label in mean else mean[str(label)]


def _machine() -> dict:
    import platform

    import torch

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
