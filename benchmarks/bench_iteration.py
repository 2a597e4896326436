"""Seconds per training iteration: stock nnUNetTrainer against each preference trainer, same plans, batch
and device, in one run (data loading and augmentation included, as in real training).

    python benchmarks/bench_iteration.py --setup-synthetic --work /tmp/bench_iter --output bench_iteration.json
    python benchmarks/bench_iteration.py -d 4 -c 3d_fullres --iterations 30 --output hippocampus_iter.json

Proposal generation, judging and mining happen in on_train_start and are not timed here (see
bench_proposals.py). Writes a JSON with the per-trainer seconds per iteration and the ratios to nnUNetTrainer.
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


def _setup_synthetic(work: Path, threads: int) -> tuple[int, str]:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(work / name)
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.synthetic import make_synthetic_dataset

    dataset_id, configuration = 960, "3d_bench"
    if not (work / "nnUNet_preprocessed" / "Dataset960_RNDPOBench" / "nnUNetPlans.json").is_file():
        make_synthetic_dataset(work / "nnUNet_raw", dataset_id, "RNDPOBench", num_labeled=8, num_unlabeled=8, num_test=0)
        nnunet_steps.plan_and_preprocess(dataset_id)
    nnunet_steps.add_configuration(dataset_id, configuration, patch_size=(32, 32, 32), batch_size=2, features_per_stage=(8, 16, 32, 64))
    os.environ["nnUNet_n_proc_DA"] = "0"
    if not (nnunet_paths.trainer_output_folder(dataset_id, configuration, 0) / "checkpoint_final.pth").is_file():
        nnunet_steps.train_supervised(dataset_id, configuration, 0, num_epochs=2, iterations_per_epoch=20, val_iterations=2, seed=0, num_threads=threads)
    return dataset_id, configuration


def time_trainer(trainer_class, plans: dict, configuration: str, dataset_json: dict, device, iterations: int, warmup: int) -> list[float]:
    import torch

    plans = dict(plans, continue_training=False)
    trainer = trainer_class(plans, configuration, 0, dataset_json, device)
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    seconds = []
    for index in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
    for loader in (trainer.dataloader_train, trainer.dataloader_val, getattr(trainer, "dataloader_labeled", None)):
        finish = getattr(loader, "_finish", None)
        if finish:
            finish()
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default=None)
    parser.add_argument("-c", "--configuration", default=None)
    parser.add_argument("--setup-synthetic", action="store_true", help="build a synthetic dataset and a tiny base in --work")
    parser.add_argument("--work", type=Path, default=Path("bench_output/iteration"))
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the trainers this many times (drift on a shared CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    os.environ.setdefault("nnUNet_compile", "false")
    if args.setup_synthetic:
        dataset, configuration = _setup_synthetic(args.work.resolve(), args.threads)
    else:
        if args.dataset is None or args.configuration is None:
            parser.error("give -d and -c, or --setup-synthetic")
        dataset, configuration = args.dataset, args.configuration
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.training.trainers import nnUNetTrainerDPO, nnUNetTrainerRNDPO, nnUNetTrainerRNDPO_PrecomputedRef, nnUNetTrainerSelfTrain

    location = locate(dataset, configuration, 0)
    device = torch.device(args.device)
    trainers = {
        "nnUNetTrainer": nnUNetTrainer,
        "nnUNetTrainerRNDPO": nnUNetTrainerRNDPO,
        "nnUNetTrainerRNDPO_PrecomputedRef": nnUNetTrainerRNDPO_PrecomputedRef,
        "nnUNetTrainerDPO": nnUNetTrainerDPO,
        "nnUNetTrainerSelfTrain": nnUNetTrainerSelfTrain,
    }
    samples = {name: [] for name in trainers}
    for round_index in range(args.rounds):
        for name, trainer_class in trainers.items():
            samples[name].extend(time_trainer(trainer_class, location.plans, configuration, location.dataset_json, device, args.iterations, args.warmup))
            print(f"round {round_index}: {name} median {statistics.median(samples[name]):.4f} s/iteration", flush=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "dataset": location.dataset_name, "configuration": configuration,
        "patch_size": location.plans["configurations"][configuration].get("patch_size"),
        "batch_size": location.plans["configurations"][configuration].get("batch_size"),
        "iterations_timed_per_trainer": args.iterations * args.rounds,
        "seconds_per_iteration_median": medians,
        "ratio_to_nnUNetTrainer": {name: medians[name] / medians["nnUNetTrainer"] for name in medians},
    }
    save_json(result, args.output)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
