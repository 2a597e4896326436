"""How noisy is nnU-Net's per-epoch validation, the figure that picks checkpoint_best, `validate_base`'s choice
and low_label's sanity gate?

nnU-Net validates each epoch on `num_val_iterations_per_epoch` random batches of patches from the fold's
validation cases and reports a pseudo Dice from their summed TP/FP/FN; `checkpoint_best` follows an EMA of it
(0.9 old + 0.1 new). This script runs that same loop (nnU-Net's `validation_step` on its validation dataloader)
`--repeats` times per iteration count with one fixed checkpoint, so every difference between repeats is sampling
noise, and reports each count's spread. A choice between two checkpoints is more than noise when their gap is
well above sqrt(2) x the standard deviation of one pass.

    python benchmarks/validation_noise.py --work bench_output/low_label_v2 -d 940 -c 3d_bench -f 0 \
        --checkpoint .../Bench_base_s0__nnUNetPlans__3d_bench/fold_0/checkpoint_final.pth \
        --iterations 20 50 100 --repeats 10 --output validation_noise.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from nnunet_rndpo import nnunet_paths


def pseudo_dice(outputs: list[dict]) -> float:
    """nnU-Net's epoch pseudo Dice: per class 2TP / (2TP + FP + FN) over the summed counts of all batches, then
    the mean over classes (as `on_validation_epoch_end` computes it)."""
    tp = np.sum([o["tp_hard"] for o in outputs], axis=0)
    fp = np.sum([o["fp_hard"] for o in outputs], axis=0)
    fn = np.sum([o["fn_hard"] for o in outputs], axis=0)
    per_class = [2 * t / (2 * t + p + n) if (2 * t + p + n) > 0 else np.nan for t, p, n in zip(tp, fp, fn)]
    return float(np.nanmean(per_class))


def spread(values: list[float]) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else None,
        "min": float(values.min()),
        "max": float(values.max()),
        "values": [float(v) for v in values],
    }


def build_trainer(dataset: str, configuration: str, fold, checkpoint: Path, device: str):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class ValidationNoiseProbe(nnUNetTrainer):
        """nnUNetTrainer under its own name, so its log lands in a folder of its own."""

    folder = nnunet_paths.preprocessed_dataset_folder(dataset)
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["continue_training"] = False  # the trainer pops it; nnUNetv2_train sets it from --c
    trainer = ValidationNoiseProbe(
        plans, configuration, fold, load_json(str(folder / "dataset.json")), device=torch.device(device)
    )
    trainer.initialize()
    trainer.load_checkpoint(str(checkpoint))
    return trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="a folder holding nnUNet_raw/preprocessed/results")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", required=True)
    parser.add_argument("-f", "--fold", default="0")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--iterations", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a file")
    if args.repeats < 2 or min(args.iterations) < 1:
        parser.error("--repeats must be at least 2 and every --iterations value at least 1")
    if args.work is not None:
        nnunet_paths.set_nnunet_folders(args.work.resolve())
    os.environ["nnUNet_n_proc_DA"] = "0"  # the validation batches drawn in this process, from one seeded stream
    import torch

    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    trainer = build_trainer(
        args.dataset, args.configuration, nnunet_paths.parse_fold(args.fold), args.checkpoint, args.device
    )
    _, validation_batches = trainer.get_dataloaders()
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.network.eval()
    started = time.perf_counter()
    results = {}
    with torch.no_grad():
        for iterations in args.iterations:
            passes = [
                pseudo_dice([trainer.validation_step(next(validation_batches)) for _ in range(iterations)])
                for _ in range(args.repeats)
            ]
            results[str(iterations)] = spread(passes)
            std = results[str(iterations)]["std"]
            print(f"{iterations:4d} iterations: pseudo Dice {np.mean(passes):.4f} ± {std:.4f}, {args.repeats} passes")
    record = {
        "checkpoint": str(args.checkpoint),
        "dataset": args.dataset,
        "configuration": args.configuration,
        "fold": args.fold,
        "batch_size": trainer.batch_size,
        "validation_cases": len(trainer.get_tr_and_val_datasets()[1].identifiers),
        "repeats": args.repeats,
        "pseudo_dice": results,
        "seconds": time.perf_counter() - started,
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "torch_threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    from nnunet_rndpo.atomic import save_json

    save_json(record, args.output)
    print(json.dumps({k: {"mean": v["mean"], "std": v["std"]} for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
