"""The start phase of a fine-tuning run, in one place, each step reusing what is on disk:

    pool -> proposals (store) -> judge (fitted once) -> scores -> pairs file

`prepare_pairs` owns the sequence; the trainers' start (nnunet_rndpo/training/trainers.py), the `judge` and
`prepare` subcommands and the audit call it. Under DDP every rank makes the proposals of its shard of the pool and
scores its shard; the judge is fitted once (rank 0) and shared through the store; rank 0 only merges the scores,
mines and writes the pairs file. Ranks wait for each other only through `Ranks.wait`, which the trainer backs with
a process group of its own timeout (settings: rank_timeout_minutes). No argument parsing, no nnU-Net trainer.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

from nnunet_rndpo.atomic import atomic_path, save_json
from nnunet_rndpo.judges import Judge, get_judge, judges_with_voxel_probabilities
from nnunet_rndpo.judging import (
    TrueLabelLoader,
    foreground_labels,
    judge_key,
    merge_scores,
    ready_judge,
    score_store,
)
from nnunet_rndpo.nnunet_paths import RunLocation
from nnunet_rndpo.pairs import PairSettings, default_pairs_file, made_with, pairs_record
from nnunet_rndpo.proposals.model import LoadedModel
from nnunet_rndpo.proposals.plan import ProposalSettings
from nnunet_rndpo.proposals.pool import CasePool, PoolReader, unlabeled_pool
from nnunet_rndpo.proposals.run import generate_proposals, store_manifest
from nnunet_rndpo.proposals.store import ProposalStore


class PairPreparationError(RuntimeError):
    """Pairs cannot be prepared as asked (no proposals yet, an in-sample learned judge, no pairs at all)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run (DDP), and how they wait for each other."""

    rank: int = 0
    world_size: int = 1
    wait: Callable[[], None] = field(default=lambda: None)
    # False for a part of a pool run on its own (`nnunet_rndpo prepare -part_id`): it makes and scores its cases
    # only; a last run over the whole pool merges the scores and mines
    merges: bool = True

    def shard(self, case_ids: list[str]) -> list[str]:
        return case_ids[self.rank :: self.world_size]


def start_ranks(timeout_minutes: float) -> Ranks:
    """This process's Ranks in a torch.distributed run (one process: `Ranks()`), waiting on a gloo group of its own
    with `timeout_minutes`: the default group keeps its own timeout (NCCL's is minutes), and a start phase may take
    hours (an atlas judge on a CT pool, a judge fitted on the folds' held-out predictions). A rank that does not
    arrive in time fails the run with torch's message naming it (monitored_barrier). Every rank calls this once."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
    return Ranks(dist.get_rank(), dist.get_world_size(), lambda: dist.monitored_barrier(group))


@dataclass
class PreparedPairs:
    pool: CasePool
    store: ProposalStore
    judge: Optional[Judge]  # None where this call did not judge (reused pairs)
    scores: dict[str, list[float]]  # every case's on rank 0; this rank's shard elsewhere
    record: Optional[dict]  # the pairs file's content; None when only scoring was asked
    pairs_file: Optional[Path] = None
    learned_from: Optional[frozenset[str]] = None  # the labeled cases the judge learned from (None: unknown)
    seconds: dict[str, float] = field(default_factory=dict)  # proposals_s, judging_s (fit and scores), mining_s

    @property
    def items(self) -> list[dict]:
        return [] if self.record is None else self.record["items"]


def default_workers() -> int:
    """nnU-Net's worker count (nnUNet_def_n_proc), which its own preprocessing and export use."""
    from nnunetv2.configuration import default_num_processes

    return int(default_num_processes)


def prepare_pairs(
    location: RunLocation,
    model: LoadedModel,
    settings: PairSettings,
    *,
    device="cpu",
    pool: Optional[CasePool] = None,
    store_folder: Optional[Path] = None,
    pairs_file: Optional[Path] = None,
    reuse_pairs_file: bool = False,
    make_proposals: bool = True,
    ranks: Ranks = Ranks(),
    log: Callable[[str], None] = print,
    progress: bool = True,
    workers: Optional[int] = None,
) -> PreparedPairs:
    """pool -> proposals -> judge -> scores -> pairs file, each step reusing what is on disk.

    pool: default the dataset's unlabeled pool (imagesUnlabeled, else the fold's training cases, loudly).
    pairs_file: where the training items go (default `default_pairs_file`). The items are read instead of judged
    again when `reuse_pairs_file` and that file exists (a resumed training keeps the pairs it started with), or when
    the store already holds a pairs file made with these settings (`nnunet_rndpo prepare`/`judge --mining` before
    training: the trainer then only reads it).
    make_proposals=False: refuse, instead of generating, when the store lacks cases.
    workers: processes that score cases (default nnU-Net's worker count).
    """
    rank0 = ranks.rank == 0
    pool = pool if pool is not None else unlabeled_pool(location)
    store_folder = store_folder if store_folder is not None else location.store_folder(model.checkpoint_path)
    if rank0:
        log(f"pool: {len(pool.case_ids)} cases from {pool.source}; proposal store {store_folder}")
    configured = get_judge(settings.judge, **settings.judge_options)
    voxel_region = settings.preference_region == "judge_voxels"
    _check_judge(configured, settings, pool, location, log if rank0 else (lambda message: None))

    store = ProposalStore(store_folder)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if make_proposals:
        if rank0:
            # opening (and, if asked, clearing) the store happens once, before any rank writes into it
            store.open(store_manifest(model, settings.proposals, pool), overwrite=settings.overwrite_proposals)
        ranks.wait()
        store, summary = generate_proposals(
            model,
            pool,
            store_folder,
            settings.proposals,
            device=device,
            case_ids=ranks.shard(pool.case_ids),
            progress=progress and rank0,
        )
        log(f"proposals: {summary.describe()}")
        ranks.wait()
    else:
        missing = [case_id for case_id in pool.case_ids if not store.has_case(case_id)]
        if missing:
            raise PairPreparationError(
                f"the store {store.folder} lacks {len(missing)} case(s) (e.g. {missing[0]}): "
                "run `nnunet_rndpo propose` first"
            )

    seconds["proposals_s"] = time.perf_counter() - started
    prepared_file = default_pairs_file(store, judge_key(configured), settings.selection) if settings.selection else None
    pairs_file = pairs_file if pairs_file is not None else prepared_file
    reusable = _reusable_pairs(settings, configured, store, pairs_file if reuse_pairs_file else None, prepared_file)
    if reusable is not None:
        if rank0 and reusable != pairs_file:
            with atomic_path(pairs_file) as temporary:
                shutil.copyfile(reusable, temporary)
        ranks.wait()
        record = _read_record(pairs_file, pool, settings, log)
        return PreparedPairs(pool, store, None, {}, record, pairs_file, seconds=seconds)

    # the judge is fitted once, by rank 0, into the store; the other ranks restore it from there
    started = time.perf_counter()
    proposal_settings = ProposalSettings.from_dict(store.manifest()["settings"])
    judge, learned_from = None, None
    if rank0:
        judge, learned_from = ready_judge(
            settings.judge, settings.judge_options, store, model, location, proposal_settings, device, progress, log
        )
        if judge.needs_labels:
            log(f"WARNING: {judge.describe()} reads true labels: research use only")
    ranks.wait()
    if not rank0:
        judge, learned_from = ready_judge(
            settings.judge, settings.judge_options, store, model, location, proposal_settings, device, False, log
        )
    reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    scores = score_store(
        judge,
        store,
        reader,
        ranks.shard(pool.case_ids),
        foreground_labels(model),
        TrueLabelLoader(model, location, pool),
        progress and rank0,
        voxel_region,
        workers if workers is not None else default_workers(),
    )
    ranks.wait()
    seconds["judging_s"] = time.perf_counter() - started
    started = time.perf_counter()
    record = None
    if rank0 and ranks.merges:
        scores = merge_scores(judge, store, pool.case_ids)
        if settings.selection is not None:
            record = pairs_record(
                store,
                scores,
                settings.selection,
                settings.mining_margin,
                settings.seed,
                settings.preference_region,
                judge_key(judge) if voxel_region else None,
            )
            record.update(
                judge=judge.describe(),
                store=str(store.folder),
                pool=pool.source,
                made_with=made_with(settings, configured.describe(), store),
            )
            save_json(record, pairs_file)
    ranks.wait()
    seconds["mining_s"] = time.perf_counter() - started
    if settings.selection is not None and ranks.merges:
        record = _read_record(pairs_file, pool, settings, log)
    return PreparedPairs(pool, store, judge, scores, record, pairs_file, learned_from, seconds)


def _check_judge(judge: Judge, settings: PairSettings, pool: CasePool, location: RunLocation, log) -> None:
    """Refuse, before any proposal is made, what cannot work; warn about what works badly."""
    if settings.preference_region == "judge_voxels" and not judge.gives_voxel_probabilities:
        raise PairPreparationError(
            f"preference_region 'judge_voxels' pushes where the judge's own per-voxel class probabilities side with "
            f"the chosen mask; judge {settings.judge!r} has none. Judges that have them: "
            f"{', '.join(judges_with_voxel_probabilities())}"
        )
    if not pool.in_sample:
        return
    if judge.learns:
        raise PairPreparationError(
            f"judge {settings.judge!r} learns from labeled cases, and the pool is the base model's own training "
            f"cases ({pool.source}): it would score in-sample proposals of memorised cases, unlike the new "
            f"cases it learned to judge and is meant for. Put unlabeled images in "
            f"{location.raw_dataset_folder}/imagesUnlabeled, or choose a judge that does not learn."
        )
    log(
        f"WARNING: no imagesUnlabeled folder in {location.raw_dataset_folder}: the pool is the base model's own "
        f"training cases ({pool.source}), on which it is most confident; fine-tuning on them adds little. Put "
        "unlabeled images in imagesUnlabeled/ (README: 'Using it on your data')."
    )


def _reusable_pairs(
    settings: PairSettings,
    configured: Judge,
    store: ProposalStore,
    resumed: Optional[Path],
    prepared: Optional[Path],
) -> Optional[Path]:
    """The pairs file to read instead of judging: the run's own on a resume, else one made beforehand with the same
    settings from the same store (`nnunet_rndpo prepare`)."""
    if settings.selection is None:
        return None
    if resumed is not None and resumed.is_file():
        return resumed
    if prepared is not None and prepared.is_file():
        try:
            record = json.loads(prepared.read_text())
        except json.JSONDecodeError:
            return None
        if record.get("made_with") == made_with(settings, configured.describe(), store):
            return prepared
    return None


def _read_record(pairs_file: Path, pool: CasePool, settings: PairSettings, log) -> dict:
    record = json.loads(pairs_file.read_text())
    log(f"training items: {json.dumps(record['summary'])}; {record['judge']} ({pairs_file})")
    if not record["items"]:
        raise PairPreparationError(
            f"no preference pairs: none of the {len(pool.case_ids)} cases of the pool ({pool.source}) gave two "
            f"different proposals the judge could rank (selection {settings.selection!r}). Add proposal sources "
            "(e.g. dropout), raise num_proposals, lower mining_margin, or check that the base model segments "
            "anything."
        )
    return record
