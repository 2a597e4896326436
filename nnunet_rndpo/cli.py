"""`nnunet_rndpo` command line: plain argparse sub-parsers, each a thin call into the library.

Heavy imports (torch, nnU-Net) happen inside the subcommands, after the nnU-Net environment variables are
final: nnunetv2 reads them once, at import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_AUDIT_JUDGES = ("agreement", "uncertainty", "learned_qc", "virtual_annotator", "anatomy", "atlas", "oracle")


# ------------------------------------------------------------------------------------------ shared arguments
def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (as for nnUNetv2_train)")
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    parser.add_argument("-f", "--fold", required=True, help="fold (0-4 or all)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument(
        "-tr", "--base_trainer", default="nnUNetTrainer", help="trainer of the base model (default nnUNetTrainer)"
    )
    parser.add_argument(
        "-chk",
        "--checkpoint",
        default="checkpoint_final.pth",
        help="checkpoint name in the base fold folder, or a path to a .pth file",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device for the network passes")


def _add_proposal_arguments(parser: argparse.ArgumentParser) -> None:
    from nnunet_rndpo.proposals.dropout import DROPOUT_LOCATIONS, DROPOUT_MODES
    from nnunet_rndpo.proposals.sources import PROPOSAL_SOURCES, describe_sources

    parser.add_argument("-k", "--num_proposals", type=int, default=8, help="proposals per case (default 8)")
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["tta"],
        choices=PROPOSAL_SOURCES,
        metavar="SOURCE",
        help=f"proposal sources after the plain pass (default tta). {describe_sources()}",
    )
    parser.add_argument("--dropout_p", type=float, default=0.2)
    parser.add_argument("--dropout_location", default="bottleneck", choices=DROPOUT_LOCATIONS)
    parser.add_argument("--dropout_mode", default="element", choices=DROPOUT_MODES)
    parser.add_argument(
        "--extra_checkpoints",
        nargs="*",
        default=[],
        help="further checkpoints for sources 'checkpoint' and 'checkpoint_tta'",
    )
    parser.add_argument(
        "--other_folds", action="store_true", help="add the base's other trained folds to the extra checkpoints"
    )
    parser.add_argument("--seed", type=int, default=0)


def _judges_help() -> str:
    """The registered judges, and which read true labels or learn from the labeled cases."""
    from nnunet_rndpo.judges import available_judges, get_judge
    from nnunet_rndpo.pipeline import judge_learns

    described = []
    for name in available_judges():
        judge = get_judge(name)
        notes = [
            note
            for note, applies in (
                ("reads true labels: research only", judge.needs_labels),
                ("learns from labeled cases", judge_learns(judge)),
            )
            if applies
        ]
        described.append(f"{name}{' (' + ', '.join(notes) + ')' if notes else ''}")
    return "registered judges: " + "; ".join(described) + ". A user's own: package.module:Class."


def _proposal_settings(args):
    from nnunet_rndpo.proposals.plan import ProposalSettings

    return ProposalSettings(
        num_proposals=args.num_proposals,
        sources=tuple(args.sources),
        dropout_p=args.dropout_p,
        dropout_location=args.dropout_location,
        dropout_mode=args.dropout_mode,
        extra_checkpoints=tuple(args.extra_checkpoints),
        other_folds=args.other_folds,
        seed=args.seed,
    )


def _load(args):
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.proposals.model import load_model

    location = locate(args.dataset, args.configuration, args.fold, args.plans)
    checkpoint = location.checkpoint(args.base_trainer, args.checkpoint)
    model = load_model(
        checkpoint,
        args.device,
        expected_plans=location.plans,
        expected_configuration=args.configuration,
        expected_dataset_json=location.dataset_json,
    )
    return location, model


# ------------------------------------------------------------------------------------------ subcommands
def run_env(args) -> int:
    from nnunet_rndpo.nnunet_env import export_lines, ext_trainer_is_set

    if args.check:
        return 0 if ext_trainer_is_set() else 1
    print("\n".join(export_lines()))
    return 0


def run_propose(args) -> int:
    from nnunet_rndpo.proposals.pool import unlabeled_pool
    from nnunet_rndpo.proposals.run import generate_proposals

    location, model = _load(args)
    pool = unlabeled_pool(location)
    store, summary = generate_proposals(
        model,
        pool,
        location.store_folder(model.checkpoint_path),
        _proposal_settings(args),
        device=args.device,
        part_id=args.part_id,
        num_parts=args.num_parts,
        overwrite=args.overwrite,
        export_nifti=args.export_nifti,
    )
    print(f"pool: {pool.source}; store: {store.folder}")
    print(f"summary: {summary.describe()}")
    return 0


def run_judge(args) -> int:
    import numpy as np

    from nnunet_rndpo.pipeline import PairPreparationError, PairSettings, prepare_pairs

    location, model = _load(args)
    for spec in args.judges:
        options = args.judge_options if len(args.judges) == 1 else {}
        settings = PairSettings(
            judge=spec, judge_options=options, selection=args.mining, mining_margin=args.margin, seed=args.seed
        )
        try:
            prepared = prepare_pairs(
                location,
                model,
                settings,
                device=args.device,
                make_proposals=False,
                log=lambda message: print(message, file=sys.stderr),
            )
        except PairPreparationError as error:
            raise SystemExit(str(error)) from error
        best = [int(np.argmax(s)) for s in prepared.scores.values()]
        print(f"{prepared.judge.describe()}: {len(prepared.scores)} cases scored; top proposal index per case: {best}")
        if prepared.record is not None:
            print(f"pairs: {json.dumps(prepared.record['summary'])} -> {prepared.pairs_file}")
    return 0


def run_audit(args) -> int:
    from nnunet_rndpo.audit import (
        AUDIT_JSON_NAME,
        AUDIT_PAIRS_PNG_NAME,
        AUDIT_PNG_NAME,
        AUDIT_RANKS_PNG_NAME,
        format_table,
    )
    from nnunet_rndpo.pipeline import run_audit as audit

    location, model = _load(args)
    output = args.output or location.store_folder(model.checkpoint_path).parent / "audit"
    report = audit(
        model,
        location,
        args.judges,
        _proposal_settings(args),
        output,
        device=args.device,
        margin=args.margin,
        seed=args.seed,
        reliability_curve=args.reliability_curve,
    )
    print(format_table(report))
    recommendation = report["recommendation"]
    print(
        f"\nrecommendation: judge={recommendation['judge']}, mining={recommendation['mining']}\n"
        f"  {recommendation['reason']}"
    )
    names = (AUDIT_JSON_NAME, AUDIT_PNG_NAME, AUDIT_RANKS_PNG_NAME, AUDIT_PAIRS_PNG_NAME)
    written = ", ".join(str(output / name) for name in names)
    print(f"written: {written}")
    return 0


def run_export(args) -> int:
    from nnunet_rndpo.export import export_model_folder
    from nnunet_rndpo.nnunet_paths import locate

    location = locate(args.dataset, args.configuration, "all", args.plans)
    written = export_model_folder(location.model_folder(args.trainer), args.output)
    print(
        f"exported {len(written)} files to {args.output}; predict with: "
        f"nnUNetv2_predict_from_modelfolder -m {args.output} -i IN -o OUT -f FOLDS"
    )
    return 0


def run_demo(args) -> int:
    from nnunet_rndpo.demo.run import run_demo as demo

    return demo(args.output, data=args.data, quick=args.quick, seed=args.seed, verbose=args.verbose)


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from nnunet_rndpo.mining import MINING_STRATEGIES

    parser = argparse.ArgumentParser(
        prog="nnunet_rndpo",
        description="Preference fine-tuning (Region-Normalized DPO) for nnU-Net v2. "
        'Run `eval "$(nnunet_rndpo env)"` once so that nnUNetv2_train -tr nnUNetTrainerRNDPO finds our trainers.',
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, run, epilog: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        sub.set_defaults(func=run)
        return sub

    env = add("env", "print the `export nnUNet_extTrainer=...` line (and unset nnU-Net variables)", run_env)
    env.add_argument("--check", action="store_true", help="exit 1 if nnUNet_extTrainer does not include our trainers")

    propose = add(
        "propose",
        "make K proposals per unlabeled case (MC dropout, mirror TTA, ...) into the proposal store",
        run_propose,
    )
    _add_run_arguments(propose)
    _add_proposal_arguments(propose)
    propose.add_argument("--part_id", type=int, default=0, help="this part of the pool (as nnUNetv2_predict)")
    propose.add_argument("--num_parts", type=int, default=1, help="number of parts the pool is split into")
    propose.add_argument(
        "--export_nifti", type=Path, default=None, help="also write proposals as images in the original geometry"
    )
    propose.add_argument(
        "--overwrite", action="store_true", help="discard a store made with other settings or another checkpoint"
    )

    judges_help = _judges_help()
    judge = add(
        "judge",
        "score the proposals of a store with one or more judges (and optionally mine pairs)",
        run_judge,
        epilog=judges_help,
    )
    _add_run_arguments(judge)
    judge.add_argument(
        "--judges", nargs="+", default=["agreement"], help="registered names or module:Class paths (listed below)"
    )
    judge.add_argument(
        "--judge_options",
        type=json.loads,
        default={},
        help="JSON options for a single judge, e.g. '{\"noise_std\": 0.1}'",
    )
    judge.add_argument("--mining", default=None, choices=MINING_STRATEGIES, help="also mine pairs with this strategy")
    judge.add_argument("--margin", type=float, default=0.02, help="score gap for --mining margin")
    judge.add_argument("--seed", type=int, default=0, help="seed of random tie-breaks and --mining random")

    audit = add(
        "audit",
        "measure each judge against true Dice on labeled cases and recommend a judge and mining",
        run_audit,
        epilog=judges_help,
    )
    _add_run_arguments(audit)
    _add_proposal_arguments(audit)
    audit.add_argument(
        "--judges",
        nargs="+",
        default=list(DEFAULT_AUDIT_JUDGES),
        help="registered names or module:Class paths (listed below)",
    )
    audit.add_argument(
        "-o", "--output", type=Path, default=None, help="folder for judge_audit.json/png (default: beside the store)"
    )
    audit.add_argument("--margin", type=float, default=0.02)
    audit.add_argument(
        "--reliability_curve",
        type=Path,
        default=None,
        help="JSON reliability-to-gain curve: each judge's expected gain (docs/judges.md)",
    )

    export = add(
        "export",
        "copy a fine-tuned model folder with trainer name nnUNetTrainer, for users without this package",
        run_export,
    )
    export.add_argument("-d", "--dataset", required=True)
    export.add_argument("-c", "--configuration", required=True)
    export.add_argument("-tr", "--trainer", default="nnUNetTrainerRNDPO", help="trainer whose model folder is exported")
    export.add_argument("-p", "--plans", default="nnUNetPlans")
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="new model folder (use with nnUNetv2_predict_from_modelfolder -m)",
    )

    demo = add("demo", "end-to-end demo: base model on few labels, proposals, judge, RN-DPO, held-out Dice", run_demo)
    demo.add_argument(
        "--output", type=Path, default=Path("rndpo_demo"), help="working folder (nnU-Net folders, results, report)"
    )
    demo.add_argument(
        "--data", type=Path, default=None, help="a real nnU-Net raw dataset folder instead of the synthetic one"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a smoke run of every step in under 2 minutes (its numbers mean nothing)"
    )
    demo.add_argument("--verbose", action="store_true", help="show nnU-Net's full output instead of one line per phase")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
