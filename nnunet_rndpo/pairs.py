"""Training items from judge scores: mined (chosen, rejected) pairs, or the judge's top proposal of each case for
self-training, and the pairs file that holds them (`rndpo_pairs.json`).

The pairs file is what a training run reads: `nnunet_rndpo judge --mining` writes it beside the proposal store, the
trainers' start writes it into the output folder. It records what made it (`made_with`: the judge, the selection,
its margin and seed, the preference region and the store), so that a run with the same settings reads it instead of
judging again. Mining itself is pure (nnunet_rndpo/mining.py); this module adds the store and the file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from nnunet_rndpo.mining import MINING_STRATEGIES, MiningResult, mine_pairs
from nnunet_rndpo.preference_region import check_region, kept_voxels, majority_labels, ranked_halves
from nnunet_rndpo.proposals.plan import ProposalSettings
from nnunet_rndpo.proposals.store import ProposalStore

PAIRS_FILE_NAME = "rndpo_pairs.json"
JUDGE_TOP = "judge_top"  # selection of the self-training baseline: the judge's best proposal of each case
SELECTIONS = (*MINING_STRATEGIES, JUDGE_TOP)


@dataclass(frozen=True)
class PairSettings:
    """What `prepare_pairs` makes: which proposals, which judge, and how scores become training items. No defaults
    here: they are the fine-tuning settings' (nnunet_rndpo/training/settings.py), see `from_run_settings`."""

    proposals: ProposalSettings
    judge: str
    judge_options: dict
    selection: Optional[str]  # a mining strategy, JUDGE_TOP, or None: score only
    mining_margin: float
    seed: int
    overwrite_proposals: bool
    preference_region: str  # nnunet_rndpo.preference_region: which voxels of a pair are pushed

    def __post_init__(self):
        if self.selection is not None and self.selection not in SELECTIONS:
            raise ValueError(f"selection {self.selection!r}; valid: {', '.join(SELECTIONS)}")
        check_region(self.preference_region)

    @classmethod
    def from_run_settings(cls, settings, overwrite_proposals: Optional[bool] = None, **changes) -> "PairSettings":
        """What a fine-tuning run with `settings` (PreferenceSettings) makes: mined pairs, or for self-training the
        judge's top proposal of each case. `changes` replace single fields (e.g. selection=None: scores only)."""
        values = dict(
            proposals=settings.proposal_settings(),
            judge=settings.judge,
            judge_options=dict(settings.judge_options),
            selection=JUDGE_TOP if settings.objective == "self_train" else settings.mining,
            mining_margin=settings.mining_margin,
            seed=settings.seed,
            overwrite_proposals=settings.overwrite_proposals if overwrite_proposals is None else overwrite_proposals,
            preference_region=settings.preference_region,
        )
        return cls(**{**values, **changes})


def made_with(settings: PairSettings, judge_description: str, store: ProposalStore) -> dict:
    """What a pairs file was made from: a file whose record matches is reused as it is."""
    return {
        "judge": judge_description,
        "selection": settings.selection,
        "mining_margin": settings.mining_margin,
        "seed": settings.seed,
        "preference_region": settings.preference_region,
        "store": str(store.folder),
        "checkpoint_sha256": store.manifest().get("checkpoint_sha256"),
    }


def mine_store(
    store: ProposalStore, scores: dict[str, list[float]], strategy: str, margin: float, seed: int
) -> MiningResult:
    cases = (
        (case_id, np.asarray(scores[case_id]), store.load_case(case_id)["proposals"]) for case_id in sorted(scores)
    )
    return mine_pairs(cases, strategy, margin=margin, seed=seed)


def pairs_record(
    store: ProposalStore,
    scores: dict[str, list[float]],
    selection: str,
    margin: float,
    seed: int,
    preference_region: str = "disagreement",
    voxel_judge_key: Optional[str] = None,
) -> dict:
    """Training items from scores: mined (chosen, rejected) pairs, or the judge's top proposal per case
    (JUDGE_TOP, self-training: chosen == rejected). The content of a pairs file. With a preference_region
    other than "disagreement" each pair names it (and what the region reads: for "ranked_consensus" the judge's
    top and bottom halves, `top_half`, `bottom_half`; for "judge_voxels" the key under which the store holds the
    judge's per-voxel probabilities, `voxel_judge_key`), from which the pair loader narrows the rejected mask,
    and counts the voxels that keep a preference (`preference_voxels`)."""
    if selection == JUDGE_TOP:
        items = [
            {"case_id": case_id, "chosen": int(np.argmax(s)), "rejected": int(np.argmax(s))}
            for case_id, s in sorted(scores.items())
        ]
        return {"summary": {"strategy": JUDGE_TOP, "pairs": len(items), "cases_total": len(scores)}, "items": items}
    if preference_region == "judge_voxels" and voxel_judge_key is None:
        raise ValueError("preference_region 'judge_voxels' needs the key of the judge's per-voxel probabilities")
    mined = mine_store(store, scores, selection, margin, seed)
    items = [
        {
            "case_id": p.case_id,
            "chosen": p.chosen,
            "rejected": p.rejected,
            "score_gap": p.score_gap,
            "disagreement_voxels": p.disagreement_voxels,
        }
        for p in mined.pairs
    ]
    summary = {**mined.summary(), "preference_region": preference_region}
    if preference_region != "disagreement":

        @functools.lru_cache(maxsize=1)  # pairs come case by case: each case's masks read (and voted) once
        def case_arrays(case_id: str) -> tuple[np.ndarray, np.ndarray | None]:
            proposals = store.load_proposals(case_id)
            return proposals, majority_labels(proposals) if preference_region == "majority" else None

        for item in items:
            case_id = item["case_id"]
            top, bottom = (
                ranked_halves(np.asarray(scores[case_id]), item["chosen"], item["rejected"])
                if preference_region == "ranked_consensus"
                else ((), ())
            )
            judge_probabilities = (
                store.load_voxel_probabilities(voxel_judge_key, case_id)
                if preference_region == "judge_voxels"
                else None
            )
            proposals, majority = case_arrays(case_id)
            kept = kept_voxels(
                proposals,
                item["chosen"],
                item["rejected"],
                preference_region,
                top,
                bottom,
                judge_probabilities,
                majority,
            )
            item.update(preference_region=preference_region, preference_voxels=int(np.count_nonzero(kept)))
            if top:
                item.update(top_half=list(top), bottom_half=list(bottom))
            if judge_probabilities is not None:
                item.update(voxel_judge_key=voxel_judge_key)
        preference_voxels = np.array([item["preference_voxels"] for item in items], dtype=np.float64)
        summary["mean_preference_voxels"] = float(preference_voxels.mean()) if preference_voxels.size else 0.0
    return {"summary": summary, "items": items}


def default_pairs_file(store: ProposalStore, judge_key: str, selection: str) -> Path:
    """Where `nnunet_rndpo judge --mining` writes pairs: <store>/pairs/<judge>__<selection>/rndpo_pairs.json."""
    return store.folder / "pairs" / f"{judge_key}__{selection}" / PAIRS_FILE_NAME
