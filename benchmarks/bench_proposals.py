"""Benchmark: K=8 proposals per case with our engine vs. 8 separate nnU-Net predictions.

On the same cases, in one run, alternating case by case (so a change in machine load hits both):

(a) ours:   load the preprocessed case (as `nnunet_rndpo propose` does for a training-case pool), the
            sliding-window sweeps of ProposalEngine with K=8 (plain + 7 single mirror-TTA members; one sweep of all
            eight when their sums fit accumulator_memory_gib, as on these cases), save the case
            into a proposal store (compressed npz). Preprocessing of a raw image is timed separately, once per
            case (`ours_preprocessing`): that is what `propose` pays once for an imagesUnlabeled case.
(b) nnU-Net: what a user does to get 8 separate predictions of a case: 8 calls of nnUNetPredictor on the raw
            image (use_mirroring=False), each reading, preprocessing, sliding-window predicting and exporting a
            NIfTI. `--nnunet-mode files` (default) calls predict_from_files as nnUNetv2_predict does (it starts
            worker processes for preprocessing and export on every call); `sequential` calls
            predict_from_files_sequential (same steps in this process); `npy` calls predict_single_npy_array on
            the image read once (preprocessing + prediction + export each call).
Model loading is done once for each and reported apart (nnUNetv2_predict run 8 times would also reload 8 times).

Usage (an existing nnU-Net dataset and trained model; nnUNet_raw/_preprocessed/_results must be set):
    python benchmarks/bench_proposals.py -d 4 -c 3d_fullres -f 0 --cases 10 --device cuda -o bench.json
Anywhere (builds a synthetic dataset and a tiny base model in a temporary nnU-Net folder first):
    python benchmarks/bench_proposals.py --setup-synthetic --cases 2 -o bench.json

Prints a summary and writes a JSON (atomically) with seconds per case for both, their ratio, cases per minute
and the environment (torch threads, device, versions, processor, CPU count).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nnunet_rndpo import nnunet_paths

NUM_PROPOSALS = 8  # plain + 7 mirror flips of a 3D network
SYNTHETIC_ID = 981
SYNTHETIC_NAME = "RNDPOBench"
SYNTHETIC_CONFIGURATION = "3d_tiny"
NNUNET_CALLS = {
    "files": "predict_from_files",
    "sequential": "predict_from_files_sequential",
    "npy": "predict_single_npy_array",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-d", "--dataset", help="dataset id or name (required unless --setup-synthetic)")
    parser.add_argument(
        "-c", "--configuration", default=None, help="configuration (default 3d_fullres; 3d_tiny with --setup-synthetic)"
    )
    parser.add_argument("-f", "--fold", default="0", help="fold of the trained model (default 0)")
    parser.add_argument(
        "-tr", "--trainer", default="nnUNetTrainer", help="trainer of the model folder (default nnUNetTrainer)"
    )
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument(
        "--cases", type=int, default=5, help="number of cases (the first N preprocessed cases; default 5)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for both (default: os.cpu_count() on cpu, as nnUNetv2_predict; 1 on cuda)",
    )
    parser.add_argument("--nnunet-mode", default="files", choices=("files", "sequential", "npy"))
    parser.add_argument(
        "--nnunet-processes",
        type=int,
        default=1,
        help="preprocessing and export worker processes per predict_from_files call (default 1)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, choices=(0, 1), help="one untimed pass of each first (default 1)"
    )
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_proposals.json"))
    synthetic = parser.add_argument_group("synthetic set-up")
    synthetic.add_argument(
        "--setup-synthetic",
        action="store_true",
        help="build a synthetic dataset and a tiny base model in a temporary nnU-Net folder first",
    )
    synthetic.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="nnU-Net folder for --setup-synthetic (default: a temporary one, removed at the end); "
        "kept and reused when given",
    )
    synthetic.add_argument("--synthetic-cases", type=int, default=6, help="labeled synthetic cases (default 6)")
    synthetic.add_argument(
        "--synthetic-size", type=int, default=48, help="edge of the synthetic cubes in voxels (default 48)"
    )
    args = parser.parse_args(argv)
    if not args.setup_synthetic and args.dataset is None:
        parser.error("-d/--dataset is required unless --setup-synthetic is given")
    if args.cases < 1:
        parser.error("--cases must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------ set-up
def prepare_synthetic_folder(args) -> Path | None:
    """Point nnU-Net's variables at the work folder. Must run before nnunetv2 is imported (it reads them once)."""
    if not args.setup_synthetic:
        return None
    temporary = args.work_dir is None
    root = Path(tempfile.mkdtemp(prefix="rndpo_bench_")) if temporary else args.work_dir.resolve()
    nnunet_paths.set_nnunet_folders(root)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    return root if temporary else None


