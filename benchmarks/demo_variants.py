"""Fine-tune the demo's base model with one set of preference settings and report held-out test Dice.

Uses the working folder of `nnunet_rndpo demo --output DIR` (its synthetic data, base model and proposal
store), the demo's schedule (10 epochs of 50 iterations) and seed 0; only the given settings change.

    nnunet_rndpo demo --output /work/bench/demo          # once: data, base model, proposals
    python benchmarks/demo_variants.py --demo /work/bench/demo --name sft1_beta01 \
        --settings '{"sft_weight": 1.0, "beta": 0.1}'
    python benchmarks/demo_variants.py --demo /work/bench/demo --name selftrain --settings '{"objective": "self_train"}'

Prints one RESULT line and writes <demo>/variants/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from nnunet_rndpo import nnunet_paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="the demo's --output folder")
    parser.add_argument("--name", required=True, help="a name for this variant (output folder and JSON)")
    parser.add_argument("--settings", type=json.loads, default={}, help="RNDPO_SETTINGS keys to change, as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    work = args.demo.resolve()
    nnunet_paths.set_nnunet_folders(work)
    os.environ.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="false")
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.run import DEMO_CONFIGURATION, DEMO_DATASET_ID, FULL
    from nnunet_rndpo.training.settings import SETTINGS_ENV_VARIABLE
    from nnunet_rndpo.training.trainers import nnUNetTrainerRNDPO

    settings = {
        "num_epochs": FULL.tune_epochs,
        "iterations_per_epoch": FULL.tune_iterations,
        "val_iterations_per_epoch": FULL.val_iterations,
        "seed": 0,
        "recipe": "none",  # the demo's own set-up (nnunet_rndpo/demo/run.py); a variant may name another
        **args.settings,
    }
    (work / "variants").mkdir(exist_ok=True)
    settings_file = work / "variants" / f"{args.name}.settings.json"
    settings_file.write_text(json.dumps(settings))
    os.environ[SETTINGS_ENV_VARIABLE] = str(settings_file)
    # a class named after the variant: its own nnU-Net output folder
    trainer_class = type("Variant_" + args.name, (nnUNetTrainerRNDPO,), {"__module__": __name__})
    started = time.perf_counter()
    folder = nnunet_steps.train_supervised(
        DEMO_DATASET_ID,
        DEMO_CONFIGURATION,
        0,
        num_epochs=settings["num_epochs"],
        iterations_per_epoch=settings["iterations_per_epoch"],
        val_iterations=settings["val_iterations_per_epoch"],
        trainer_class=trainer_class,
        initial_lr=settings.get("initial_lr", 1e-3),
        seed=0,
        num_threads=args.threads,
    )
    raw = Path(os.environ["nnUNet_raw"]) / nnunet_paths.find_dataset_name(DEMO_DATASET_ID)
    predictions = work / "variants" / f"predictions_{args.name}"
    result = nnunet_steps.evaluate_checkpoint(folder / "checkpoint_final.pth", raw, predictions)
    record = {
        "name": args.name,
        "settings": settings,
        "test": result,
        "seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d"),
    }
    save_json(record, work / "variants" / f"{args.name}.json")
    print("RESULT", args.name, json.dumps(settings), result["mean"], result["foreground_mean"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
