"""The command line: `python -m benchmarks.low_label ...` (see the package's docstring)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import benchmarks.low_label as package
from benchmarks.low_label import plan_cross_seed, plan_folds, plan_v2
from benchmarks.low_label.protocols import PROTOCOLS, QUICK_SCHEDULE


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.low_label",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work", type=Path, default=Path("bench_output/low_label"))
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data" / "Dataset004_Hippocampus"
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--only", nargs="*", default=None, help="run only these arms")
    parser.add_argument("--part_id", type=int, default=0)
    parser.add_argument("--num_parts", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="device for training, proposals and evaluation"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny schedule to check the runner")
    parser.add_argument("--report", type=Path, default=None, help="write the summary table of finished arms here")
    parser.add_argument(
        "--pack",
        type=Path,
        default=None,
        help="copy what a later run needs (results, audits, models without optimizer state, an unfinished model's "
        "last checkpoint) from --work into this folder, for a new machine (carry.py), and stop",
    )
    parser.add_argument(
        "--pack_finished_only",
        action="store_true",
        help="with --pack: leave out the models still training (their epochs so far are redone after --unpack)",
    )
    parser.add_argument(
        "--unpack", type=Path, default=None, help="put a folder written by --pack into --work, and stop"
    )
    parser.add_argument(
        "--protocol",
        default="v2",
        choices=sorted(PROTOCOLS),
        help="v2 (default): built to see a gain; v3: v2 with 5 labeled and 20 validation cases; folds: v3's split "
        "with nnU-Net's 5-fold cross-validation of the labeled cases",
    )
    parser.add_argument(
        "--until", default=None, help="stop after this stage of the plan (e.g. folds: bases, base_ensemble, audit)"
    )
    parser.add_argument(
        "--ignore_gate", action="store_true", help="v2, v3: run the judge arms even when the sanity gate fails"
    )
    parser.add_argument(
        "--cross_seed",
        action="store_true",
        help="v2, v3: the bases of --ensemble_seeds as one ensemble: audit the judges on seed 0's cross-seed "
        "proposals (audit_seeds_<seeds>/), then RN-DPO and self-training with the best label-free judge there on "
        "each seed's cross-seed proposals (arms *_seeds_<seeds>_s<seed>), then with the oracle at each level on seed "
        "0's (the reliability curve); last, with the reliable oracle on the other seeds'",
    )
    parser.add_argument(
        "--ensemble_seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="--cross_seed: the seeds whose bases make the ensemble, each fine-tuned with the others as its "
        "ensemble (at least two, seed 0 among them)",
    )
    parser.add_argument(
        "--preference_sweep",
        action="store_true",
        help="v2, v3: after the gate arms, RN-DPO with the reliable oracle under each PREFERENCE_VARIANTS setting "
        "(beta, IPO target margin, SFT weight); prints their validation table and stops. With --cross_seed: RN-DPO "
        "with the best label-free judge under each setting on seed 0's cross-seed proposals, after the other arms; "
        "the setting seed 0's validation prefers on the other seeds, the step-matched self-training where it is an "
        "SFT weight, and RN-DPO under it with the oracle at each level (its curve)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.part_id < args.num_parts:
        parser.error(f"--part_id {args.part_id} must be between 0 and --num_parts - 1 ({args.num_parts - 1})")
    if args.pack and args.unpack:
        parser.error("--pack and --unpack: give one (pack on the old machine, unpack on the new one)")
    if args.pack_finished_only and not args.pack:
        parser.error("--pack_finished_only says what --pack leaves out: give --pack too")
    if args.cross_seed and (0 not in args.ensemble_seeds or len(set(args.ensemble_seeds)) < 2):
        parser.error(f"--ensemble_seeds {args.ensemble_seeds}: give seed 0 and at least one other seed")
    if args.cross_seed and PROTOCOLS[args.protocol].folds > 1:
        parser.error("--cross_seed is for v2 and v3; the folds protocol's models are its folds")
    return args


def plan_stages(args: argparse.Namespace) -> list:
    if PROTOCOLS[args.protocol].folds > 1:
        return plan_folds.stages()
    if args.cross_seed:
        return plan_cross_seed.stages(tuple(sorted(set(args.ensemble_seeds))))
    return plan_v2.stages()


def main(argv=None) -> int:
    args = parse_arguments(argv)
    from nnunet_rndpo import nnunet_paths

    work = args.work.resolve()
    nnunet_paths.set_nnunet_folders(work)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    import torch

    torch.set_flush_denormal(True)
    if args.pack or args.unpack:
        from benchmarks.low_label.carry import pack, unpack

        if args.pack:
            manifest = pack(work, args.pack, unfinished=not args.pack_finished_only)
            print(f"packed {len(manifest['files'])} files of {work} into {args.pack}")
        else:
            written = unpack(args.unpack, work)
            print(f"unpacked {len(written)} files of {args.unpack} into {work}")
        return 0
    from benchmarks.low_label.data import prepare_once
    from benchmarks.low_label.report import summarise
    from benchmarks.low_label.results import load_result
    from benchmarks.low_label.runner import Bench, ready, record
    from benchmarks.low_label.scheduling import Context, Parts, result_file, run_stages

    if args.report:
        table = summarise(work, figures=args.report.parent / "figures")
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(table + "\n")
        print(table)
        return 0
    protocol = PROTOCOLS[args.protocol]
    schedule = QUICK_SCHEDULE if args.quick else protocol.schedule
    prepare_once(work, args.data, args.seed, protocol)
    (work / "arms").mkdir(exist_ok=True)
    bench = Bench(work, protocol, schedule, args.threads, args.device)
    parts = Parts(args.part_id, args.num_parts, set(args.only) if args.only else None)
    context = Context(work, parts, args, bench)

    def finished(arms) -> dict:
        files = [result_file(work, arm) for arm in arms]
        return dict(loaded for file in files if file.is_file() and (loaded := load_result(file)) is not None)

    code = run_stages(
        plan_stages(args),
        context,
        lambda arm: record(arm, bench),
        finished,
        until=args.until,
        ready=lambda arm: ready(arm, bench),
    )
    if code == 0:
        print(summarise(work))
    return code


if __name__ == "__main__":
    sys.exit(main())
