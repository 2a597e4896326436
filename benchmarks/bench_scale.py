"""Benchmark at CT scale (issue 29): the proposal phase against nnU-Net's own prediction, and every judge, on
synthetic cases of CT size that this script makes itself.

What it makes (in --work-dir, or a temporary folder): `--cases` cases of `--shape` voxels (default 2 of 320^3) in
nnU-Net's preprocessed space, a body with `--classes` ellipsoid organs, each organ class at its own intensity
(smoothed, with noise); nnU-Net plans with a 3d_fullres configuration (patch `--patch`, spacing 1) whose network
is a tiny PlainConvUNet (2 stages, 4 and 8 features, no normalisation) with weights set by hand to a
nearest-intensity classifier plus small random weights (`set_weights`), so that its proposals look like
segmentations and its mirror members disagree at borders (the plain member's Dice is in the JSON).

What it measures, each side of a comparison in a fresh process of its own (`--worker`), the sides alternating from
case to case so that load from other processes on the machine hits both:
- proposals: ProposalEngine.generate with K = 8, sources `tta` (the plain pass + 7 mirror members), then
  ProposalStore.save_case (what `nnunet_rndpo propose` does per case once the case is read), against
  nnUNetPredictor on the same preprocessed case with its default mirroring (the same 8 network passes):
  predict_logits_from_preprocessed_data, then export_prediction_from_logits to a .nii.gz label map (what
  nnUNetv2_predict does per case after preprocessing; save_probabilities=False, its default). On case 0 and the
  --old-shape crop also with save_probabilities=True (its softmax in an .npz beside the label map: like the
  store's mean probabilities).
  `--old-shape`: the same on a crop of case 0 with the engine as it was before issue 29 (every member's logits at
  full size at once; `git show ec44c5d:nnunet_rndpo/proposals/engine.py`), where that fits in memory.
- judges: seconds per case (and fitting seconds) of every registered label-free judge on the stored proposals of
  each case, fitted where it learns on the other case (its true labels, image, proposals); the atlas with its crop
  options and on the whole volume.

Peak memory of a side: the kernel's high-water mark of the worker's resident memory (VmHWM), reset through
/proc/self/clear_refs after imports, model, engine and the case are loaded, read after the phase; minus the
resident memory at the reset. Exact (not sampled) and it sees torch's allocations, which tracemalloc does not.
Where clear_refs cannot be written, ru_maxrss minus its value at that point (a lower bound; the JSON says which).
On `--device cuda` also torch.cuda.max_memory_allocated over the phase, minus what was allocated before.

    nice -n 5 python benchmarks/bench_scale.py                           # 2 cases of 320^3, CPU, 2 torch threads
    nice -n 5 python benchmarks/bench_scale.py --shape 96 96 96 --old-shape 64 64 64 --patch 48   # a rehearsal
    python benchmarks/bench_scale.py --device cuda --threads 4          # a GPU machine

Writes benchmarks/results/bench_scale_<date>.json (atomically; -o to choose), with the machine, torch threads,
versions and the load average around every measurement.

One file of about 720 lines on purpose: every side of a comparison runs this same file again as a fresh process
(`--worker` with a task in JSON), so the set-up that writes a task, the worker that reads it and the summary of its
rows share one task format in one place.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OLD_ENGINE_COMMIT = "ec44c5d"  # the last engine that held every member's logits at once
NUM_PROPOSALS = 8
MIRROR_AXES = (0, 1, 2)
NETWORK_FEATURES = (4, 8)  # a 2-stage PlainConvUNet, one convolution per stage (set_weights relies on 2 stages)
LABEL_FREE_JUDGES = ("agreement", "uncertainty", "virtual_annotator", "anatomy", "atlas", "learned_qc", "combination")
# rows of the atlas judge: its defaults (crop around the proposals, registration shrunk when large), the whole volume
ATLAS_VARIANTS = {"atlas": {}, "atlas_whole_volume": {"crop_margin": None, "max_registration_voxels": None}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(320, 320, 320), help="voxels per case (z y x)")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--classes", type=int, default=14, help="foreground classes")
    parser.add_argument("--patch", type=int, default=128, help="patch edge of the configuration (default 128)")
    parser.add_argument(
        "--old-shape",
        type=int,
        nargs=3,
        default=(160, 160, 160),
        help="crop of case 0 for the before/after row with the old engine (0 0 0: skip)",
    )
    parser.add_argument(
        "--no-nnunet-probabilities",
        dest="nnunet_probabilities",
        action="store_false",
        help="leave out nnU-Net with save_probabilities=True (on case 0 and the --old-shape crop)",
    )
    parser.add_argument(
        "--members-per-batch",
        type=int,
        default=None,
        help="the proposal setting members_per_batch of our engine (default: the setting's, 8; 1 passes one member "
        "at a time, as nnU-Net's predictor passes one mirror at a time)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every worker (default 2)")
    parser.add_argument(
        "--judges", nargs="*", default=None, help=f"judge rows (default: {', '.join(LABEL_FREE_JUDGES)} and variants)"
    )
    parser.add_argument("--skip-proposals", action="store_true", help="reuse the stored proposals of --work-dir")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds after which a worker is stopped")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept and reused (default: temporary)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = REPO_ROOT / "benchmarks" / "results" / f"bench_scale_{datetime.date.today().isoformat()}.json"
    return args


# ------------------------------------------------------------------------------------------------ the set-up
def make_case(shape, classes: int, seed: int, index: int):
    """(image (1, *shape) float32, label map uint8): organs as ellipsoids inside a body, each class at its own
    intensity, smoothed (partial volumes at the borders, where the mirror members disagree) and noisy. Every case
    has the same anatomy (from `seed`), moved and resized a little per case (`index`), as patients are: what an
    atlas judge needs to mean anything."""
    import numpy as np
    from scipy import ndimage

    anatomy, rng = np.random.default_rng(seed), np.random.default_rng([seed, index])
    grid = np.ogrid[tuple(slice(0, size) for size in shape)]
    centre = np.array(shape) / 2

    def ellipsoid(middle, radii):
        return sum(((axis - m) / r) ** 2 for axis, m, r in zip(grid, middle, radii)) <= 1.0

    body = ellipsoid(centre, centre * 0.92)
    labels = np.zeros(shape, dtype=np.uint8)
    for label in range(1, classes + 1):
        radii = np.array(shape) * anatomy.uniform(0.07, 0.16, size=3) * rng.uniform(0.9, 1.1, size=3)
        middle = centre + np.array(shape) * (0.3 * anatomy.uniform(-1, 1, size=3) + rng.uniform(-0.02, 0.02, size=3))
        labels[ellipsoid(middle, radii) & body] = label
    intensity = np.where(body, 0.0, -2.0).astype(np.float32)
    intensity[labels > 0] = class_intensity(labels[labels > 0])
    image = ndimage.gaussian_filter(intensity, sigma=0.7) + rng.normal(0, 0.05, size=shape).astype(np.float32)
    return image[None].astype(np.float32), labels


def plans_and_dataset(args) -> tuple[dict, dict]:
    n_stages = len(NETWORK_FEATURES)
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"organ{c}": c for c in range(1, args.classes + 1)}},
        "numTraining": args.cases,
        "file_ending": ".nii.gz",
    }
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [args.patch] * 3,
        "median_image_size_in_voxels": list(args.shape),
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": list(NETWORK_FEATURES),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n_stages,
                "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
                "n_conv_per_stage": [1] * n_stages,
                "n_conv_per_stage_decoder": [1] * (n_stages - 1),
                "conv_bias": True,
                "norm_op": None,
                "norm_op_kwargs": None,
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }
    plans = {
        "dataset_name": "Dataset999_BenchScale",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": list(args.shape),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 6.0, "mean": 2.0, "median": 2.0, "min": -2.0, "percentile_00_5": -2.0, "percentile_99_5": 6.0}
        },
    }
    return plans, dataset_json


def build_network(plans: dict, dataset_json: dict):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    return get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        1,
        len(dataset_json["labels"]),
        deep_supervision=False,
    )


def class_intensity(label):
    """The intensity of an organ class in the synthetic images (background: 0 inside the body, -2 outside)."""
    return 0.5 + 0.5 * label


def set_weights(network, classes: int, seed: int) -> None:
    """Weights that make the tiny network a nearest-intensity classifier of a slightly smoothed image, plus small
    random weights everywhere: segmentation-like proposals without training (which took minutes on a shared 2-core
    machine and still labelled everything background). The smoothing kernel is not mirror-symmetric and the random
    weights are not either, so mirror members disagree at organ borders, as a trained network's do.

    Path: encoder conv channel 0 = smoothed image + 3 (positive, so LeakyReLU passes it), the decoder conv passes
    that skip channel on, the 1x1 segmentation layer scores class c by -g (h - h_c)^2 up to a term common to all
    classes, i.e. the linear 2 g h_c h - g h_c^2 (h_c = the class's intensity + 3; background at the body's 0).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        encoder, decoder = network.encoder.stages[0][0].convs[0].conv, network.decoder.stages[0].convs[0].conv
        encoder.weight[0] = 0.0
        encoder.weight[0, 0, 1, 1, 1] = 0.6
        encoder.weight[0, 0, 2, 1, 1] = 0.25
        encoder.weight[0, 0, 1, 2, 1] = 0.15
        encoder.bias[0] = 3.0
        skip_channel = decoder.weight.shape[1] // 2  # the decoder concatenates (upsampled, skip)
        decoder.weight[0] = 0.0
        decoder.weight[0, skip_channel, 1, 1, 1] = 1.0
        decoder.bias[0] = 0.0
        centres = torch.tensor([0.0] + [class_intensity(label) for label in range(1, classes + 1)]) + 3.0
        gain = 8.0
        segmentation = network.decoder.seg_layers[0]
        segmentation.weight[:, 0, 0, 0, 0] = 2 * gain * centres
        segmentation.bias[:] = -gain * centres**2
    network.eval()


