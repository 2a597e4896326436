"""The audit of a trained model's judges (`nnunet_rndpo audit`): the model's proposals for labeled cases it did not
train on (default: the fold's validation cases), every judge's scores of them, their figures against the true Dice,
the recommendation, the report written beside the store.

A judge never scores a case it learned from: a judge whose fit read any audited case (a judge that learns from the
fold models' held-out predictions reads exactly these validation cases) is cross-fitted, each half of the cases
scored by the judge fitted without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnunet_rndpo.audit.figures import AuditCase, audit_judges
from nnunet_rndpo.audit.recommendation import recommend
from nnunet_rndpo.audit.report import write_audit
from nnunet_rndpo.judges import Judge, score_case_with_voxels
from nnunet_rndpo.judging import (
    TrueLabelLoader,
    foreground_labels,
    judge_input,
    judge_key,
    ready_judge,
    score_store,
)
from nnunet_rndpo.mining import MINING_STRATEGIES
from nnunet_rndpo.nnunet_paths import RunLocation
from nnunet_rndpo.proposals.model import LoadedModel
from nnunet_rndpo.proposals.plan import ProposalSettings
from nnunet_rndpo.proposals.pool import CasePool, PoolReader, validation_pool
from nnunet_rndpo.proposals.run import generate_proposals
from nnunet_rndpo.proposals.store import ProposalStore
from nnunet_rndpo.segmentation_metrics import proposal_dice


def run_audit(
    model: LoadedModel,
    location: RunLocation,
    judge_specs: Sequence,
    proposal_settings: ProposalSettings,
    output_folder: Path,
    *,
    margin: float,
    seed: int,
    device="cpu",
    case_ids: Optional[Sequence[str]] = None,
    strategies: Optional[Sequence[str]] = None,
    reliability_curve: Optional[Path] = None,
    progress: bool = True,
    store_folder: Optional[Path] = None,
    workers: int = 1,
) -> dict:
    """Judges against true Dice on labeled cases (default: the fold's validation cases): JSON, PNGs, report.
    judge_specs: judge names (reported under their names), or (label, name, options) to audit one judge with
    several options side by side (e.g. the oracle at several noise levels).
    `reliability_curve`: a JSON reliability-to-gain curve (docs/judges.md) for each judge's expected gain.
    `store_folder`: where the audited proposals go (default: beside the checkpoint's store, `<store>__audit`); give
    each proposal setting its own, since a store holds the proposals of one setting."""
    pool = validation_pool(location, case_ids)
    if store_folder is None:
        default = location.store_folder(model.checkpoint_path)
        store_folder = default.parent / f"{default.name}__audit"
    store, _ = generate_proposals(model, pool, store_folder, proposal_settings, device=device, progress=progress)
    reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    true_labels = TrueLabelLoader(model, location, pool)
    labels = foreground_labels(model)
    judged = []  # (label, judge, scores, voxel probabilities by case or None)
    for label, spec, options in (
        (item, item, {}) if isinstance(item, str) else (str(item[0]), item[1], dict(item[2])) for item in judge_specs
    ):
        audited = _AuditedJudge(spec, options, model, location, store, pool, reader, labels, true_labels, device)
        judged.append((label, *audited.scores(progress, workers)))
    audit_cases = []
    for case_id in pool.case_ids:
        proposals = store.load_case(case_id)["proposals"]
        truth = true_labels(case_id)
        audit_cases.append(
            AuditCase(
                case_id=case_id,
                true_dice=proposal_dice(proposals, truth, labels),
                judge_scores={label: np.asarray(scores[case_id]) for label, _, scores, _ in judged},
                proposals=proposals,
                image=reader.load(case_id)[0],
                true_labels=truth,
                judge_voxel_probabilities={
                    label: voxels(case_id) for label, _, _, voxels in judged if voxels is not None
                },
            )
        )
    report = audit_judges(
        audit_cases,
        strategies=tuple(strategies or MINING_STRATEGIES),
        margin=margin,
        seed=seed,
        label_using_judges=tuple(label for label, judge, _, _ in judged if judge.needs_labels),
        reliability_curve=reliability_curve,
    )
    report["recommendation"] = recommend(report)
    report["proposal_settings"] = proposal_settings.to_dict()
    report["checkpoint"] = str(model.checkpoint_path)
    write_audit(report, output_folder)
    return report


class _AuditedJudge:
    """One judge's scores of the audited cases, cross-fitted when its fit read any of them."""

    def __init__(self, spec, options, model, location, store, pool, reader, labels, true_labels, device):
        self.spec, self.options, self.model, self.location = spec, options, model, location
        self.store: ProposalStore = store
        self.pool: CasePool = pool
        self.reader, self.labels, self.true_labels, self.device = reader, labels, true_labels, device
        self.proposal_settings = ProposalSettings.from_dict(store.manifest()["settings"])

    def _ready(self, progress: bool, exclude=()) -> tuple[Judge, Optional[frozenset[str]]]:
        quiet = lambda message: None  # noqa: E731
        return ready_judge(
            self.spec,
            self.options,
            self.store,
            self.model,
            self.location,
            self.proposal_settings,
            self.device,
            progress,
            quiet,
            exclude,
        )

    def scores(self, progress: bool, workers: int):
        """(judge, scores by case, voxel probabilities by case (a function) or None)."""
        judge, learned_from = self._ready(progress)
        audited = set(self.pool.case_ids)
        if judge.learns and (learned_from is None or learned_from & audited):
            return self._cross_fitted(progress)
        keep_voxels = judge.gives_voxel_probabilities
        scores = score_store(
            judge,
            self.store,
            self.reader,
            self.pool.case_ids,
            self.labels,
            self.true_labels,
            progress,
            keep_voxels,
            workers,
        )
        key = judge_key(judge)
        voxels = (lambda case_id: self.store.load_voxel_probabilities(key, case_id)) if keep_voxels else None
        return judge, scores, voxels

    def _cross_fitted(self, progress: bool):
        """Every case scored by the judge fitted without it: two halves of the cases, each scored by the judge
        fitted on the examples of the other (kept in memory, never in the store)."""
        scores: dict[str, list[float]] = {}
        voxel_probabilities: dict[str, np.ndarray] = {}
        judge = None
        for half in (self.pool.case_ids[0::2], self.pool.case_ids[1::2]):
            if not half:
                continue
            judge, _ = self._ready(progress, exclude=half)
            for case_id in half:
                truth = self.true_labels if judge.needs_labels else None
                case = judge_input(self.store, self.reader, case_id, self.labels, truth)
                case_scores, probabilities = score_case_with_voxels(judge, case)
                scores[case_id] = [float(value) for value in case_scores]
                if probabilities is not None:
                    voxel_probabilities[case_id] = probabilities
        voxels = voxel_probabilities.__getitem__ if voxel_probabilities else None
        return judge, scores, voxels
