"""The steps before preference training, each reusing what is already on disk:
proposals (store) -> judge (fitted on labeled cases if it learns) -> scores -> mined pairs.

Used by the trainers' start and by the `propose`, `judge` and `audit` subcommands; no argument parsing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from nnunet_rndpo.atomic import save_json
from nnunet_rndpo.judges import Judge, JudgeInput, get_judge, score_case
from nnunet_rndpo.mining import MiningResult, PairMiner
from nnunet_rndpo.proposals.members import ProposalSettings
from nnunet_rndpo.proposals.model import LoadedModel
from nnunet_rndpo.proposals.pool import PoolReader, UnlabeledPool, fold_split
from nnunet_rndpo.proposals.run import generate_proposals
from nnunet_rndpo.proposals.store import ProposalStore

LABELED_POOL_SOURCE = "labeled training cases of fold {fold} (for fitting judges)"
REFERENCE_FOLDER = "labelsUnlabeled"  # research only: true labels of imagesUnlabeled, for the oracle


class ReferenceLoader:
    """True label maps in preprocessed space, for the oracle judge, judge fitting and the audit.

    Training cases: nnU-Net's preprocessed segmentation. imagesUnlabeled cases: `labelsUnlabeled/<case>`
    in the raw dataset (research setups only), preprocessed like the image.
    """

    def __init__(self, model: LoadedModel, raw_dataset_folder: Optional[Path], preprocessed_data_folder: Path):
        self.model = model
        self.raw_dataset_folder = raw_dataset_folder
        self.preprocessed_data_folder = preprocessed_data_folder

    def load(self, case_id: str, pool: UnlabeledPool) -> Optional[np.ndarray]:
        if pool.preprocessed_folder is not None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            folder = str(pool.preprocessed_folder)
            _, seg, _, _ = infer_dataset_class(folder)(folder, [case_id]).load_case(case_id)
            return np.maximum(np.asarray(seg[:])[0], 0).astype(np.uint8)
        if self.raw_dataset_folder is None:
            return None
        label_file = self.raw_dataset_folder / REFERENCE_FOLDER / f"{case_id}{self.model.dataset_json['file_ending']}"
        if not label_file.is_file():
            return None
        preprocessor = self.model.configuration_manager.preprocessor_class(verbose=False)
        _, seg, _ = preprocessor.run_case(
            [str(p) for p in pool.raw_files[case_id]], str(label_file), self.model.plans_manager, self.model.configuration_manager, self.model.dataset_json
        )
        return np.maximum(seg[0], 0).astype(np.uint8)


def foreground_labels(model: LoadedModel) -> tuple[int, ...]:
    return tuple(int(label) for label in model.label_manager.foreground_labels)


def judge_inputs(
    store: ProposalStore,
    reader: PoolReader,
    case_ids: Sequence[str],
    labels: tuple[int, ...],
    references: Optional[Callable[[str], Optional[np.ndarray]]] = None,
) -> Iterator[JudgeInput]:
    for case_id in case_ids:
        case = store.load_case(case_id)
        data, _, _ = reader.load(case_id)
        yield JudgeInput(
            case_id=case_id,
            proposals=case["proposals"],
            labels=labels,
            image=data,
            mean_probabilities=case["mean_probabilities"].astype(np.float32),
            reference=references(case_id) if references is not None else None,
        )


def judge_learns(judge: Judge) -> bool:
    return type(judge).fit is not Judge.fit


def build_judge(spec: str, options: dict, store: ProposalStore) -> tuple[Judge, Optional[Path]]:
    """The judge, restored from beside the store when it was fitted there before."""
    judge = get_judge(spec, **options)
    fitted_file = store.folder / "judges" / f"{_judge_key(judge)}.fitted.pkl"
    if judge_learns(judge) and fitted_file.is_file():
        return Judge.load(fitted_file), fitted_file
    return judge, fitted_file if judge_learns(judge) else None


def _judge_key(judge: Judge) -> str:
    options = "_".join(f"{k}-{v}" for k, v in sorted(judge.options().items()))
    key = f"{judge.display_name}{'__' + options if options else ''}"
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in key)


def ready_judge(
    spec: str,
    options: dict,
    store: ProposalStore,
    model: LoadedModel,
    settings: ProposalSettings,
    preprocessed_base: Path,
    data_identifier: str,
    fold,
    device,
    progress: bool = True,
    on_fit: Optional[Callable[[Judge], None]] = None,
) -> Judge:
    """The judge ready to score: restored from beside the store, or, if it learns and has not been fitted yet,
    fitted now on the fold's labeled training cases (their own proposals, made with `settings`, and labels)."""
    judge, fitted_file = build_judge(spec, options, store)
    if fitted_file is None or fitted_file.is_file():
        return judge
    if on_fit is not None:
        on_fit(judge)
    data_folder = preprocessed_base / data_identifier
    train, _ = fold_split(preprocessed_base, data_folder, fold)
    labeled_pool = UnlabeledPool(
        dataset_name=model.plans["dataset_name"], source=LABELED_POOL_SOURCE.format(fold=fold), case_ids=sorted(train), preprocessed_folder=data_folder
    )
    labeled_store, _ = generate_proposals(
        model, labeled_pool, store.folder.parent / f"{store.folder.name}__labeled", settings, device=device, progress=progress
    )
    reader = PoolReader(labeled_pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    references = ReferenceLoader(model, None, data_folder)
    inputs = list(judge_inputs(labeled_store, reader, labeled_pool.case_ids, foreground_labels(model), lambda c: references.load(c, labeled_pool)))
    judge.fit(inputs)
    judge.save(fitted_file)
    return judge


def score_store(
    judge: Judge,
    store: ProposalStore,
    reader: PoolReader,
    case_ids: Sequence[str],
    labels: tuple[int, ...],
    references: Optional[Callable[[str], Optional[np.ndarray]]] = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Scores of every case, written to <store>/judges/<judge>.json (reused when complete)."""
    scores_file = store.folder / "judges" / f"{_judge_key(judge)}.scores.json"
    if scores_file.is_file():
        saved = json.loads(scores_file.read_text())
        if saved.get("judge") == judge.describe() and set(case_ids) <= set(saved["scores"]):
            return {case_id: saved["scores"][case_id] for case_id in case_ids}
    if judge.needs_labels and references is None:
        raise ValueError(f"{judge.describe()} needs true labels; none are available for this pool")
    scores = {}
    inputs = judge_inputs(store, reader, case_ids, labels, references if judge.needs_labels else None)
    for case in tqdm(inputs, total=len(case_ids), desc=f"judge {judge.display_name}", unit="case", disable=not progress):
        scores[case.case_id] = [float(s) for s in score_case(judge, case)]
    save_json({"judge": judge.describe(), "research_only_uses_labels": bool(judge.needs_labels), "scores": scores}, scores_file)
    return scores


def mine_store(
    store: ProposalStore, scores: dict[str, list[float]], strategy: str, margin: float, seed: int
) -> MiningResult:
    miner = PairMiner(strategy=strategy, margin=margin, seed=seed)
    for case_id in sorted(scores):
        miner.add_case(case_id, np.asarray(scores[case_id]), store.load_case(case_id)["proposals"])
    return miner.result()


def top_proposals(scores: dict[str, list[float]]) -> list[tuple[str, int]]:
    """The judge's best proposal per case (the self-training pseudo-label)."""
    return [(case_id, int(np.argmax(case_scores))) for case_id, case_scores in sorted(scores.items())]


def pairs_to_json(result: MiningResult) -> dict:
    return {
        "summary": result.summary(),
        "pairs": [
            {"case_id": p.case_id, "chosen": p.chosen, "rejected": p.rejected, "score_gap": p.score_gap, "disagreement_voxels": p.disagreement_voxels}
            for p in result.pairs
        ],
    }


def run_audit(
    model: LoadedModel,
    location,
    judge_specs: Sequence[str],
    settings: ProposalSettings,
    output_folder: Path,
    *,
    device="cpu",
    case_ids: Optional[Sequence[str]] = None,
    strategies: Optional[Sequence[str]] = None,
    margin: float = 0.02,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Judges against true Dice on labeled cases (default: the fold's validation cases): JSON, PNG, report."""
    from nnunet_rndpo.audit import audit_judges, recommend, write_audit, AuditCase
    from nnunet_rndpo.mining import MINING_STRATEGIES
    from nnunet_rndpo.segmentation_metrics import proposal_dice

    data_folder = location.preprocessed_data_folder
    _, validation = fold_split(location.preprocessed_base, data_folder, location.fold)
    cases = sorted(case_ids if case_ids is not None else validation)
    if not cases:
        raise ValueError(f"no labeled cases to audit for fold {location.fold}")
    pool = UnlabeledPool(dataset_name=location.dataset_name, source=f"labeled validation cases of fold {location.fold} (audit)", case_ids=cases, preprocessed_folder=data_folder)
    store_folder = location.store_folder(model.checkpoint_path)
    audit_store, _ = generate_proposals(model, pool, store_folder.parent / f"{store_folder.name}__audit", settings, device=device, progress=progress)
    reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    references = ReferenceLoader(model, None, data_folder)
    reference_of = {case_id: references.load(case_id, pool) for case_id in cases}
    labels = foreground_labels(model)
    judges = []
    for spec in judge_specs:
        judges.append(
            ready_judge(spec, {}, audit_store, model, settings, location.preprocessed_base, data_folder.name, location.fold, device, progress)
        )
    scores = {judge.display_name: score_store(judge, audit_store, reader, cases, labels, reference_of.get, progress) for judge in judges}
    audit_cases = []
    for case_id in cases:
        proposals = audit_store.load_case(case_id)["proposals"]
        audit_cases.append(
            AuditCase(
                case_id=case_id,
                true_dice=proposal_dice(proposals, reference_of[case_id], labels),
                judge_scores={name: np.asarray(per_case[case_id]) for name, per_case in scores.items()},
                proposals=proposals,
            )
        )
    report = audit_judges(
        audit_cases,
        strategies=tuple(strategies or MINING_STRATEGIES),
        margin=margin,
        seed=seed,
        label_using_judges=tuple(j.display_name for j in judges if j.needs_labels),
    )
    report["recommendation"] = recommend(report)
    report["proposal_settings"] = settings.to_dict()
    report["checkpoint"] = str(model.checkpoint_path)
    write_audit(report, output_folder)
    return report
