"""`nnunet_rndpo` command line: argparse sub-parsers, each a thin call into the library. Flags follow nnU-Net's
spelling (`-d -c -f -p -tr -chk -device -part_id -num_parts`, the long `--` forms too); the proposal flags, the
mining margin and the seed are made from the settings definitions, with their defaults and help.

Heavy imports (torch, nnU-Net) happen inside the subcommands, after the nnU-Net environment variables are
final: nnunetv2 reads them once, at import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from nnunet_rndpo.typed_settings import add_arguments, default_of, values_from_arguments

DEFAULT_AUDIT_JUDGES = ("agreement", "uncertainty", "learned_qc", "virtual_annotator", "anatomy", "atlas", "oracle")
PROPOSAL_FLAGS = (
    "num_proposals",
    "sources",
    "dropout_p",
    "dropout_location",
    "dropout_mode",
    "extra_checkpoints",
    "other_folds",
    "seed",
)
DEVICES = ("cuda", "cpu", "mps")


# ------------------------------------------------------------------------------------------ shared arguments
def _add_dataset_arguments(parser: argparse.ArgumentParser, fold: bool = True) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, as for nnUNetv2_train")
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    if fold:
        parser.add_argument("-f", "--fold", required=True, help="fold (0-4 or all), as for nnUNetv2_train")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-device",
        "--device",
        choices=DEVICES,
        default=None,
        help="device of the network passes, as nnUNetv2_predict's -device (default: cuda when available, else cpu)",
    )


def _add_parts(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-part_id", "--part_id", type=int, default=0, help=f"this part of the {what}, as nnUNetv2_predict (default: 0)"
    )
    parser.add_argument(
        "-num_parts", "--num_parts", type=int, default=1, help=f"parts the {what} is split into (default: 1)"
    )


def _add_base_model(parser: argparse.ArgumentParser) -> None:
    _add_dataset_arguments(parser)
    parser.add_argument(
        "-tr", "--base_trainer", default="nnUNetTrainer", help="trainer of the base model (default: nnUNetTrainer)"
    )
    parser.add_argument(
        "-chk",
        "--checkpoint",
        default="checkpoint_final.pth",
        help="checkpoint name in the base's fold folder, or a path to a .pth file (default: checkpoint_final.pth)",
    )
    _add_device(parser)


def _add_proposal_arguments(parser: argparse.ArgumentParser) -> None:
    from nnunet_rndpo.proposals.plan import ProposalSettings

    add_arguments(parser, ProposalSettings, PROPOSAL_FLAGS)


def _add_mining_margin(parser: argparse.ArgumentParser) -> None:
    from nnunet_rndpo.training.settings import PreferenceSettings

    default = default_of(PreferenceSettings, "mining_margin")
    parser.add_argument(
        "--mining_margin",
        "--margin",
        dest="mining_margin",
        type=float,
        default=default,
        help=f"score gap of `margin` mining (default: {default}, the training setting's)",
    )


def _judges_help() -> str:
    """The registered judges, and which read true labels or learn from the labeled cases."""
    from nnunet_rndpo.judges import available_judges, get_judge

    described = []
    for name in available_judges():
        judge = get_judge(name)
        notes = [
            note
            for note, applies in (
                ("reads true labels: research only", judge.needs_labels),
                ("learns from labeled cases", judge.learns),
            )
            if applies
        ]
        described.append(f"{name}{' (' + ', '.join(notes) + ')' if notes else ''}")
    return "registered judges: " + "; ".join(described) + ". A user's own: package.module:Class."


def _sources_help() -> str:
    from nnunet_rndpo.proposals.sources import describe_sources

    return f"proposal sources: {describe_sources()}."


def resolve_device(name: str | None) -> str:
    if name is not None:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _proposal_settings(args):
    from nnunet_rndpo.proposals.plan import ProposalSettings

    return ProposalSettings.from_dict(values_from_arguments(args, ProposalSettings, PROPOSAL_FLAGS))


def _location(args, fold=None):
    from nnunet_rndpo.nnunet_paths import locate

    return locate(args.dataset, args.configuration, args.fold if fold is None else fold, args.plans)


def _load(args):
    from nnunet_rndpo.proposals.model import load_model_like

    location = _location(args)
    checkpoint = location.checkpoint(args.base_trainer, args.checkpoint)
    model = load_model_like(checkpoint, location, args.device)
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

    from nnunet_rndpo.pairs import PairSettings
    from nnunet_rndpo.pipeline import prepare_pairs
    from nnunet_rndpo.proposals.plan import ProposalSettings

    location, model = _load(args)
    for spec in args.judges:
        options = args.judge_options if len(args.judges) == 1 else {}
        settings = PairSettings(
            proposals=ProposalSettings(),  # unused: the store's own proposals are judged (make_proposals=False)
            judge=spec,
            judge_options=options,
            selection=args.mining,
            mining_margin=args.mining_margin,
            seed=args.seed,
            overwrite_proposals=False,
            preference_region="disagreement",
        )
        prepared = prepare_pairs(
            location,
            model,
            settings,
            device=args.device,
            make_proposals=False,
            log=lambda message: print(message, file=sys.stderr),
        )
        best = [int(np.argmax(s)) for s in prepared.scores.values()]
        print(f"{prepared.judge.describe()}: {len(prepared.scores)} cases scored; top proposal index per case: {best}")
        if prepared.record is not None:
            print(f"pairs: {json.dumps(prepared.record['summary'])} -> {prepared.pairs_file}")
    return 0


def run_prepare(args) -> int:
    """The fine-tuning run's start phase before `nnUNetv2_train`: the trainer then reads the pairs file."""
    from nnunet_rndpo.pipeline import Ranks
    from nnunet_rndpo.training import trainers
    from nnunet_rndpo.training.run_settings import prepare_start_phase

    trainer_class = getattr(trainers, args.trainer, None)
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, trainers.nnUNetTrainerPreference)):
        raise SystemExit(f"--trainer {args.trainer!r} is not one of this package's preference trainers")
    prepared = prepare_start_phase(
        trainer_class.settings_overrides,
        _location(args),
        args.device,
        log=lambda message: print(message, file=sys.stderr),
        ranks=Ranks(args.part_id, args.num_parts, merges=args.num_parts == 1),
    )
    if args.num_parts > 1:
        print(
            f"part {args.part_id} of {args.num_parts}: proposals and scores of its cases are in "
            f"{prepared.store.folder}; when every part is done, run this command once without -part_id/-num_parts "
            "to mine the pairs"
        )
    else:
        print(f"pairs: {json.dumps(prepared.record['summary'])} -> {prepared.pairs_file}")
        print(f"nnUNetv2_train {args.dataset} {args.configuration} {args.fold} -tr {args.trainer} now reads them")
    return 0


