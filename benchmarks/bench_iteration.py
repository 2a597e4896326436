"""Seconds per training iteration: stock nnUNetTrainer against each preference trainer, same plans, batch
and device, in one run (data loading and augmentation included, as in real training).

    python benchmarks/bench_iteration.py --setup-synthetic --work /tmp/bench_iter --output bench_iteration.json
    python benchmarks/bench_iteration.py --setup-synthetic --network tiny --profile --work /tmp/bench_iter \
        --output proxy.json
    python benchmarks/bench_iteration.py --setup-hippocampus ../shared/data/Dataset004_Hippocampus \
        --work /tmp/bench_hippo --output hippo.json
    python benchmarks/bench_iteration.py -d 4 -c 3d_fullres --iterations 30 --output hippocampus_iter.json

Proposal generation, judging and mining happen in on_train_start and are not timed here (see
bench_proposals.py). Writes a JSON with the per-trainer seconds per iteration and the ratios to nnUNetTrainer.

`--network tiny` (features 4-32 on a 32^3 patch) is the CPU proxy for a GPU step: with so small a network the
per-operation overhead dominates, as it does on a GPU. `--profile` adds, per trainer, one step under
torch.profiler: operator calls and self time, the top operators by self time. On a GPU the JSON also holds each
trainer's peak memory. Each trainer's first-step `rewards/margins` is recorded: with an exact reference it is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from nnunet_rndpo import nnunet_paths

NETWORKS = {  # name -> (configuration, features per stage)
    "small": ("3d_bench", (8, 16, 32, 64)),
    "tiny": ("3d_proxy", (4, 8, 16, 32)),
}


def _setup_synthetic(work: Path, threads: int, network: str = "small") -> tuple[int, str]:
    nnunet_paths.set_nnunet_folders(work)
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.synthetic import make_synthetic_dataset

    dataset_id = 960
    configuration, features = NETWORKS[network]
    if not (work / "nnUNet_preprocessed" / "Dataset960_RNDPOBench" / "nnUNetPlans.json").is_file():
        make_synthetic_dataset(
            work / "nnUNet_raw", dataset_id, "RNDPOBench", num_labeled=8, num_unlabeled=8, num_test=0
        )
        nnunet_steps.plan_and_preprocess(dataset_id)
    nnunet_steps.add_configuration(
        dataset_id, configuration, patch_size=(32, 32, 32), batch_size=2, features_per_stage=features
    )
    os.environ["nnUNet_n_proc_DA"] = "0"
    if not (nnunet_paths.trainer_output_folder(dataset_id, configuration, 0) / "checkpoint_final.pth").is_file():
        nnunet_steps.train_supervised(
            dataset_id,
            configuration,
            0,
            num_epochs=2,
            iterations_per_epoch=20,
            val_iterations=2,
            seed=0,
            num_threads=threads,
        )
    return dataset_id, configuration


def _first_step_margin(trainer, output: dict):
    """rewards/margins of the first step (policy == reference: 0 with an exact reference), or None."""
    if "stat::rewards/margins" in output:  # older trainers returned the statistics per step
        return float(output["stat::rewards/margins"])
    statistics = getattr(trainer, "statistics", None)  # the preference trainers' EpochStatistics
    if statistics is None:
        return None
    return statistics.epoch_means().get("rewards/margins")


def _profile_step(trainer, batch, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        trainer.train_step(batch)
    averages = profiler.key_averages()
    # the trainer's labelled parts (record_function "rndpo/..."): wall time and the aten calls inside each
    parts: dict = {}
    events = list(profiler.events())
    for part in (e for e in events if e.name.startswith("rndpo/")):
        inside = [
            e
            for e in events
            if e.name.startswith("aten::")
            and e.thread == part.thread
            and part.time_range.start <= e.time_range.start
            and e.time_range.end <= part.time_range.end
        ]
        entry = parts.setdefault(part.name, {"ms": 0.0, "aten_calls": 0})
        entry["ms"] += part.cpu_time_total / 1000.0
        entry["aten_calls"] += len(inside)
    events = [e for e in averages if e.key.startswith("aten::")]

    def self_time(event):
        return (
            getattr(event, "self_device_time_total", 0) if trainer.device.type == "cuda" else event.self_cpu_time_total
        )

    events.sort(key=self_time, reverse=True)
    return {
        "aten_calls": int(sum(e.count for e in events)),
        "aten_self_ms": sum(self_time(e) for e in events) / 1000.0,
        "top": [{"op": e.key, "calls": int(e.count), "self_ms": self_time(e) / 1000.0} for e in events[:top]],
        "parts": parts,
    }


def _setup_hippocampus(work: Path, data: Path, threads: int, labeled: int = 10, unlabeled: int = 10) -> tuple[int, str]:
    """A small Hippocampus split (the first `labeled` cases labeled, the next `unlabeled` as the pool), its
    3d_fullres plan with features 16-128 (the configuration of the low-label benchmark) and a briefly trained
    base: the step cost does not depend on how good the base is."""
    nnunet_paths.set_nnunet_folders(work)
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.splits import labeled_case_ids, link_parts

    dataset_id, configuration = 961, "3d_bench"
    raw = work / "nnUNet_raw" / "Dataset961_HippoBench"
    dataset_json = json.loads((data / "dataset.json").read_text())
    cases = labeled_case_ids(data)[: labeled + unlabeled]
    if not (work / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json").is_file():
        link_parts(data, raw, {"labeled": cases[:labeled], "unlabeled": cases[labeled:]})
        save_json({**dataset_json, "name": "HippoBench", "numTraining": labeled}, raw / "dataset.json")
        os.environ.pop("nnUNet_n_proc_DA", None)
        nnunet_steps.plan_and_preprocess(dataset_id, configurations=("3d_fullres",), num_processes=1)
    plans = json.loads(nnunet_paths.plans_path(dataset_id).read_text())
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    nnunet_steps.add_configuration(
        dataset_id, configuration, patch_size=patch, batch_size=2, features_per_stage=(16, 32, 64, 128)
    )
    os.environ["nnUNet_n_proc_DA"] = "0"
    if not (nnunet_paths.trainer_output_folder(dataset_id, configuration, 0) / "checkpoint_final.pth").is_file():
        nnunet_steps.train_supervised(
            dataset_id,
            configuration,
            0,
            num_epochs=1,
            iterations_per_epoch=20,
            val_iterations=2,
            seed=0,
            num_threads=threads,
        )
    return dataset_id, configuration


def time_trainer(
    trainer_class,
    plans: dict,
    configuration: str,
    dataset_json: dict,
    device,
    iterations: int,
    warmup: int,
    profile_step: bool = False,
) -> dict:
    import torch

    plans = dict(plans, continue_training=False)
    trainer = trainer_class(plans, configuration, 0, dataset_json, device)
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, loading = [], []
    first_margin = None
    for index in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        batch = next(trainer.dataloader_train)
        loaded = time.perf_counter()
        output = trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index == 0:
            first_margin = _first_step_margin(trainer, output)
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
            loading.append(loaded - started)
    result = {"seconds": seconds, "first_step_margin": first_margin, "loading_seconds": loading}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile_step:
        result["profile"] = _profile_step(trainer, next(trainer.dataloader_train))
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        finish = getattr(loader, "_finish", None)
        if finish:
            finish()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default=None)
    parser.add_argument("-c", "--configuration", default=None)
    parser.add_argument(
        "--setup-synthetic", action="store_true", help="build a synthetic dataset and a tiny base in --work"
    )
    parser.add_argument(
        "--setup-hippocampus",
        type=Path,
        default=None,
        metavar="DATASET004_FOLDER",
        help="build a 10 + 10 case Hippocampus split, its features 16-128 configuration and a base in --work",
    )
    parser.add_argument(
        "--network",
        choices=sorted(NETWORKS),
        default="small",
        help="with --setup-synthetic: tiny = the CPU proxy for a GPU step",
    )
    parser.add_argument("--profile", action="store_true", help="profile one step per trainer (torch.profiler)")
    parser.add_argument("--trainers", default=None, help="comma-separated subset of the trainers")
    parser.add_argument("--work", type=Path, default=Path("bench_output/iteration"))
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate the trainers this many times (drift on a shared CPU)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    os.environ.setdefault("nnUNet_compile", "false")
    if "RNDPO_SETTINGS" not in os.environ:
        # the step cost does not depend on the judge: the plain defaults (agreement), which start in seconds, as when
        # the earlier rows were measured (recipe `auto` would fit and run the atlas judge at start)
        settings_file = args.work / "bench_iteration_settings.json"
        settings_file.parent.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps({"recipe": "none"}))
        os.environ["RNDPO_SETTINGS"] = str(settings_file)
    if args.setup_hippocampus:
        dataset, configuration = _setup_hippocampus(args.work.resolve(), args.setup_hippocampus.resolve(), args.threads)
    elif args.setup_synthetic:
        dataset, configuration = _setup_synthetic(args.work.resolve(), args.threads, args.network)
    else:
        if args.dataset is None or args.configuration is None:
            parser.error("give -d and -c, or --setup-synthetic")
        dataset, configuration = args.dataset, args.configuration
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.training import trainers as preference_trainers

    location = locate(dataset, configuration, 0)
    device = torch.device(args.device)
    names = [
        "nnUNetTrainer",
        "nnUNetTrainerRNDPO",
        "nnUNetTrainerRNDPO_PrecomputedRef",
        "nnUNetTrainerDPO",
        "nnUNetTrainerSelfTrain",
    ]
    if args.trainers:
        names = ["nnUNetTrainer"] + [n for n in args.trainers.split(",") if n != "nnUNetTrainer"]
    trainers = {"nnUNetTrainer": nnUNetTrainer}
    trainers.update({n: getattr(preference_trainers, n) for n in names[1:] if hasattr(preference_trainers, n)})
    samples = {name: [] for name in trainers}
    details: dict = {name: {} for name in trainers}
    loading_samples: dict = {}
    for round_index in range(args.rounds):
        for name, trainer_class in trainers.items():
            timed = time_trainer(
                trainer_class,
                location.plans,
                configuration,
                location.dataset_json,
                device,
                args.iterations,
                args.warmup,
                profile_step=args.profile and round_index == 0,
            )
            samples[name].extend(timed.pop("seconds"))
            loading_samples.setdefault(name, []).extend(timed.pop("loading_seconds"))
            for key, value in timed.items():
                if key == "peak_memory_gib":
                    details[name][key] = max(value, details[name].get(key, 0.0))
                elif value is not None and key not in details[name]:
                    details[name][key] = value
            print(f"round {round_index}: {name} median {statistics.median(samples[name]):.4f} s/iteration", flush=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "dataset": location.dataset_name,
        "configuration": configuration,
        "patch_size": location.plans["configurations"][configuration].get("patch_size"),
        "batch_size": location.plans["configurations"][configuration].get("batch_size"),
        "iterations_timed_per_trainer": args.iterations * args.rounds,
        "seconds_per_iteration_median": medians,
        "ratio_to_nnUNetTrainer": {name: medians[name] / medians["nnUNetTrainer"] for name in medians},
        "loading_seconds_median": {name: statistics.median(values) for name, values in loading_samples.items()},
        "load_average": os.getloadavg(),
        "per_trainer": details,
    }
    save_json(result, args.output)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