def set_up(args, work: Path) -> dict:
    """Cases, plans, dataset.json and the trained network in `work` (reused when there)."""
    import numpy as np
    import torch

    setup_file = work / "setup.json"
    if setup_file.is_file():
        setup = json.loads(setup_file.read_text())
        if setup["key"] == _setup_key(args):
            return setup
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    plans, dataset_json = plans_and_dataset(args)
    (work / "plans.json").write_text(json.dumps(plans, indent=1))
    (work / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    case_ids = [f"case_{index:02d}" for index in range(args.cases)]
    for index, case_id in enumerate(case_ids):
        image, labels = make_case(tuple(args.shape), args.classes, args.seed, index)
        np.save(work / f"{case_id}_image.npy", image)
        np.save(work / f"{case_id}_labels.npy", labels)
    torch.set_num_threads(args.threads)
    network = build_network(plans, dataset_json)
    set_weights(network, args.classes, args.seed)
    torch.save(network.state_dict(), work / "network.pt")
    image, labels = np.load(work / f"{case_ids[0]}_image.npy"), np.load(work / f"{case_ids[0]}_labels.npy")
    cases = {case_id: str(work / f"{case_id}_image.npy") for case_id in case_ids}
    if all(size > 0 for size in args.old_shape):
        crop = tuple(
            slice(max(0, (full - size) // 2), max(0, (full - size) // 2) + min(size, full))
            for size, full in zip(args.old_shape, args.shape)
        )
        np.save(work / "old_shape_image.npy", np.ascontiguousarray(image[(slice(None), *crop)]))
        np.save(work / "old_shape_labels.npy", np.ascontiguousarray(labels[crop]))
    setup = {"key": _setup_key(args), "case_ids": case_ids, "cases": cases, "seconds": time.perf_counter() - started}
    (work / "setup.json").write_text(json.dumps(setup, indent=1))
    return setup


def _setup_key(args) -> dict:
    keys = ("shape", "cases", "classes", "patch", "old_shape", "seed")
    return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(args).items() if key in keys}


# ------------------------------------------------------------------------------------------------ memory
def reset_peak_memory() -> tuple[str, int]:
    """Start a phase: reset the kernel's high-water mark of resident memory; (method, baseline bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return "VmHWM after clear_refs", _status_bytes("VmRSS")
    except OSError:
        return "ru_maxrss (lower bound)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(method: str) -> int:
    if method.startswith("VmHWM"):
        return _status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


# ------------------------------------------------------------------------------------------------ the workers
def worker(task: dict) -> dict:
    """One measurement in this (fresh) process; returns what it measured."""
    import numpy as np
    import torch

    torch.set_num_threads(task["threads"])
    torch.set_flush_denormal(True)
    work = Path(task["work"])
    device = torch.device(task["device"])
    plans = json.loads((work / "plans.json").read_text())
    dataset_json = json.loads((work / "dataset.json").read_text())
    if task["kind"] == "judge":
        return judge_worker(task, work, dataset_json)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration("3d_fullres")
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = build_network(plans, dataset_json)
    network.load_state_dict(torch.load(work / "network.pt", weights_only=True))
    network.to(device).eval()
    data = np.load(task["image"])
    with torch.inference_mode():  # the first pass of a process sets oneDNN up: outside the measurement
        network(torch.zeros((1, 1, *configuration_manager.patch_size), device=device))
    measured = {"kind": task["kind"], "case_id": task["case_id"], "shape": list(data.shape[1:])}
    if task["kind"] in ("ours", "old"):
        from nnunet_rndpo.proposals.engine import ProposalEngine
        from nnunet_rndpo.proposals.plan import ProposalSettings
        from nnunet_rndpo.proposals.store import ProposalStore

        engine_class = old_engine_class() if task["kind"] == "old" else ProposalEngine
        batch = {} if task.get("members_per_batch") is None else {"members_per_batch": task["members_per_batch"]}
        settings = ProposalSettings(num_proposals=NUM_PROPOSALS, sources=("tta",), **batch)
        engine = engine_class(
            [network], plans_manager, configuration_manager, label_manager, dataset_json, settings, MIRROR_AXES, device
        )
        manifest = {"settings": settings.to_dict(), "members": [member.to_dict() for member in engine.members]}
        store = ProposalStore(task["store"]).open(manifest, case_ids=[])
        if hasattr(engine, "members_per_sweep"):
            measured["members_per_sweep"] = engine.members_per_sweep(data.shape[1:])
        with _measured(measured, device):
            started = time.perf_counter()
            result = engine.generate(data, 0)
            measured["generate_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            store.save_case(task["case_id"], result.proposals, result.mean_probabilities, result.case_seed)
            measured["save_seconds"] = time.perf_counter() - started
        truth = np.load(task["labels"])
        measured["plain_dice"] = mean_dice(result.proposals[0], truth, len(dataset_json["labels"]))
        return measured
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        [network.state_dict()],
        dataset_json,
        "nnUNetTrainer",
        MIRROR_AXES,
    )
    shape = list(data.shape[1:])
    properties = {
        "spacing": [1.0, 1.0, 1.0],
        "shape_before_cropping": shape,
        "shape_after_cropping_and_before_resampling": shape,
        "bbox_used_for_cropping": [[0, size] for size in shape],
        "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)},
    }
    Path(task["store"]).mkdir(parents=True, exist_ok=True)
    output = str(Path(task["store"]) / f"nnunet_{task['case_id']}")
    with _measured(measured, device):
        started = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
        measured["generate_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        save_probabilities = task["kind"] == "nnunet_probabilities"
        export_prediction_from_logits(
            logits,
            properties,
            configuration_manager,
            plans_manager,
            dataset_json,
            output,
            save_probabilities,
            task["threads"],
        )
        measured["save_seconds"] = time.perf_counter() - started
    return measured


def old_engine_class():
    """The engine class of OLD_ENGINE_COMMIT, loaded from git (it needs the commit in this clone)."""
    import types

    source = subprocess.run(
        ["git", "show", f"{OLD_ENGINE_COMMIT}:nnunet_rndpo/proposals/engine.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("engine_before_issue_29")
    sys.modules[module.__name__] = module  # its dataclass looks its module up there
    exec(compile(source, f"{OLD_ENGINE_COMMIT}:engine.py", "exec"), module.__dict__)
    return module.ProposalEngine


class _measured:
    """Peak memory (and GPU memory) and load average around a phase, written into `measured`."""

    def __init__(self, measured: dict, device):
        self.measured, self.device = measured, device

    def __enter__(self):
        import torch

        self.measured["load_average_before"] = list(os.getloadavg())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.gpu_baseline = torch.cuda.memory_allocated()
        self.method, self.baseline = reset_peak_memory()
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.measured["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() - self.gpu_baseline
        self.measured["seconds"] = time.perf_counter() - self.started
        self.measured["peak_bytes"] = peak_memory(self.method) - self.baseline
        self.measured["memory_method"] = self.method
        self.measured["load_average_after"] = list(os.getloadavg())
        return False


def mean_dice(prediction, truth, num_labels: int) -> float:
    import numpy as np

    scores = []
    for label in range(1, num_labels):
        predicted, true = prediction == label, truth == label
        total = int(predicted.sum()) + int(true.sum())
        if total:
            scores.append(2.0 * int(np.logical_and(predicted, true).sum()) / total)
    return float(np.mean(scores)) if scores else float("nan")


def judge_worker(task: dict, work: Path, dataset_json: dict) -> dict:
    import numpy as np

    from nnunet_rndpo.judges import JudgeInput, get_judge, score_case
    from nnunet_rndpo.proposals.store import ProposalStore

    store = ProposalStore(task["store"])
    labels = tuple(value for value in dataset_json["labels"].values() if value != 0)

    def judge_input(case_id: str, with_truth: bool) -> JudgeInput:
        case = store.load_case(case_id)
        return JudgeInput(
            case_id,
            case["proposals"],
            labels,
            image=np.load(work / f"{case_id}_image.npy"),
            mean_probabilities=case["mean_probabilities"].astype(np.float32),
            true_labels=np.load(work / f"{case_id}_labels.npy") if with_truth else None,
        )

    measured = {"kind": "judge", "judge": task["row"], "case_id": task["case_id"], "options": task["options"]}
    try:
        judge = get_judge(task["spec"], **task["options"])
    except Exception as error:  # e.g. an option this checkout's judge does not have yet
        measured["unavailable"] = f"{type(error).__name__}: {error}"
        return measured
    case = judge_input(task["case_id"], with_truth=False)
    fitting = [judge_input(task["fit_case_id"], with_truth=True)] if judge.learns else []
    with _measured(measured, _cpu()):
        started = time.perf_counter()
        if fitting:
            judge.fit(fitting)
        measured["fit_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        scores = score_case(judge, case)
        measured["score_seconds"] = time.perf_counter() - started
    measured["scores"] = [float(score) for score in scores]
    return measured


def _cpu():
    import torch

    return torch.device("cpu")


def run_worker(task: dict, timeout: int) -> dict:
    """`task` in a fresh process at this process's niceness; its result, or what stopped it."""
    environment = {**os.environ, "nnUNet_def_n_proc": str(task["threads"]), "nnUNet_compile": "false"}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        environment.setdefault(name, str(Path(task["work"]) / name))
    result_file = Path(task["work"]) / f"result_{os.getpid()}_{time.monotonic_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({**task, "out": str(result_file)})]
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, env=environment, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {**_describe(task), "error": f"stopped after {timeout} s (--timeout)"}
    if completed.returncode != 0 or not result_file.is_file():
        return {**_describe(task), "error": f"exit {completed.returncode}: {completed.stderr[-2000:]}"}
    result = json.loads(result_file.read_text())
    result_file.unlink()
    result["process_seconds"] = time.perf_counter() - started
    return result


def _describe(task: dict) -> dict:
    return {key: task[key] for key in ("kind", "case_id", "row") if key in task}


# ------------------------------------------------------------------------------------------------ the run
def proposal_rows(args, work: Path, setup: dict) -> tuple[list[dict], list[dict]]:
    base = {"work": str(work), "threads": args.threads, "device": args.device, "store": str(work / "store")}
    base["members_per_batch"] = args.members_per_batch
    rows = []
    for index, case_id in enumerate(setup["case_ids"]):
        sides = ["ours", "nnunet"] if index % 2 == 0 else ["nnunet", "ours"]
        if index == 0 and args.nnunet_probabilities:
            sides.append("nnunet_probabilities")
        for kind in sides:
            task = {**base, "kind": kind, "case_id": case_id, "image": setup["cases"][case_id]}
            task["labels"] = str(work / f"{case_id}_labels.npy")
            rows.append(run_worker(task, args.timeout))
            print(_line(rows[-1]), flush=True)
    before_after = []
    if (work / "old_shape_image.npy").is_file():
        for kind in ("old", "ours", "nnunet", "nnunet_probabilities")[: 4 if args.nnunet_probabilities else 3]:
            task = {**base, "kind": kind, "case_id": "old_shape", "store": str(work / f"store_{kind}_old_shape")}
            task.update(image=str(work / "old_shape_image.npy"), labels=str(work / "old_shape_labels.npy"))
            before_after.append(run_worker(task, args.timeout))
            print(_line(before_after[-1]), flush=True)
        before_after.append(_same_labels(work))
    return rows, before_after


def _same_labels(work: Path) -> dict:
    import numpy as np

    from nnunet_rndpo.proposals.store import ProposalStore

    try:
        old = ProposalStore(work / "store_old_old_shape").load_case("old_shape")
        new = ProposalStore(work / "store_ours_old_shape").load_case("old_shape")
    except Exception as error:
        return {"kind": "comparison", "error": str(error)}
    return {
        "kind": "comparison",
        "labels_identical": bool(np.array_equal(old["proposals"], new["proposals"])),
        "labels_differing_voxels": int(np.count_nonzero(old["proposals"] != new["proposals"])),
        "mean_probabilities_max_difference": float(
            np.abs(old["mean_probabilities"].astype(np.float32) - new["mean_probabilities"].astype(np.float32)).max()
        ),
    }


def judge_rows(args, work: Path, setup: dict) -> list[dict]:
    rows = []
    names = args.judges if args.judges is not None else [*LABEL_FREE_JUDGES, "atlas_whole_volume"]
    case_ids = setup["case_ids"]
    for name in names:
        spec, options = ("atlas", ATLAS_VARIANTS[name]) if name in ATLAS_VARIANTS else (name, {})
        for index, case_id in enumerate(case_ids):
            task = {
                "work": str(work),
                "threads": args.threads,
                "device": "cpu",
                "store": str(work / "store"),
                "kind": "judge",
                "row": name,
                "spec": spec,
                "options": options,
                "case_id": case_id,
                "fit_case_id": case_ids[(index + 1) % len(case_ids)],
            }
            rows.append(run_worker(task, args.timeout))
            print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    if "error" in row or "unavailable" in row:
        return f"  {row.get('row', row.get('kind'))} {row.get('case_id')}: {row.get('error', row.get('unavailable'))}"
    what = row.get("judge", row["kind"])
    seconds = row.get("score_seconds", row.get("seconds"))
    peak, load = row.get("peak_bytes", 0) / 2**30, row["load_average_after"][0]
    return f"  {what:>20} {row['case_id']}: {seconds:8.1f} s, peak {peak:6.2f} GiB, load {load:.1f}"


def summary(rows: list[dict]) -> dict:
    """Per side: mean seconds and peak memory over the cases, and ours / nnU-Net ratios."""
    import statistics

    sides = {}
    for kind in ("ours", "old", "nnunet", "nnunet_probabilities"):
        measured = [row for row in rows if row.get("kind") == kind and "seconds" in row]
        if measured:
            sides[kind] = {
                "seconds_per_case": statistics.fmean(row["seconds"] for row in measured),
                "generate_seconds_per_case": statistics.fmean(row["generate_seconds"] for row in measured),
                "save_seconds_per_case": statistics.fmean(row["save_seconds"] for row in measured),
                "peak_bytes": max(row["peak_bytes"] for row in measured),
                "peak_gpu_bytes": max((row.get("peak_gpu_bytes", 0) for row in measured), default=0) or None,
            }
    for other in ("nnunet", "nnunet_probabilities", "old"):
        if "ours" in sides and other in sides:
            sides[f"ratio_ours_to_{other}"] = {
                "seconds": sides["ours"]["seconds_per_case"] / sides[other]["seconds_per_case"],
                "generate_seconds": sides["ours"]["generate_seconds_per_case"]
                / sides[other]["generate_seconds_per_case"],
                "peak_memory": sides["ours"]["peak_bytes"] / sides[other]["peak_bytes"],
            }
    return sides


def environment(args) -> dict:
    from importlib.metadata import version

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory = next(
        int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": commit,
        "device": args.device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "torch_threads": args.threads,
        "niceness": os.nice(0),
        "load_average_at_start": list(os.getloadavg()),
        "versions": {name: version(name) for name in ("torch", "nnunetv2", "numpy", "SimpleITK", "scipy")},
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        result = worker(task)
        Path(task["out"]).write_text(json.dumps(result))
        return 0
    temporary = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_scale_")) if temporary else args.work_dir.resolve()
    try:
        result = {"environment": environment(args), "settings": _setup_key(args)}
        print(f"set-up in {work} ...", flush=True)
        setup = set_up(args, work)
        result["setup_seconds"] = setup["seconds"]
        rows, before_after = ([], []) if args.skip_proposals else proposal_rows(args, work, setup)
        result["proposals"] = {"rows": rows, "summary": summary(rows)}
        result["before_after"] = {"rows": before_after, "summary": summary(before_after)}
        result["judges"] = {"rows": judge_rows(args, work, setup)}
        result["load_average_at_end"] = list(os.getloadavg())
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    from nnunet_rndpo.atomic import save_json

    save_json(result, args.output)
    print(json.dumps({"proposals": result["proposals"]["summary"], "before_after": result["before_after"]["summary"]}))
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