def run_audit(args) -> int:
    from nnunet_rndpo.audit import (
        AUDIT_JSON_NAME,
        AUDIT_PAIRS_PNG_NAME,
        AUDIT_PNG_NAME,
        AUDIT_RANKS_PNG_NAME,
        format_table,
    )
    from nnunet_rndpo.audit.run import run_audit as audit
    from nnunet_rndpo.pipeline import default_workers

    location, model = _load(args)
    output = args.output or location.store_folder(model.checkpoint_path).parent / "audit"
    report = audit(
        model,
        location,
        args.judges,
        _proposal_settings(args),
        output,
        device=args.device,
        margin=args.mining_margin,
        seed=args.seed,
        reliability_curve=args.reliability_curve,
        workers=default_workers(),
    )
    print(format_table(report))
    recommendation = report["recommendation"]
    print(
        f"\nrecommendation: judge={recommendation['judge']}, mining={recommendation['mining']}\n"
        f"  {recommendation['reason']}"
    )
    names = (AUDIT_JSON_NAME, AUDIT_PNG_NAME, AUDIT_RANKS_PNG_NAME, AUDIT_PAIRS_PNG_NAME)
    print(f"written: {', '.join(str(output / name) for name in names)}")
    return 0


def run_compare(args) -> int:
    from nnunet_rndpo.compare import COMPARE_JSON_NAME, compare_models, format_comparison
    from nnunet_rndpo.nnunet_env import ensure_ext_trainer

    ensure_ext_trainer()  # nnU-Net's predictor looks the fine-tuned model's trainer up by name
    location = _location(args)
    output = args.output or location.model_folder(args.trainer) / f"compare_fold_{location.fold}"
    report = compare_models(
        location,
        location.model_folder(args.base_trainer),
        location.model_folder(args.trainer),
        output,
        base_checkpoint=args.base_checkpoint,
        tuned_checkpoint=args.checkpoint,
        images=args.images,
        labels=args.labels,
        device=args.device,
        mirroring=not args.disable_tta,
    )
    print(format_comparison(report))
    print(f"written: {output / COMPARE_JSON_NAME}")
    return 0


