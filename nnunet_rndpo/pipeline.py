"""The steps before preference training, in one place, each reusing what is already on disk:

    pool -> proposals (store) -> judge (fitted on labeled cases if it learns: `fit_judge`) -> scores -> pairs file

`prepare_pairs` owns the whole sequence; the trainers' start (nnunet_rndpo/training/trainers.py), the `judge`
subcommand and the audit (`run_audit`) call it. Under DDP the caller passes its rank, the world size and a
barrier; everything else is decided here. No argument parsing, no nnU-Net trainer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from nnunet_rndpo.atomic import save_json
from nnunet_rndpo.judges import (
    Judge,
    JudgeInput,
    get_judge,
    judges_with_voxel_probabilities,
    score_case,
    score_case_with_voxels,
)
from nnunet_rndpo.mining import MINING_STRATEGIES, MiningResult, mine_pairs
from nnunet_rndpo.nnunet_paths import RunLocation, checkpoint_fold, sibling_fold_checkpoints
from nnunet_rndpo.preference_region import check_region, kept_voxels, ranked_halves
from nnunet_rndpo.proposals.model import LoadedModel
from nnunet_rndpo.proposals.plan import ProposalSettings
from nnunet_rndpo.proposals.pool import (
    CasePool,
    PoolReader,
    held_out_pool,
    labeled_training_pool,
    unlabeled_pool,
    validation_pool,
)
from nnunet_rndpo.proposals.run import generate_proposals, store_manifest
from nnunet_rndpo.proposals.store import ProposalStore

PAIRS_FILE_NAME = "rndpo_pairs.json"
JUDGE_TOP = "judge_top"  # selection of the self-training baseline: the judge's best proposal of each case
SELECTIONS = (*MINING_STRATEGIES, JUDGE_TOP)
TRUE_LABELS_FOLDER = "labelsUnlabeled"  # research only: true labels of imagesUnlabeled, for the oracle


class PairPreparationError(RuntimeError):
    """Pairs cannot be prepared as asked (no proposals yet, an in-sample learned judge, no pairs at all)."""


@dataclass(frozen=True)
class PairSettings:
    """What `prepare_pairs` makes: which proposals, which judge, and how scores become training items."""

    proposals: ProposalSettings = field(default_factory=ProposalSettings)
    judge: str = "agreement"
    judge_options: dict = field(default_factory=dict)
    selection: Optional[str] = "top_bottom"  # a mining strategy, JUDGE_TOP, or None: score only
    mining_margin: float = 0.02
    seed: int = 0
    overwrite_proposals: bool = False
    preference_region: str = "disagreement"  # nnunet_rndpo.preference_region: which voxels of a pair are pushed

    def __post_init__(self):
        if self.selection is not None and self.selection not in SELECTIONS:
            raise ValueError(f"selection {self.selection!r}; valid: {', '.join(SELECTIONS)}")
        check_region(self.preference_region)


@dataclass
class PreparedPairs:
    pool: CasePool
    store: ProposalStore
    judge: Optional[Judge]  # None where this call did not judge (another DDP rank, reused pairs)
    scores: dict[str, list[float]]
    record: Optional[dict]  # the pairs file's content; None when only scoring was asked
    pairs_file: Optional[Path] = None

    @property
    def items(self) -> list[dict]:
        return [] if self.record is None else self.record["items"]


class TrueLabelLoader:
    """True label maps in preprocessed space, for the oracle judge, judge fitting and the audit.

    Training cases: nnU-Net's preprocessed segmentation. imagesUnlabeled cases: `labelsUnlabeled/<case>`
    in the raw dataset (research setups only), preprocessed like the image.
    """

    def __init__(self, model: LoadedModel, location: RunLocation):
        self.model = model
        self.raw_dataset_folder = location.raw_dataset_folder

    def load(self, case_id: str, pool: CasePool) -> Optional[np.ndarray]:
        if pool.preprocessed_folder is not None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            folder = str(pool.preprocessed_folder)
            _, seg, _, _ = infer_dataset_class(folder)(folder, [case_id]).load_case(case_id)
            return np.maximum(np.asarray(seg[:])[0], 0).astype(np.uint8)
        if self.raw_dataset_folder is None:
            return None
        label_file = self.raw_dataset_folder / TRUE_LABELS_FOLDER / f"{case_id}{self.model.dataset_json['file_ending']}"
        if not label_file.is_file():
            return None
        preprocessor = self.model.configuration_manager.preprocessor_class(verbose=False)
        _, seg, _ = preprocessor.run_case(
            [str(p) for p in pool.raw_files[case_id]],
            str(label_file),
            self.model.plans_manager,
            self.model.configuration_manager,
            self.model.dataset_json,
        )
        return np.maximum(seg[0], 0).astype(np.uint8)

    def for_pool(self, pool: CasePool) -> Callable[[str], Optional[np.ndarray]]:
        return lambda case_id: self.load(case_id, pool)


def foreground_labels(model: LoadedModel) -> tuple[int, ...]:
    return tuple(int(label) for label in model.label_manager.foreground_labels)


def judge_inputs(
    store: ProposalStore,
    reader: PoolReader,
    case_ids: Sequence[str],
    labels: tuple[int, ...],
    true_labels: Optional[Callable[[str], Optional[np.ndarray]]] = None,
) -> Iterator[JudgeInput]:
    proposal_models = store.member_models()
    for case_id in case_ids:
        case = store.load_case(case_id)
        data, _, _ = reader.load(case_id)
        yield JudgeInput(
            case_id=case_id,
            proposals=case["proposals"],
            labels=labels,
            image=data,
            mean_probabilities=case["mean_probabilities"].astype(np.float32),
            true_labels=true_labels(case_id) if true_labels is not None else None,
            proposal_models=proposal_models,
        )


def judge_learns(judge: Judge) -> bool:
    return judge.learns


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
    location: RunLocation,
    proposal_settings: ProposalSettings,
    device,
    progress: bool = True,
    log: Callable[[str], None] = print,
    exclude_case_ids: Collection[str] = (),
) -> Judge:
    """The judge ready to score: restored from beside the store, or, if it learns and has not been fitted yet,
    fitted now (`fit_judge`) and saved there. `exclude_case_ids`: labeled cases it must not learn from (the
    audit's own cases); such a fit is neither restored nor saved."""
    if exclude_case_ids:
        judge, fitted_file = get_judge(spec, **options), None
        if not judge_learns(judge):
            return judge
    else:
        judge, fitted_file = build_judge(spec, options, store)
        if fitted_file is None or fitted_file.is_file():
            return judge
    log(f"fitting {judge.describe()}")
    examples = FittingExamples(location, model, store, proposal_settings, device, progress, log, exclude_case_ids)
    fit_judge(judge, examples)
    if fitted_file is not None:
        judge.save(fitted_file)
    return judge


def fit_judge(judge: Judge, examples: "FittingExamples") -> None:
    """Fit each learning part of `judge` on the examples it may learn from: true label maps of the labeled
    training cases for a judge that learns from labels alone (anatomy), held-out predictions for one that learns
    from proposals (learned_qc). A combination's parts are fitted one by one, each on its own kind."""
    from nnunet_rndpo.judges.combination import CombinationJudge

    if isinstance(judge, CombinationJudge):
        for part in judge.judges:
            if part.learns:
                fit_judge(part, examples)
        return
    judge.fit(examples.held_out() if judge.fit_reads_proposals else examples.true_label_maps(judge.fit_reads_images))


class FittingExamples:
    """Labeled examples for fitting judges, each kind made once, on first use."""

    def __init__(self, location, model, store, proposal_settings, device, progress, log, exclude_case_ids=()):
        self.location, self.model, self.store = location, model, store
        self.proposal_settings, self.device, self.progress, self.log = proposal_settings, device, progress, log
        self.exclude = frozenset(exclude_case_ids)
        self._true_label_maps: dict[bool, list[JudgeInput]] = {}
        self._held_out: Optional[list[JudgeInput]] = None

    def true_label_maps(self, with_images: bool = False) -> list[JudgeInput]:
        """The fold's labeled training cases, each as its true label map (one 'proposal'), with its preprocessed
        image if `with_images`: for judges of anatomy (which learn what labels look like) and atlases."""
        if with_images not in self._true_label_maps:
            pool = labeled_training_pool(self.location)
            pool.case_ids = [case_id for case_id in pool.case_ids if case_id not in self.exclude]
            self.log(f"fitting on the true label maps of {len(pool.case_ids)} labeled training cases")
            labels = foreground_labels(self.model)
            true_labels = TrueLabelLoader(self.model, self.location).for_pool(pool)
            model = self.model
            reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
            self._true_label_maps[with_images] = [
                JudgeInput(
                    case_id,
                    (truth := true_labels(case_id))[None],
                    labels,
                    image=reader.load(case_id)[0] if with_images else None,
                    true_labels=truth,
                )
                for case_id in pool.case_ids
            ]
        return self._true_label_maps[with_images]

    def held_out(self) -> list[JudgeInput]:
        """Honest (proposals, true labels) examples: each fold model's proposals for the labeled cases held out of
        its training (its validation cases), for this model's fold and every sibling fold beside its checkpoint;
        nnU-Net's 5-fold cross-validation gives every labeled case once. Fitted on the model's own training cases
        instead, a judge would learn from memorised cases, where masks are better and more alike than on new
        ones. Members of other models (extra checkpoints, other folds) are left out of these proposals: those
        models may have trained on the case."""
        if self._held_out is None:
            self._held_out = self._make_held_out()
        return self._held_out

    def _make_held_out(self) -> list[JudgeInput]:
        from nnunet_rndpo.judges.learned_qc import check_held_out
        from nnunet_rndpo.proposals.model import load_model

        location, model = self.location, self.model
        settings = single_model_settings(self.proposal_settings, model.proposal_mirror_axes)
        labels = foreground_labels(model)
        fold_models: list[tuple[object, Optional[Path]]] = [(location.fold, None)]
        fold_models += [(checkpoint_fold(path), path) for path in sibling_fold_checkpoints(model.checkpoint_path)]
        inputs: list[JudgeInput] = []
        used = []
        for fold, checkpoint in fold_models:
            if fold is None:
                continue
            pool = held_out_pool(location, fold, exclude=self.exclude)
            if not pool.case_ids:
                continue
            training_cases = {fold: set(location.fold_split(fold)[0])}
            for case_id in pool.case_ids:
                check_held_out(case_id, fold, training_cases)
            fold_model = (
                model
                if checkpoint is None
                else load_model(
                    checkpoint,
                    self.device,
                    expected_plans=model.plans,
                    expected_configuration=model.configuration,
                    expected_dataset_json=model.dataset_json,
                )
            )
            folder = self.store.folder.parent / f"{self.store.folder.name}__held_out_fold_{fold}"
            held_out_store, _ = generate_proposals(
                fold_model, pool, folder, settings, device=self.device, progress=self.progress
            )
            reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
            true_labels = TrueLabelLoader(model, location).for_pool(pool)
            inputs += judge_inputs(held_out_store, reader, pool.case_ids, labels, true_labels)
            used.append(f"fold {fold}: {len(pool.case_ids)}")
        if not inputs:
            raise PairPreparationError(
                f"no held-out examples to fit a judge that learns from proposals: fold {location.fold} has no "
                f"validation cases{' left' if self.exclude else ''} and there is no other fold's "
                f"{model.checkpoint_path.name} beside {model.checkpoint_path.parent}. Honest examples are a fold "
                "model's proposals for the labeled cases it did not train on: train the base with a fold 0-4 "
                "(nnUNetv2_train DATASET CONFIG FOLD), each fold trained adds its validation cases. Fitting on the "
                "training cases is refused (the model memorised them)."
            )
        self.log(f"fitting on held-out predictions ({', '.join(used)} cases)")
        if len(used) == 1:
            self.log(
                "only one fold model: its validation cases are the only honest examples (about a fifth of the "
                "labeled cases); the other folds' models (nnUNetv2_train DATASET CONFIG 1..4) give every one"
            )
        return inputs


def single_model_settings(settings: ProposalSettings, mirror_axes: Optional[Sequence[int]]) -> ProposalSettings:
    """`settings` without members of other networks (for held-out examples: those networks may have trained on
    the case); only the base model's own sources, TTA when none is left. K shrinks to what those sources give
    when the other networks' members made up the rest (e.g. 25 cross-model members, 8 of the base's own)."""
    from dataclasses import replace

    from nnunet_rndpo.proposals.plan import available_members
    from nnunet_rndpo.proposals.sources import SOURCES

    own = tuple(name for name in settings.sources if not SOURCES[name].uses_extra_networks)
    single = replace(settings, sources=own or ("tta",), extra_checkpoints=(), other_folds=False)
    available = len(available_members(single, mirror_axes, settings.num_proposals))
    return replace(single, num_proposals=max(2, available))


def score_store(
    judge: Judge,
    store: ProposalStore,
    reader: PoolReader,
    case_ids: Sequence[str],
    labels: tuple[int, ...],
    true_labels: Optional[Callable[[str], Optional[np.ndarray]]] = None,
    progress: bool = True,
    keep_voxel_probabilities: bool = False,
) -> dict[str, list[float]]:
    """Scores of every case, written to <store>/judges/<judge>.scores.json (reused when complete).
    `keep_voxel_probabilities`: also save the judge's own per-voxel class probabilities of every case in the store
    (`Judge.score_with_voxels`; the `judge_voxels` preference region reads them); the scores are then reused only
    when those files are complete too."""
    key = _judge_key(judge)
    if keep_voxel_probabilities and not judge.gives_voxel_probabilities:
        raise ValueError(f"{judge.describe()} has no per-voxel class probabilities of its own to keep")
    scores_file = store.folder / "judges" / f"{key}.scores.json"
    if scores_file.is_file():
        saved = json.loads(scores_file.read_text())
        complete = saved.get("judge") == judge.describe() and set(case_ids) <= set(saved["scores"])
        if complete and keep_voxel_probabilities:
            complete = all(store.voxel_probabilities_path(key, case_id).is_file() for case_id in case_ids)
        if complete:
            return {case_id: saved["scores"][case_id] for case_id in case_ids}
    if judge.needs_labels and true_labels is None:
        raise ValueError(f"{judge.describe()} needs true labels; none are available for this pool")
    scores = {}
    inputs = judge_inputs(store, reader, case_ids, labels, true_labels if judge.needs_labels else None)
    for case in tqdm(
        inputs, total=len(case_ids), desc=f"judge {judge.display_name}", unit="case", disable=not progress
    ):
        if keep_voxel_probabilities:
            case_scores, probabilities = score_case_with_voxels(judge, case)
            store.save_voxel_probabilities(key, case.case_id, probabilities)
        else:
            case_scores = score_case(judge, case)
        scores[case.case_id] = [float(s) for s in case_scores]
    save_json(
        {"judge": judge.describe(), "research_only_uses_labels": bool(judge.needs_labels), "scores": scores},
        scores_file,
    )
    return scores


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
            proposals = store.load_case(case_id)["proposals"]
            kept = kept_voxels(
                proposals, item["chosen"], item["rejected"], preference_region, top, bottom, judge_probabilities
            )
            item.update(preference_region=preference_region, preference_voxels=int(np.count_nonzero(kept)))
            if top:
                item.update(top_half=list(top), bottom_half=list(bottom))
            if judge_probabilities is not None:
                item.update(voxel_judge_key=voxel_judge_key)
        preference_voxels = np.array([item["preference_voxels"] for item in items], dtype=np.float64)
        summary["mean_preference_voxels"] = float(preference_voxels.mean()) if preference_voxels.size else 0.0
    return {"summary": summary, "items": items}


def default_pairs_file(store: ProposalStore, judge: Judge, selection: str) -> Path:
    """Where the `judge` subcommand writes pairs: <store>/pairs/<judge>__<selection>/rndpo_pairs.json."""
    return store.folder / "pairs" / f"{_judge_key(judge)}__{selection}" / PAIRS_FILE_NAME


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
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> PreparedPairs:
    """pool -> proposals -> judge -> scores -> pairs file, each step reusing what is on disk.

    pool: default the dataset's unlabeled pool (imagesUnlabeled, else the fold's training cases, loudly).
    pairs_file: where the training items go (default `default_pairs_file`); with `reuse_pairs_file` an existing
    one is read instead of judging again (a resumed training keeps the pairs it started with).
    make_proposals=False: refuse, instead of generating, when the store lacks cases.
    rank / world_size / barrier: DDP; every rank makes proposals for its shard, rank 0 judges and writes.
    """
    pool = pool if pool is not None else unlabeled_pool(location)
    store_folder = store_folder if store_folder is not None else location.store_folder(model.checkpoint_path)
    if rank == 0:
        log(f"pool: {len(pool.case_ids)} cases from {pool.source}; proposal store {store_folder}")
    # the judge as configured (every rank): whether it learns, and the name of its pairs file
    configured_judge = get_judge(settings.judge, **settings.judge_options)
    voxel_region = settings.preference_region == "judge_voxels"
    if voxel_region and not configured_judge.gives_voxel_probabilities:
        raise PairPreparationError(
            f"preference_region 'judge_voxels' pushes where the judge's own per-voxel class probabilities side with "
            f"the chosen mask; judge {settings.judge!r} has none. Judges that have them: "
            f"{', '.join(judges_with_voxel_probabilities())}"
        )
    if pool.in_sample:
        if judge_learns(configured_judge):
            raise PairPreparationError(
                f"judge {settings.judge!r} learns from labeled cases, and the pool is the base model's own training "
                f"cases ({pool.source}): it would score in-sample proposals of memorised cases, unlike the new "
                f"cases it learned to judge and is meant for. Put unlabeled images in "
                f"{location.raw_dataset_folder}/imagesUnlabeled, or choose a judge that does not learn."
            )
        if rank == 0:
            log(
                f"WARNING: no imagesUnlabeled folder in {location.raw_dataset_folder}: the pool is the base "
                f"model's own training cases ({pool.source}), on which it is most confident; fine-tuning on them "
                "adds little. Put unlabeled images in imagesUnlabeled/ (README: 'Using it on your data')."
            )

    store = ProposalStore(store_folder)
    if make_proposals:
        if rank == 0:
            # opening (and, if asked, clearing) the store happens once, before any rank writes into it
            store.open(store_manifest(model, settings.proposals, pool), overwrite=settings.overwrite_proposals)
        barrier()
        store, summary = generate_proposals(
            model,
            pool,
            store_folder,
            settings.proposals,
            device=device,
            case_ids=pool.case_ids[rank::world_size],
            progress=progress and rank == 0,
        )
        log(f"proposals: {summary.describe()}")
        barrier()
    else:
        missing = [case_id for case_id in pool.case_ids if not store.has_case(case_id)]
        if missing:
            raise PairPreparationError(
                f"the store {store.folder} lacks {len(missing)} case(s) (e.g. {missing[0]}): "
                "run `nnunet_rndpo propose` first"
            )

    pairs_file = (
        pairs_file
        if pairs_file is not None or settings.selection is None
        else default_pairs_file(store, configured_judge, settings.selection)
    )
    reusing = reuse_pairs_file and pairs_file is not None and pairs_file.is_file()
    # only rank 0 judges, and only when the pairs are not reused: elsewhere there is no judge
    judge = None
    scores: dict[str, list[float]] = {}
    record = None
    if rank == 0 and not reusing:
        # a learning judge fits on held-out proposals made with the store's own settings
        proposal_settings = ProposalSettings.from_dict(store.manifest()["settings"])
        judge = ready_judge(
            settings.judge, settings.judge_options, store, model, location, proposal_settings, device, progress, log
        )
        if judge.needs_labels:
            log(f"WARNING: {judge.describe()} reads true labels: research use only")
        reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
        true_labels = TrueLabelLoader(model, location).for_pool(pool)
        scores = score_store(
            judge, store, reader, pool.case_ids, foreground_labels(model), true_labels, progress, voxel_region
        )
        if settings.selection is not None:
            record = pairs_record(
                store,
                scores,
                settings.selection,
                settings.mining_margin,
                settings.seed,
                settings.preference_region,
                _judge_key(judge) if voxel_region else None,
            )
            record.update(judge=judge.describe(), store=str(store.folder), pool=pool.source)
            save_json(record, pairs_file)
    barrier()
    if settings.selection is not None:
        record = json.loads(pairs_file.read_text())
        log(f"training items: {json.dumps(record['summary'])}; {record['judge']}")
        if not record["items"]:
            raise PairPreparationError(
                f"no preference pairs: none of the {len(pool.case_ids)} cases of the pool ({pool.source}) gave two "
                f"different proposals the judge could rank (selection {settings.selection!r}). Add proposal sources "
                "(e.g. dropout), raise num_proposals, lower mining_margin, or check that the base model segments "
                "anything."
            )
    return PreparedPairs(pool=pool, store=store, judge=judge, scores=scores, record=record, pairs_file=pairs_file)


def run_audit(
    model: LoadedModel,
    location: RunLocation,
    judge_specs: Sequence,
    proposal_settings: ProposalSettings,
    output_folder: Path,
    *,
    device="cpu",
    case_ids: Optional[Sequence[str]] = None,
    strategies: Optional[Sequence[str]] = None,
    margin: float = 0.02,
    seed: int = 0,
    reliability_curve: Optional[Path] = None,
    progress: bool = True,
    store_folder: Optional[Path] = None,
) -> dict:
    """Judges against true Dice on labeled cases (default: the fold's validation cases): JSON, PNGs, report.
    judge_specs: judge names (reported under their names), or (label, name, options) to audit one judge with
    several options side by side (e.g. the oracle at several noise levels).
    `reliability_curve`: a JSON reliability-to-gain curve (docs/judges.md) for each judge's expected gain.
    `store_folder`: where the audited proposals go (default: beside the checkpoint's store, `<store>__audit`); give
    each proposal setting its own, since a store holds the proposals of one setting."""
    from nnunet_rndpo.audit import AuditCase, audit_judges, recommend, write_audit
    from nnunet_rndpo.segmentation_metrics import proposal_dice

    pool = validation_pool(location, case_ids)
    if store_folder is None:
        default = location.store_folder(model.checkpoint_path)
        store_folder = default.parent / f"{default.name}__audit"
    store, _ = generate_proposals(model, pool, store_folder, proposal_settings, device=device, progress=progress)
    judged = []  # (label, judge, scores)
    for label, spec, options in (
        (item, item, {}) if isinstance(item, str) else (str(item[0]), item[1], dict(item[2])) for item in judge_specs
    ):
        configured = get_judge(spec, **options)
        if cross_fitted_in_audit(configured):
            judge, scores = cross_fitted_scores(
                spec, model, location, store, pool, device=device, progress=progress, options=options
            )
            judged.append((label, judge, scores))
            continue
        # a judge with voxel probabilities of its own keeps them, for the judge_voxels region's figures
        region = "judge_voxels" if configured.gives_voxel_probabilities else "disagreement"
        prepared = prepare_pairs(
            location,
            model,
            PairSettings(
                proposals=proposal_settings,
                judge=spec,
                judge_options=options,
                selection=None,
                seed=seed,
                preference_region=region,
            ),
            device=device,
            pool=pool,
            store_folder=store_folder,
            progress=progress,
            log=lambda message: None,
        )
        judged.append((label, prepared.judge, prepared.scores))
    true_labels = TrueLabelLoader(model, location).for_pool(pool)
    reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    labels = foreground_labels(model)
    audit_cases = []
    for case_id in pool.case_ids:
        proposals = store.load_case(case_id)["proposals"]
        truth = true_labels(case_id)
        audit_cases.append(
            AuditCase(
                case_id=case_id,
                true_dice=proposal_dice(proposals, truth, labels),
                judge_scores={label: np.asarray(scores[case_id]) for label, _, scores in judged},
                proposals=proposals,
                image=reader.load(case_id)[0],
                true_labels=truth,
                judge_voxel_probabilities={
                    label: store.load_voxel_probabilities(_judge_key(judge), case_id)
                    for label, judge, _ in judged
                    if judge.gives_voxel_probabilities
                },
            )
        )
    report = audit_judges(
        audit_cases,
        strategies=tuple(strategies or MINING_STRATEGIES),
        margin=margin,
        seed=seed,
        label_using_judges=tuple(label for label, judge, _ in judged if judge.needs_labels),
        reliability_curve=reliability_curve,
    )
    report["recommendation"] = recommend(report)
    report["proposal_settings"] = proposal_settings.to_dict()
    report["checkpoint"] = str(model.checkpoint_path)
    write_audit(report, output_folder)
    return report


def cross_fitted_in_audit(judge: Judge) -> bool:
    """A judge that learns from held-out predictions would be audited on its own training examples (the audit's
    labeled cases are held-out cases too), so the audit fits it twice, each time without the half it scores."""
    return judge_learns(judge) and judge.fit_reads_proposals


def cross_fitted_scores(
    spec: str,
    model: LoadedModel,
    location: RunLocation,
    store: ProposalStore,
    pool: CasePool,
    *,
    device="cpu",
    progress: bool = True,
    options: Optional[dict] = None,
) -> tuple[Judge, dict[str, list[float]]]:
    """Scores of every case of `pool` (labeled) by a judge never fitted on that case: two halves of the cases,
    each scored by the judge fitted on the held-out examples without it."""
    proposal_settings = ProposalSettings.from_dict(store.manifest()["settings"])
    reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    labels = foreground_labels(model)
    scores: dict[str, list[float]] = {}
    judge = get_judge(spec, **(options or {}))
    for half in (pool.case_ids[0::2], pool.case_ids[1::2]):
        if not half:
            continue
        judge = ready_judge(
            spec, options or {}, store, model, location, proposal_settings, device, progress, lambda m: None, half
        )
        for case in judge_inputs(store, reader, half, labels):
            scores[case.case_id] = [float(value) for value in score_case(judge, case)]
    return judge, scores
