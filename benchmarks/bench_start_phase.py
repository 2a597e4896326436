"""Seconds of the start phase (proposals, the judge's fit, scores, mining) in one process against two gloo ranks on
the same pool, side by side in one run (issue 29, item 2).

It runs `pipeline.prepare_pairs` as the trainer's start does, each side into a fresh proposal store and pairs file:
- one process: `--threads` torch threads, judges' scoring on `--threads` worker processes;
- two ranks (torch.distributed, gloo on loopback, spawned): each 1 torch thread and 1 scoring worker, waiting on
  the group of `start_ranks` (the setting rank_timeout_minutes); each makes and scores its half of the pool.
Both sides use the same CPU cores, so on a 2-core machine the ranks can only match the single process: what the
ranks change on a GPU server (each GPU makes its own shard instead of waiting in a barrier) is not measured here.
The pairs of both sides must be the same (cases, chosen and rejected members); the JSON says whether they are,
and by how much the judge's score gaps differ (the atlas registration rounds by its thread count).

It needs an nnU-Net folder tree with a dataset, its unlabeled pool and a base checkpoint, such as the demo's:

    nnunet_rndpo demo --output /tmp/demo_full
    python benchmarks/bench_start_phase.py --root /tmp/demo_full --dataset 990 --configuration 3d_demo --judge atlas

Writes benchmarks/results/bench_start_phase_<date>.json (atomically; -o to choose).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="folder holding nnUNet_raw/_preprocessed/_results")
    parser.add_argument("--dataset", required=True, help="dataset id or name")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--trainer", default="nnUNetTrainer", help="trainer folder of the base checkpoint")
    parser.add_argument("--judge", default="atlas")
    parser.add_argument("--num-proposals", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads and scoring workers of one process")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the stores go (default: temporary)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.output is None:
        today = datetime.date.today().isoformat()
        args.output = REPO_ROOT / "benchmarks" / "results" / f"bench_start_phase_{today}.json"
    return args


def _prepare(args: argparse.Namespace, folder: Path, workers: int, ranks=None) -> dict:
    """prepare_pairs into `folder`: its items and seconds per step."""
    from nnunet_rndpo.nnunet_paths import locate, parse_fold
    from nnunet_rndpo.pairs import PairSettings
    from nnunet_rndpo.pipeline import Ranks, prepare_pairs
    from nnunet_rndpo.proposals.model import load_model
    from nnunet_rndpo.proposals.plan import ProposalSettings
    from nnunet_rndpo.training.settings import PreferenceSettings

    location = locate(args.dataset, args.configuration, parse_fold(args.fold))
    checkpoint = location.checkpoint(args.trainer, "checkpoint_final.pth")
    model = load_model(checkpoint)
    settings = PairSettings.from_run_settings(
        PreferenceSettings(), judge=args.judge, proposals=ProposalSettings(num_proposals=args.num_proposals)
    )
    started = time.perf_counter()
    prepared = prepare_pairs(
        location,
        model,
        settings,
        store_folder=folder / "store",
        pairs_file=folder / "rndpo_pairs.json",
        ranks=ranks if ranks is not None else Ranks(),
        log=lambda message: None,
        progress=False,
        workers=workers,
    )
    seconds = {"total_s": time.perf_counter() - started, **prepared.seconds}
    return {"items": prepared.items, "seconds": seconds, "cases": len(prepared.pool.case_ids)}


def _rank_main(rank: int, args: argparse.Namespace, port: int, folder: str) -> None:
    """Entry point of each spawned rank: the start phase of its shard under start_ranks' group."""
    import torch
    import torch.distributed as dist

    from nnunet_rndpo.pipeline import start_ranks

    torch.set_num_threads(1)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        result = _prepare(args, Path(folder), workers=1, ranks=start_ranks(timeout_minutes=60))
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _compare_pairs(single: list[dict], ranks: list[dict]) -> dict:
    """The same pairs: the same cases, chosen and rejected members and disagreement; the scores' gaps may differ in
    their last bits (a judge that registers images, as the atlas, rounds by its thread count)."""

    def identity(item: dict) -> tuple:
        return tuple(item[key] for key in ("case_id", "chosen", "rejected", "disagreement_voxels"))

    gaps = [abs(a["score_gap"] - b["score_gap"]) for a, b in zip(single, ranks) if identity(a) == identity(b)]
    return {
        "pairs": len(single),
        "same_pairs": [identity(item) for item in single] == [identity(item) for item in ranks],
        "score_gap_max_difference": max(gaps, default=0.0),
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnunet_rndpo.nnunet_paths import set_nnunet_folders

    set_nnunet_folders(args.root)
    import torch
    import torch.multiprocessing as mp

    from nnunet_rndpo.atomic import save_json

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_start_phase_"))
    one, two = work / "one_process", work / "two_ranks"
    for folder in (one, two):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    load_before = os.getloadavg()

    torch.set_num_threads(args.threads)
    single = _prepare(args, one, workers=args.threads)
    print(f"one process: {single['seconds']['total_s']:.1f} s ({single['cases']} cases)", flush=True)

    started = time.perf_counter()
    mp.start_processes(_rank_main, args=(args, _free_port(), str(two)), nprocs=WORLD_SIZE, start_method="spawn")
    ranks_wall = time.perf_counter() - started  # spawning and importing included, as a torchrun start has them
    ranks = [json.loads((two / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    print(f"two ranks:   {ranks_wall:.1f} s wall (rank 0 {ranks[0]['seconds']['total_s']:.1f} s)", flush=True)

    from importlib.metadata import version

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"torch": torch.__version__, "nnunetv2": version("nnunetv2")},
        "load_average_before_after": [load_before, os.getloadavg()],
        "judge": args.judge,
        "num_proposals": args.num_proposals,
        "cases": single["cases"],
        "one_process": {"threads": args.threads, "scoring_workers": args.threads, **single["seconds"]},
        "two_ranks": {
            "wall_s": ranks_wall,
            "rank_seconds": [rank["seconds"] for rank in ranks],
        },
        "ratio_two_ranks_wall_to_one_process": ranks_wall / single["seconds"]["total_s"],
        **_compare_pairs(single["items"], ranks[0]["items"]),
    }
    save_json(result, args.output)
    print(json.dumps({key: result[key] for key in ("ratio_two_ranks_wall_to_one_process", "same_pairs", "pairs")}))
    print(f"written: {args.output}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["same_pairs"] else 1


if __name__ == "__main__":
    sys.exit(main())