def build_synthetic(args) -> None:
    """Synthetic dataset, preprocessing, a tiny configuration and a briefly trained stock nnUNetTrainer."""
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.demo.synthetic import make_synthetic_dataset

    fold_folder = (
        Path(os.environ["nnUNet_results"])
        / f"Dataset{SYNTHETIC_ID:03d}_{SYNTHETIC_NAME}"
        / (f"nnUNetTrainer__nnUNetPlans__{SYNTHETIC_CONFIGURATION}")
        / "fold_0"
    )
    if (fold_folder / "checkpoint_final.pth").is_file():
        print(f"synthetic set-up: reusing {fold_folder}")
        return
    started = time.perf_counter()
    size = args.synthetic_size
    make_synthetic_dataset(
        os.environ["nnUNet_raw"],
        dataset_id=SYNTHETIC_ID,
        name=SYNTHETIC_NAME,
        num_labeled=args.synthetic_cases,
        num_unlabeled=0,
        num_test=0,
        shape=(size, size, size),
        seed=0,
    )
    nnunet_steps.plan_and_preprocess(SYNTHETIC_ID, configurations=("3d_fullres",), num_processes=1)
    nnunet_steps.add_configuration(
        SYNTHETIC_ID, SYNTHETIC_CONFIGURATION, patch_size=(32, 32, 32), batch_size=2, features_per_stage=(8, 16, 32)
    )
    nnunet_steps.train_supervised(
        SYNTHETIC_ID,
        SYNTHETIC_CONFIGURATION,
        0,
        num_epochs=2,
        iterations_per_epoch=10,
        val_iterations=2,
        device=args.device,
        seed=0,
        num_augmentation_workers=0,
        num_threads=1,
    )
    print(
        f"synthetic set-up: dataset {SYNTHETIC_ID}, {args.synthetic_cases} cases of {size}^3, tiny model trained "
        f"({time.perf_counter() - started:.0f} s)"
    )


