"""Subcommands beyond `env`: propose, judge, audit, export, demo. Each parses, then calls the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nnunet_rndpo.cli import subcommand


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (as for nnUNetv2_train)")
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    parser.add_argument("-f", "--fold", required=True, help="fold (0-4 or all)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-tr", "--base_trainer", default="nnUNetTrainer", help="trainer of the base model (default nnUNetTrainer)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint name in the base fold folder, or a path to a .pth file")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device for the network passes")


def _add_proposal_arguments(parser: argparse.ArgumentParser) -> None:
    from nnunet_rndpo.proposals.dropout import DROPOUT_LOCATIONS, DROPOUT_MODES
    from nnunet_rndpo.proposals.members import PROPOSAL_SOURCES

    parser.add_argument("-k", "--num_proposals", type=int, default=8, help="proposals per case (default 8)")
    parser.add_argument("--sources", nargs="+", default=["tta"], choices=PROPOSAL_SOURCES, help="proposal sources after the plain pass (default tta)")
    parser.add_argument("--dropout_p", type=float, default=0.2)
    parser.add_argument("--dropout_location", default="bottleneck", choices=DROPOUT_LOCATIONS)
    parser.add_argument("--dropout_mode", default="element", choices=DROPOUT_MODES)
    parser.add_argument("--extra_checkpoints", nargs="*", default=[], help="further checkpoints for source 'checkpoint'")
    parser.add_argument("--seed", type=int, default=0)


def _proposal_settings(args):
    from nnunet_rndpo.proposals.members import ProposalSettings

    return ProposalSettings(
        num_proposals=args.num_proposals,
        sources=tuple(args.sources),
        dropout_p=args.dropout_p,
        dropout_location=args.dropout_location,
        dropout_mode=args.dropout_mode,
        extra_checkpoints=tuple(args.extra_checkpoints),
        seed=args.seed,
    )


def _load(args):
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.proposals.model import load_model

    location = locate(args.dataset, args.configuration, args.fold, args.plans)
    checkpoint = location.checkpoint(args.base_trainer, args.checkpoint)
    model = load_model(
        checkpoint, args.device, expected_plans=location.plans, expected_configuration=args.configuration, expected_dataset_json=location.dataset_json
    )
    return location, model


def _pool(location, model):
    from nnunet_rndpo.proposals.pool import discover_pool

    return discover_pool(
        location.raw_dataset_folder.parent if location.raw_dataset_folder else None,
        location.preprocessed_base.parent,
        location.dataset_name,
        location.dataset_json,
        model.configuration_manager.data_identifier,
        location.fold,
    )


# ------------------------------------------------------------------------------------------ propose
def _configure_propose(parser):
    _add_run_arguments(parser)
    _add_proposal_arguments(parser)
    parser.add_argument("--part_id", type=int, default=0, help="this part of the pool (as nnUNetv2_predict)")
    parser.add_argument("--num_parts", type=int, default=1, help="number of parts the pool is split into")
    parser.add_argument("--export_nifti", type=Path, default=None, help="also write proposals as images in the original geometry")
    parser.add_argument("--overwrite", action="store_true", help="discard a store made with other settings or another checkpoint")


@subcommand("propose", "make K proposals per unlabeled case (MC dropout, mirror TTA, ...) into the proposal store")(_configure_propose)
def _run_propose(args) -> int:
    from nnunet_rndpo.proposals.run import generate_proposals

    location, model = _load(args)
    pool = _pool(location, model)
    store, summary = generate_proposals(
        model, pool, location.store_folder(model.checkpoint_path), _proposal_settings(args), device=args.device,
        part_id=args.part_id, num_parts=args.num_parts, overwrite=args.overwrite, export_nifti=args.export_nifti,
    )
    print(f"pool: {pool.source}; store: {store.folder}")
    print(f"summary: {summary.describe()}")
    return 0


# ------------------------------------------------------------------------------------------ judge
def _configure_judge(parser):
    from nnunet_rndpo.mining import MINING_STRATEGIES

    _add_run_arguments(parser)
    parser.add_argument("--judges", nargs="+", default=["agreement"], help="registered names or module:Class paths")
    parser.add_argument("--judge_options", type=json.loads, default={}, help='JSON options for a single judge, e.g. \'{"noise_std": 0.1}\'')
    parser.add_argument("--mining", default=None, choices=MINING_STRATEGIES, help="also mine pairs with this strategy")
    parser.add_argument("--margin", type=float, default=0.02, help="score gap for --mining margin")
    parser.add_argument("--seed", type=int, default=0, help="seed of random tie-breaks and --mining random")


@subcommand("judge", "score the proposals of a store with one or more judges (and optionally mine pairs)")(_configure_judge)
def _run_judge(args) -> int:
    import numpy as np

    from nnunet_rndpo import pipeline
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.proposals.members import ProposalSettings
    from nnunet_rndpo.proposals.pool import PoolReader
    from nnunet_rndpo.proposals.store import ProposalStore

    location, model = _load(args)
    pool = _pool(location, model)
    store = ProposalStore(location.store_folder(model.checkpoint_path))
    missing = [c for c in pool.case_ids if not store.has_case(c)]
    if missing:
        raise SystemExit(f"the store {store.folder} lacks {len(missing)} case(s) (e.g. {missing[0]}): run `nnunet_rndpo propose` first")
    reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    references = pipeline.ReferenceLoader(model, location.raw_dataset_folder, location.preprocessed_data_folder)
    # learning judges are fitted on labeled cases' proposals made with the store's own settings
    settings = ProposalSettings.from_dict(store.manifest()["settings"])
    for spec in args.judges:
        options = args.judge_options if len(args.judges) == 1 else {}
        judge = pipeline.ready_judge(
            spec, options, store, model, settings, location.preprocessed_base, location.preprocessed_data_folder.name, location.fold, args.device
        )
        if judge.needs_labels:
            print(f"WARNING: {judge.describe()} reads true labels: research use only", file=sys.stderr)
        scores = pipeline.score_store(judge, store, reader, pool.case_ids, pipeline.foreground_labels(model), lambda c: references.load(c, pool))
        best = [int(np.argmax(s)) for s in scores.values()]
        print(f"{judge.describe()}: {len(scores)} cases scored; top proposal index per case: {best}")
        if args.mining:
            mined = pipeline.mine_store(store, scores, args.mining, args.margin, args.seed)
            path = store.folder / "pairs" / f"{judge.display_name}__{args.mining}.json"
            save_json(pipeline.pairs_to_json(mined), path)
            print(f"pairs: {json.dumps(mined.summary())} -> {path}")
    return 0


# ------------------------------------------------------------------------------------------ audit
def _configure_audit(parser):
    _add_run_arguments(parser)
    _add_proposal_arguments(parser)
    parser.add_argument("--judges", nargs="+", default=["agreement", "uncertainty", "learned_qc", "virtual_annotator", "oracle"])
    parser.add_argument("-o", "--output", type=Path, default=None, help="folder for judge_audit.json/png (default: beside the store)")
    parser.add_argument("--margin", type=float, default=0.02)


@subcommand("audit", "measure each judge against true Dice on labeled cases and recommend a judge and mining")(_configure_audit)
def _run_audit(args) -> int:
    from nnunet_rndpo.audit import format_table
    from nnunet_rndpo.pipeline import run_audit

    location, model = _load(args)
    output = args.output or location.store_folder(model.checkpoint_path).parent / "audit"
    report = run_audit(model, location, args.judges, _proposal_settings(args), output, device=args.device, margin=args.margin, seed=args.seed)
    print(format_table(report))
    recommendation = report["recommendation"]
    print(f"\nrecommendation: judge={recommendation['judge']}, mining={recommendation['mining']}\n  {recommendation['reason']}")
    print(f"written: {output / 'judge_audit.json'}, {output / 'judge_audit.png'}")
    return 0


# ------------------------------------------------------------------------------------------ export
def _configure_export(parser):
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", required=True)
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerRNDPO", help="trainer whose model folder is exported")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-o", "--output", type=Path, required=True, help="new model folder (use with nnUNetv2_predict_from_modelfolder -m)")


@subcommand("export", "copy a fine-tuned model folder with trainer name nnUNetTrainer, for users without this package")(_configure_export)
def _run_export(args) -> int:
    from nnunet_rndpo.export import export_model_folder
    from nnunet_rndpo.nnunet_paths import locate

    location = locate(args.dataset, args.configuration, "all", args.plans)
    written = export_model_folder(location.model_folder(args.trainer), args.output)
    print(f"exported {len(written)} files to {args.output}; predict with: nnUNetv2_predict_from_modelfolder -m {args.output} -i IN -o OUT -f FOLDS")
    return 0


# ------------------------------------------------------------------------------------------ demo
def _configure_demo(parser):
    parser.add_argument("--output", type=Path, default=Path("rndpo_demo"), help="working folder (nnU-Net folders, results, report)")
    parser.add_argument("--data", type=Path, default=None, help="a real nnU-Net raw dataset folder instead of the synthetic one")
    parser.add_argument("--quick", action="store_true", help="a shorter schedule (smoke test)")
    parser.add_argument("--seed", type=int, default=0)


@subcommand("demo", "end-to-end demo: base model on few labels, proposals, judge, RN-DPO, held-out Dice")(_configure_demo)
def _run_demo(args) -> int:
    from nnunet_rndpo.demo.run import run_demo

    return run_demo(args.output, data=args.data, quick=args.quick, seed=args.seed)