def run_export(args) -> int:
    from nnunet_rndpo.export import export_model_folder

    location = _location(args, fold="all")
    written = export_model_folder(location.model_folder(args.trainer), args.output, folds=args.folds)
    folds = " ".join(args.folds) if args.folds else "FOLDS"
    print(
        f"exported {len(written)} files to {args.output}; predict with: "
        f"nnUNetv2_predict_from_modelfolder -m {args.output} -i IN -o OUT -f {folds}"
    )
    return 0


def run_settings_table(args) -> int:
    from nnunet_rndpo.training.settings_table import example_settings, settings_table

    print(json.dumps(example_settings(), indent=2) if args.example else settings_table())
    return 0


def run_demo(args) -> int:
    from nnunet_rndpo.demo.run import run_demo as demo

    return demo(args.output, data=args.data, quick=args.quick, seed=args.seed, verbose=args.verbose)


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from nnunet_rndpo.mining import MINING_STRATEGIES
    from nnunet_rndpo.training.settings import PreferenceSettings

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

    env = add(
        "env", "print the `export nnUNet_extTrainer=...` line (and what to do about unset nnU-Net folders)", run_env
    )
    env.add_argument("--check", action="store_true", help="exit 1 if nnUNet_extTrainer does not include our trainers")

    propose = add(
        "propose",
        "make K proposals per unlabeled case into the proposal store",
        run_propose,
        epilog=_sources_help(),
    )
    _add_base_model(propose)
    _add_proposal_arguments(propose)
    _add_parts(propose, "pool")
    propose.add_argument(
        "--export_nifti",
        type=Path,
        default=None,
        help="also write the proposals as images in the original geometry into this folder (default: none)",
    )
    propose.add_argument(
        "--overwrite", action="store_true", help="discard a store made with other settings or another checkpoint"
    )

    judges_help = _judges_help()
    judge = add("judge", "score a store's proposals with judges (and mine pairs)", run_judge, epilog=judges_help)
    _add_base_model(judge)
    judge.add_argument(
        "--judges", nargs="+", default=["agreement"], help="registered names or module:Class paths (default: agreement)"
    )
    judge.add_argument(
        "--judge_options", type=json.loads, default={}, help="JSON options of a single judge (default: {})"
    )
    judge.add_argument(
        "--mining", default=None, choices=MINING_STRATEGIES, help="also mine pairs with this strategy (default: none)"
    )
    _add_mining_margin(judge)
    seed = default_of(PreferenceSettings, "seed")
    judge.add_argument("--seed", type=int, default=seed, help=f"seed of tie-breaks and random mining (default: {seed})")

    prepare = add(
        "prepare",
        "the start phase of a fine-tuning run before nnUNetv2_train (proposals, judge, pairs), with the settings the "
        "trainer will use (RNDPO_SETTINGS, recipe): nnUNetv2_train then only reads the pairs",
        run_prepare,
    )
    _add_dataset_arguments(prepare)
    prepare.add_argument(
        "-tr",
        "--trainer",
        default="nnUNetTrainerRNDPO",
        help="the fine-tuning trainer you will train with (default: nnUNetTrainerRNDPO)",
    )
    _add_device(prepare)
    _add_parts(prepare, "pool (each part makes and scores its cases; a last run without parts mines)")

    audit = add(
        "audit",
        "measure each judge against true Dice on labeled cases; recommend",
        run_audit,
        epilog=f"{judges_help} {_sources_help()}",
    )
    _add_base_model(audit)
    _add_proposal_arguments(audit)
    audit.add_argument(
        "--judges",
        nargs="+",
        default=list(DEFAULT_AUDIT_JUDGES),
        help=f"registered names or module:Class paths (default: {' '.join(DEFAULT_AUDIT_JUDGES)})",
    )
    audit.add_argument(
        "-o", "--output", type=Path, default=None, help="folder of judge_audit.json/png (default: beside the store)"
    )
    _add_mining_margin(audit)
    audit.add_argument(
        "--reliability_curve",
        type=Path,
        default=None,
        help="JSON reliability-to-gain curve: each judge's expected gain (docs/judges.md) (default: none)",
    )

    compare = add(
        "compare",
        "predict labeled cases the fine-tuning did not train on with the base and the fine-tuned model; per-class "
        "and mean Dice, the paired difference with its standard error, cases better",
        run_compare,
    )
    _add_dataset_arguments(compare)
    compare.add_argument(
        "-tr",
        "--trainer",
        default="nnUNetTrainerRNDPO",
        help="the fine-tuned model's trainer (default: nnUNetTrainerRNDPO)",
    )
    compare.add_argument(
        "-chk", "--checkpoint", default="checkpoint_final.pth", help="its checkpoint (default: checkpoint_final.pth)"
    )
    compare.add_argument("--base_trainer", default="nnUNetTrainer", help="the base's trainer (default: nnUNetTrainer)")
    compare.add_argument(
        "--base_checkpoint",
        default="checkpoint_final.pth",
        help="the base's checkpoint (default: checkpoint_final.pth)",
    )
    compare.add_argument(
        "-i",
        "--images",
        type=Path,
        default=None,
        help="labeled images to predict (default: the fold's validation cases)",
    )
    compare.add_argument("-l", "--labels", type=Path, default=None, help="their labels, <case><file_ending> (with -i)")
    compare.add_argument(
        "-o", "--output", type=Path, default=None, help="output folder (default: <fine-tuned model>/compare_fold_F)"
    )
    compare.add_argument(
        "--disable_tta", action="store_true", help="predict without mirroring, as nnUNetv2_predict --disable_tta"
    )
    _add_device(compare)

    export = add(
        "export", "copy a fine-tuned model folder with trainer name nnUNetTrainer (no package needed)", run_export
    )
    _add_dataset_arguments(export, fold=False)
    export.add_argument(
        "-tr",
        "--trainer",
        default="nnUNetTrainerRNDPO",
        help="trainer whose model folder is exported (default: nnUNetTrainerRNDPO)",
    )
    export.add_argument("-f", "--folds", nargs="+", default=None, help="folds to export (default: every fold_*)")
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="the new model folder (for nnUNetv2_predict_from_modelfolder -m)",
    )

    settings = add(
        "settings", "print the settings of a fine-tuning run (RNDPO_SETTINGS keys) as a table", run_settings_table
    )
    settings.add_argument("--example", action="store_true", help="print an example RNDPO_SETTINGS file instead")

    demo = add("demo", "end-to-end demo: base model on few labels, proposals, judge, RN-DPO, held-out Dice", run_demo)
    demo.add_argument("--output", type=Path, default=Path("rndpo_demo"), help="working folder (default: ./rndpo_demo)")
    demo.add_argument(
        "--data", type=Path, default=None, help="a real nnU-Net raw dataset folder instead of the synthetic one"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a smoke run of every step in under 2 minutes (its numbers mean nothing)"
    )
    demo.add_argument("--verbose", action="store_true", help="show nnU-Net's full output instead of one line per phase")
    demo.add_argument("--seed", type=int, default=0, help="seed of every random source (default: 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if hasattr(args, "device"):
        args.device = resolve_device(args.device)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        print(f"nnunet_rndpo {args.command}: {error}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that name the file, case or option at fault: printed as one line, not as a traceback."""
    from nnunet_rndpo.judges import JudgeError
    from nnunet_rndpo.judging import JudgingError
    from nnunet_rndpo.pipeline import PairPreparationError
    from nnunet_rndpo.proposals.model import CheckpointError
    from nnunet_rndpo.proposals.pool import PoolError
    from nnunet_rndpo.proposals.store import StoreError
    from nnunet_rndpo.typed_settings import SettingsError

    return (
        JudgeError,
        JudgingError,
        PairPreparationError,
        CheckpointError,
        PoolError,
        StoreError,
        SettingsError,
        FileNotFoundError,
    )


if __name__ == "__main__":
    sys.exit(main())