# ------------------------------------------------------------------------------------------------ measurement
def raw_files(raw_dataset_folder: Path, case_id: str, dataset_json: dict) -> list[str]:
    ending = dataset_json["file_ending"]
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    files = [raw_dataset_folder / "imagesTr" / f"{case_id}_{channel:04d}{ending}" for channel in range(channels)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(
            f"raw image(s) of case {case_id} not found: {', '.join(missing)} (nnU-Net needs the raw images)"
        )
    return [str(f) for f in files]


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def summary(seconds: list[float]) -> dict:
    mean = statistics.fmean(seconds)
    return {
        "seconds_per_case": mean,
        "seconds_per_case_median": statistics.median(seconds),
        "cases_per_minute": 60.0 / mean if mean > 0 else None,
        "per_case_seconds": seconds,
    }


def run_benchmark(args) -> dict:
    import nnunetv2
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_rndpo.nnunet_env import ensure_ext_trainer
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.proposals.engine import ProposalEngine
    from nnunet_rndpo.proposals.model import load_model_like
    from nnunet_rndpo.proposals.plan import ProposalSettings, case_seed
    from nnunet_rndpo.proposals.pool import CasePool, PoolReader
    from nnunet_rndpo.proposals.store import ProposalStore

    ensure_ext_trainer()  # nnUNetPredictor looks the trainer up by the name in the checkpoint
    threads = args.threads or (os.cpu_count() if args.device == "cpu" else 1)
    torch.set_num_threads(threads)
    device = torch.device(args.device)

    location = locate(args.dataset, args.configuration, args.fold, args.plans)
    checkpoint = location.checkpoint(args.trainer, args.checkpoint)
    load_seconds_ours, model = timed(load_model_like, checkpoint, location, device)
    cases = sorted(p.name[: -len(".pkl")] for p in location.preprocessed_data_folder.glob("*.pkl"))[: args.cases]
    if not cases:
        raise SystemExit(
            f"no preprocessed cases in {location.preprocessed_data_folder}: run nnUNetv2_plan_and_preprocess"
        )
    if location.raw_dataset_folder is None:
        raise SystemExit("nnUNet_raw is not set: nnU-Net's predictor needs the raw images")
    inputs = {case: raw_files(location.raw_dataset_folder, case, location.dataset_json) for case in cases}

    settings = ProposalSettings(num_proposals=NUM_PROPOSALS, sources=("tta",))
    engine = ProposalEngine(
        [model.network],
        model.plans_manager,
        model.configuration_manager,
        model.label_manager,
        model.dataset_json,
        settings,
        model.mirror_axes,
        device,
    )
    if engine.num_proposals != NUM_PROPOSALS or any(m.source not in ("plain", "tta") for m in engine.members):
        raise SystemExit(
            f"the model allows mirroring on {model.mirror_axes}: fewer than 7 flips, K=8 TTA members impossible"
        )
    pool = CasePool(
        location.dataset_name,
        "benchmark (preprocessed training cases)",
        cases,
        preprocessed_folder=location.preprocessed_data_folder,
    )
    reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    preprocessor = model.configuration_manager.preprocessor_class(verbose=False)

    predictor = nnUNetPredictor(
        tile_step_size=settings.tile_step_size,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    nnunet_loading = "initialize_from_trained_model_folder"
    try:
        load_seconds_nnunet, _ = timed(
            predictor.initialize_from_trained_model_folder,
            str(location.model_folder(args.trainer)),
            use_folds=(location.fold,),
            checkpoint_name=Path(checkpoint).name,
        )
    except RuntimeError as error:
        if "Could not find requested nnunet trainer" not in str(error):
            raise
        # a model trained by a class nnU-Net cannot import (e.g. a benchmark's per-arm subclass): give the
        # predictor the same network by hand. Only loading differs; it is timed apart from the ratio.
        nnunet_loading = "manual_initialization (trainer class not importable)"
        load_seconds_nnunet, _ = timed(
            predictor.manual_initialization,
            model.network,
            model.plans_manager,
            model.configuration_manager,
            [model.network.state_dict()],
            model.dataset_json,
            "nnUNetTrainer",
            model.mirror_axes,
        )
    reader_writer = model.plans_manager.image_reader_writer_class()

    scratch = Path(tempfile.mkdtemp(prefix="rndpo_bench_out_"))
    store = ProposalStore(scratch / "store").open(
        {
            "dataset": location.dataset_name,
            "benchmark": True,
            "settings": settings.to_dict(),
            "members": [m.to_dict() for m in engine.members],
        }
    )

    def ours(case_id: str) -> None:
        data, _, _ = reader.load(case_id)
        result = engine.generate(data, case_seed(settings.seed, case_id))
        store.save_case(case_id, result.proposals, result.mean_probabilities, result.case_seed)

    def ours_preprocessing(case_id: str) -> None:
        preprocessor.run_case(
            inputs[case_id], None, model.plans_manager, model.configuration_manager, model.dataset_json
        )

    def nnunet_eight(case_id: str) -> None:
        out = scratch / "nnunet" / case_id
        out.mkdir(parents=True, exist_ok=True)
        if args.nnunet_mode == "npy":
            image, properties = reader_writer.read_images(inputs[case_id])
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a few lines per call
            for member in range(NUM_PROPOSALS):
                target = str(out / f"{case_id}_prediction{member:02d}")
                if args.nnunet_mode == "files":
                    predictor.predict_from_files(
                        [inputs[case_id]],
                        [target],
                        save_probabilities=False,
                        overwrite=True,
                        num_processes_preprocessing=args.nnunet_processes,
                        num_processes_segmentation_export=args.nnunet_processes,
                    )
                elif args.nnunet_mode == "sequential":
                    predictor.predict_from_files_sequential(
                        [inputs[case_id]], [target], save_probabilities=False, overwrite=True
                    )
                else:
                    predictor.predict_single_npy_array(image, properties, None, target, False)
        written = list(out.glob(f"*{location.dataset_json['file_ending']}"))
        if len(written) != NUM_PROPOSALS:
            raise RuntimeError(f"nnU-Net wrote {len(written)} predictions for {case_id}, expected {NUM_PROPOSALS}")

    try:
        if args.warmup:
            print(f"warm-up on {cases[0]} ...")
            engine.generate(reader.load(cases[0])[0], 0)
            with contextlib.redirect_stdout(io.StringIO()):
                predictor.predict_from_files_sequential(
                    [inputs[cases[0]]], [str(scratch / "warmup")], save_probabilities=False, overwrite=True
                )
        times = {"ours": [], "ours_preprocessing": [], "nnunet": []}
        for index, case_id in enumerate(cases):
            # alternate the two on every case, so a change in machine load affects both alike
            times["ours"].append(timed(ours, case_id)[0])
            times["ours_preprocessing"].append(timed(ours_preprocessing, case_id)[0])
            times["nnunet"].append(timed(nnunet_eight, case_id)[0])
            print(
                f"[{index + 1}/{len(cases)}] {case_id}: ours {times['ours'][-1]:.2f} s "
                f"(+ {times['ours_preprocessing'][-1]:.2f} s preprocessing from raw), "
                f"nnU-Net 8 calls {times['nnunet'][-1]:.2f} s"
            )
        problems = store.verify()
        if problems:
            raise RuntimeError(f"the benchmark's proposal store is not clean: {problems}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ours_summary, nnunet_summary = summary(times["ours"]), summary(times["nnunet"])
    preprocessing = summary(times["ours_preprocessing"])
    with_preprocessing = [a + b for a, b in zip(times["ours"], times["ours_preprocessing"])]
    data_shapes = {case: list(reader.load(case)[0].shape) for case in cases}
    return {
        "dataset": location.dataset_name,
        "configuration": args.configuration,
        "fold": location.fold,
        "trainer": args.trainer,
        "checkpoint": str(checkpoint),
        "synthetic": bool(args.setup_synthetic),
        "cases": cases,
        "preprocessed_shapes": data_shapes,
        "patch_size": list(model.configuration_manager.patch_size),
        "num_proposals": NUM_PROPOSALS,
        "ours": {
            **ours_summary,
            "includes": "load preprocessed case + one batched sliding-window sweep with K=8 (plain + 7 mirror members) "
            "+ save to the proposal store (compressed npz)",
        },
        "ours_preprocessing": {**preprocessing, "includes": "the plans' preprocessor on the raw image (once per case)"},
        "nnunet": {
            **nnunet_summary,
            "includes": f"8 x nnUNetPredictor.{NNUNET_CALLS[args.nnunet_mode]} "
            "(read + preprocess + sliding window without mirroring + NIfTI export, each call)",
            "mode": args.nnunet_mode,
            "worker_processes": args.nnunet_processes if args.nnunet_mode == "files" else 0,
        },
        "speedup": nnunet_summary["seconds_per_case"] / ours_summary["seconds_per_case"],
        "speedup_including_our_preprocessing": nnunet_summary["seconds_per_case"]
        / statistics.fmean(with_preprocessing),
        "model_load_seconds": {
            "ours": load_seconds_ours,
            "nnunet": load_seconds_nnunet,
            "nnunet_loading": nnunet_loading,
        },
        "environment": {
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc"),
            "torch": torch.__version__,
            "nnunetv2": getattr(nnunetv2, "__version__", None) or _distribution_version("nnunetv2"),
            "numpy": np.__version__,
            "python": platform.python_version(),
            "processor": platform.processor(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }


def _distribution_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    temporary_root = prepare_synthetic_folder(args)
    try:
        if args.setup_synthetic:
            build_synthetic(args)
            args.dataset = str(SYNTHETIC_ID)
            args.configuration = args.configuration or SYNTHETIC_CONFIGURATION
            args.trainer = "nnUNetTrainer"
        args.configuration = args.configuration or "3d_fullres"
        result = run_benchmark(args)
    finally:
        if temporary_root is not None:
            shutil.rmtree(temporary_root, ignore_errors=True)

    from nnunet_rndpo.atomic import save_json

    save_json(result, args.output)
    ours, nnunet = result["ours"], result["nnunet"]
    print(
        f"\n{result['dataset']} {result['configuration']} fold {result['fold']}, {len(result['cases'])} case(s), "
        f"{result['environment']['device']}, {result['environment']['torch_threads']} torch thread(s)"
    )
    print(
        f"  ours (K=8):                 {ours['seconds_per_case']:.2f} s/case  ({ours['cases_per_minute']:.1f} cases/min)"  # noqa: E501
    )
    print(f"  + preprocessing from raw:   {result['ours_preprocessing']['seconds_per_case']:.2f} s/case")
    print(
        f"  nnU-Net, 8 calls ({nnunet['mode']}): {nnunet['seconds_per_case']:.2f} s/case  ({nnunet['cases_per_minute']:.1f} cases/min)"  # noqa: E501
    )
    print(
        f"  speedup: {result['speedup']:.1f}x ({result['speedup_including_our_preprocessing']:.1f}x counting our preprocessing)"  # noqa: E501
    )
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
