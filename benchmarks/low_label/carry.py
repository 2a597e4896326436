"""Carrying a run from one machine to the next. A session's machine is new each time (its processes and its /work
end with it), and the folds protocol is tens of CPU-hours: `pack` copies what a later run needs from a work folder
into a folder kept under version control, `unpack` puts it into a new work folder, where the same command goes on
(finished arms are skipped by their result JSONs; a model still training resumes from its checkpoint_latest).

What travels: split.json, every arm's result (arms/*.json), every audit's judge_audit.json and, for every fold
folder of every model in nnUNet_results, its final checkpoint without the optimizer's state (prediction, proposals,
learned_qc's held-out path and fine-tuning read only the weights, init_args and logging) or, for a model still
training, its checkpoint_latest whole (the momentum too, so that it goes on exactly), the fold folder's JSON files
(pairs, statistics, settings, summary) and the model folder's plans.json and dataset.json. Not: the raw and
preprocessed datasets (`prepare` remakes them from the split), predictions and proposal stores (remade from the
models). A manifest (carried.json) lists every file with its sha256 and the work folder it came from; JSON files
name paths in that folder (a result's model folder, a fine-tuning's proposal store), and `unpack` rewrites them to
the new one.

    python -m benchmarks.low_label --work /work/bench_folds --pack benchmarks/results/low_label_folds/carried
    python -m benchmarks.low_label --work /work/bench_folds --unpack benchmarks/results/low_label_folds/carried"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from pathlib import Path

from nnunet_rndpo.atomic import atomic_path, save_json
from nnunet_rndpo.proposals.model import CheckpointError, file_sha256, read_checkpoint

MANIFEST = "carried.json"
RESULTS_FOLDER = "nnUNet_results"
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
OPTIMIZER_KEYS = ("optimizer_state", "grad_scaler_state")  # what only a training that goes on reads


class CarryError(RuntimeError):
    pass


def fold_folders(work: Path) -> list[Path]:
    """Every `nnUNet_results/<dataset>/<trainer__plans__configuration>/fold_<f>` of the work folder."""
    return sorted(path for path in (work / RESULTS_FOLDER).glob("*/*/fold_*") if path.is_dir())


def weights_only(source: Path, target: Path) -> None:
    """A final checkpoint without the optimizer's state (about half its size)."""
    import torch

    checkpoint = read_checkpoint(source)
    for key in OPTIMIZER_KEYS:
        checkpoint.pop(key, None)
    with atomic_path(target) as temporary:
        torch.save(checkpoint, temporary)


def same_checkpoint(first: Path, second: Path) -> bool:
    """Whether two checkpoint files hold the same content: torch.save names the archive inside the file after the
    file it writes, here a temporary name of its own each time, so a checkpoint saved again never has the same bytes."""
    import torch

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return (
                isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
            )
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, float) and isinstance(b, float):
            return a == b or (math.isnan(a) and math.isnan(b))  # a NaN in the logging is the same NaN
        return type(a) is type(b) and a == b

    try:
        return same(read_checkpoint(first), read_checkpoint(second))
    except CheckpointError:
        return False


def check_checkpoint(copy: Path, source: Path) -> None:
    """nnU-Net writes checkpoint_latest.pth in place each epoch (not under a temporary name): a copy taken while it
    was written, or of a file left half-written by a killed training, does not load. Pause the training (SIGSTOP)
    and pack again."""
    try:
        read_checkpoint(copy)
    except CheckpointError as error:
        raise CarryError(f"{source} does not load ({error}): was it being written? pause its training and pack again")


def carried_files(work: Path, unfinished: bool = True) -> list[tuple[Path, str]]:
    """(path relative to the work folder, how it travels: 'copy' or 'weights_only'), in a fixed order. `unfinished`
    False: no model still training (its epochs so far are redone on the next machine; each pack of its moving
    checkpoint adds 11 MB to git)."""
    files = [(Path("split.json"), "copy")] if (work / "split.json").is_file() else []
    files += [(path.relative_to(work), "copy") for path in sorted((work / "arms").glob("*.json"))]
    files += [(path.relative_to(work), "copy") for path in sorted(work.glob("*/judge_audit.json"))]
    for fold in fold_folders(work):
        if not unfinished and not (fold / "checkpoint_final.pth").is_file():
            continue
        model = fold.parent
        files += [(model.relative_to(work) / name, "copy") for name in MODEL_FILES if (model / name).is_file()]
        files += [(path.relative_to(work), "copy") for path in sorted(fold.glob("*.json"))]
        if (fold / "checkpoint_final.pth").is_file():
            files.append(((fold / "checkpoint_final.pth").relative_to(work), "weights_only"))
        elif (fold / "checkpoint_latest.pth").is_file():
            files.append(((fold / "checkpoint_latest.pth").relative_to(work), "copy"))
    return list(dict.fromkeys(files))  # a model folder's files once, however many folds it has


def pack(work: Path, destination: Path, unfinished: bool = True) -> dict:
    """Writes the carried files of `work` into `destination` (replacing what it held, all at once: built beside it,
    then renamed); `unfinished`: see carried_files. Returns the manifest."""
    work, destination = Path(work).resolve(), Path(destination).resolve()
    if not (work / "split.json").is_file():
        raise CarryError(f"{work} holds no split.json: not a work folder of the low-label benchmark")
    building = destination.with_name(f".{destination.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        manifest = {"work": str(work), "packed": datetime.datetime.now().isoformat(timespec="seconds"), "files": {}}
        for relative, how in carried_files(work, unfinished):
            target = building / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if how == "weights_only":
                weights_only(work / relative, target)
                if (destination / relative).is_file() and same_checkpoint(destination / relative, target):
                    shutil.copy2(destination / relative, target)  # the bytes carried before: no new blob in git
            else:
                shutil.copy2(work / relative, target)
                if target.suffix == ".pth":
                    check_checkpoint(target, work / relative)
            manifest["files"][str(relative)] = {"sha256": file_sha256(target), "how": how}
        save_json(manifest, building / MANIFEST)
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        if destination.exists():
            os.replace(destination, old)
        os.replace(building, destination)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return manifest


def unpack(source: Path, work: Path) -> list[Path]:
    """Puts the carried files of `source` into `work`; returns the files written. A file already there with the same
    content is left; one with other content is an error naming it (that work folder has gone on: pack it instead).
    Each file is checked against its sha256 and written under a temporary name, then renamed."""
    source, work = Path(source).resolve(), Path(work).resolve()
    manifest_file = source / MANIFEST
    if not manifest_file.is_file():
        raise CarryError(f"{source} holds no {MANIFEST}: not a folder written by pack")
    manifest = json.loads(manifest_file.read_text())
    old_work = manifest["work"]
    plan = []
    for relative, entry in manifest["files"].items():
        carried = source / relative
        if not carried.is_file() or file_sha256(carried) != entry["sha256"]:
            raise CarryError(f"{carried}: missing or not the file {MANIFEST} lists (sha256 differs)")
        content = carried.read_bytes()
        if relative.endswith(".json") and old_work != str(work):
            content = content.replace(old_work.encode(), str(work).encode())
        target = work / relative
        if target.is_file():
            if target.read_bytes() != content:
                raise CarryError(f"{target} exists with other content: this work folder went on; pack it instead")
            continue
        plan.append((target, content))
    for target, content in plan:
        with atomic_path(target) as temporary:
            temporary.write_bytes(content)
    return [target for target, _ in plan]
