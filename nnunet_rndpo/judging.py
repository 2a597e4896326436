"""A judge's life cycle beside a proposal store: built, fitted on the labeled data it asks for, saved, restored, and
its scores of every case kept in the store.

    judge = ready_judge(...)         # restored from <store>/judges/<key>.fitted.pkl, or fitted (`FittingExamples`)
    scores = score_store(judge, ...) # <store>/judges/<key>.scores/<case>.json, one file per case, reused

A judge asks for its data (`Judge.fit_from`): `FittingExamples` makes each kind once, on request, from nnU-Net's
folders (the fold's labeled training cases as true label maps; each fold model's proposals for the labeled cases it
did not train on) and remembers which labeled cases it handed out, so that no one scores a case with a judge that
learned from it (the audit's cross-fitting reads that). Scoring takes any subset of the pool (a DDP rank's shard)
and scores cases in parallel on nnU-Net's worker count; each case's score is written on its own, so ranks and
workers never write one file together and a killed run resumes.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import replace
from pathlib import Path
from typing import Callable, Collection, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from nnunet_rndpo.atomic import each_claimed, exclusive_claim, save_json
from nnunet_rndpo.judges import Judge, JudgeInput, get_judge, score_case, score_case_with_voxels
from nnunet_rndpo.judges.learned_qc import check_held_out
from nnunet_rndpo.nnunet_paths import RunLocation, checkpoint_fold, sibling_fold_checkpoints
from nnunet_rndpo.proposals.model import LoadedModel, load_model_like
from nnunet_rndpo.proposals.plan import ProposalSettings, available_members
from nnunet_rndpo.proposals.pool import CasePool, PoolReader, held_out_pool, labeled_training_pool
from nnunet_rndpo.proposals.run import generate_proposals
from nnunet_rndpo.proposals.sources import SOURCES
from nnunet_rndpo.proposals.store import ProposalStore

TRUE_LABELS_FOLDER = "labelsUnlabeled"  # research only: true labels of imagesUnlabeled, for the oracle


class JudgingError(RuntimeError):
    """A judge cannot be readied or scored as asked (no honest examples to fit on, no true labels for the oracle)."""


class TrueLabelLoader:
    """True label maps in preprocessed space, for the oracle judge, judge fitting and the audit.

    Training cases: nnU-Net's preprocessed segmentation. imagesUnlabeled cases: `labelsUnlabeled/<case>` in the raw
    dataset (research setups only), preprocessed like the image. Holds no network: it is sent to scoring workers.
    """

    def __init__(self, model: LoadedModel, location: RunLocation, pool: CasePool):
        self.plans_manager = model.plans_manager
        self.configuration_manager = model.configuration_manager
        self.dataset_json = model.dataset_json
        self.raw_dataset_folder = location.raw_dataset_folder
        self.pool = pool

    def __call__(self, case_id: str) -> Optional[np.ndarray]:
        pool = self.pool
        if pool.preprocessed_folder is not None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            folder = str(pool.preprocessed_folder)
            _, seg, _, _ = infer_dataset_class(folder)(folder, [case_id]).load_case(case_id)
            return np.maximum(np.asarray(seg[:])[0], 0).astype(np.uint8)
        if self.raw_dataset_folder is None:
            return None
        label_file = self.raw_dataset_folder / TRUE_LABELS_FOLDER / f"{case_id}{self.dataset_json['file_ending']}"
        if not label_file.is_file():
            return None
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        _, seg, _ = preprocessor.run_case(
            [str(p) for p in pool.raw_files[case_id]],
            str(label_file),
            self.plans_manager,
            self.configuration_manager,
            self.dataset_json,
        )
        return np.maximum(seg[0], 0).astype(np.uint8)


def foreground_labels(model: LoadedModel) -> tuple[int, ...]:
    return tuple(int(label) for label in model.label_manager.foreground_labels)


def judge_input(
    store: ProposalStore,
    reader: PoolReader,
    case_id: str,
    labels: tuple[int, ...],
    true_labels: Optional[Callable[[str], Optional[np.ndarray]]] = None,
) -> JudgeInput:
    """One case of the store as a judge sees it; the image and the mean probabilities are read only if the judge
    looks at them."""
    return JudgeInput(
        case_id=case_id,
        proposals=store.load_case(case_id)["proposals"],
        labels=labels,
        image=lambda: reader.load(case_id)[0],
        mean_probabilities=lambda: store.load_case(case_id)["mean_probabilities"].astype(np.float32),
        true_labels=true_labels(case_id) if true_labels is not None else None,
        proposal_models=store.member_models(),
    )


def judge_inputs(
    store: ProposalStore,
    reader: PoolReader,
    case_ids: Sequence[str],
    labels: tuple[int, ...],
    true_labels: Optional[Callable[[str], Optional[np.ndarray]]] = None,
) -> Iterator[JudgeInput]:
    for case_id in case_ids:
        yield judge_input(store, reader, case_id, labels, true_labels)


def judge_key(judge: Judge) -> str:
    """The judge's name and options as a file name: its scores, fitted state and pairs are kept under it."""
    options = "_".join(f"{k}-{v}" for k, v in sorted(judge.options().items()))
    key = f"{judge.display_name}{'__' + options if options else ''}"
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in key)


# ------------------------------------------------------------------------------------------------ fitting
class FittingExamples:
    """The labeled examples a judge may ask for (judges.FitExamples), each kind made once, on first request.
    `exclude_case_ids`: labeled cases no judge may learn from (the audit's own cases); `cases_read`: the labeled
    cases handed out so far."""

    def __init__(
        self,
        location: RunLocation,
        model: LoadedModel,
        store: ProposalStore,
        proposal_settings: ProposalSettings,
        device,
        progress: bool = True,
        log: Callable[[str], None] = print,
        exclude_case_ids: Collection[str] = (),
    ):
        self.location, self.model, self.store = location, model, store
        self.proposal_settings, self.device, self.progress, self.log = proposal_settings, device, progress, log
        self.exclude = frozenset(exclude_case_ids)
        self.cases_read: set[str] = set()
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
            true_labels = TrueLabelLoader(self.model, self.location, pool)
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
        cases = self._true_label_maps[with_images]
        self.cases_read.update(case.case_id for case in cases)
        return cases

    def held_out_predictions(self) -> list[JudgeInput]:
        """Honest (proposals, true labels) examples: each fold model's proposals for the labeled cases held out of
        its training (its validation cases), for this model's fold and every sibling fold beside its checkpoint;
        nnU-Net's 5-fold cross-validation gives every labeled case once. Fitted on the model's own training cases
        instead, a judge would learn from memorised cases, where masks are better and more alike than on new
        ones. Members of other models (extra checkpoints, other folds) are left out of these proposals: those
        models may have trained on the case."""
        if self._held_out is None:
            self._held_out = self._make_held_out()
        self.cases_read.update(case.case_id for case in self._held_out)
        return self._held_out

    def _make_held_out(self) -> list[JudgeInput]:
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
            fold_model = model if checkpoint is None else load_model_like(checkpoint, model, self.device)
            folder = self.store.folder.parent / f"{self.store.folder.name}__held_out_fold_{fold}"
            held_out_store, _ = generate_proposals(
                fold_model, pool, folder, settings, device=self.device, progress=self.progress
            )
            reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
            true_labels = TrueLabelLoader(model, location, pool)
            inputs += judge_inputs(held_out_store, reader, pool.case_ids, labels, true_labels)
            used.append(f"fold {fold}: {len(pool.case_ids)}")
        if not inputs:
            raise JudgingError(
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
    own = tuple(name for name in settings.sources if not SOURCES[name].uses_extra_networks)
    single = replace(settings, sources=own or ("tta",), extra_checkpoints=(), other_folds=False)
    available = len(available_members(single, mirror_axes, settings.num_proposals))
    return replace(single, num_proposals=max(2, available))


def fitted_judge_path(store: ProposalStore, judge: Judge) -> Path:
    return store.folder / "judges" / f"{judge_key(judge)}.fitted.pkl"


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
) -> tuple[Judge, Optional[frozenset[str]]]:
    """The judge ready to score, and the labeled cases it learned from (empty for a judge that learns nothing;
    None when a judge restored from an older store did not record them). Restored from beside the store, or, if it
    learns and was not fitted there yet, fitted now on what it asks for and saved there. `exclude_case_ids`:
    labeled cases it must not learn from (the audit's own cases); such a fit is neither restored nor saved."""
    judge = get_judge(spec, **options)
    if not judge.learns:
        return judge, frozenset()
    fitted_file = None if exclude_case_ids else fitted_judge_path(store, judge)
    record = fitted_file.with_suffix(".json") if fitted_file is not None else None
    if fitted_file is not None and fitted_file.is_file():
        learned_from = json.loads(record.read_text())["learned_from"] if record.is_file() else None
        return Judge.load(fitted_file), (frozenset(learned_from) if learned_from is not None else None)
    log(f"fitting {judge.describe()}")
    examples = FittingExamples(location, model, store, proposal_settings, device, progress, log, exclude_case_ids)
    judge.fit_from(examples)
    if fitted_file is not None:
        judge.save(fitted_file)
        save_json({"judge": judge.describe(), "learned_from": sorted(examples.cases_read)}, record)
    return judge, frozenset(examples.cases_read)


# ------------------------------------------------------------------------------------------------ scoring
def scores_folder(store: ProposalStore, judge: Judge) -> Path:
    return store.folder / "judges" / f"{judge_key(judge)}.scores"


def score_store(
    judge: Judge,
    store: ProposalStore,
    reader: PoolReader,
    case_ids: Sequence[str],
    labels: tuple[int, ...],
    true_labels: Optional[Callable[[str], Optional[np.ndarray]]] = None,
    progress: bool = True,
    keep_voxel_probabilities: bool = False,
    workers: int = 1,
) -> dict[str, list[float]]:
    """The judge's scores of `case_ids`, each case written to <store>/judges/<key>.scores/<case>.json and reused
    when that file names the same judge (and, with `keep_voxel_probabilities`, when the case's voxel probabilities
    are there too: `Judge.score_with_voxels`, kept for the `judge_voxels` preference region). `workers` > 1 scores
    the missing cases in that many processes. A case another process is scoring with the same judge (a second
    training on the same store) is left to it and its score read when it is written."""
    if keep_voxel_probabilities and not judge.gives_voxel_probabilities:
        raise ValueError(f"{judge.describe()} has no per-voxel class probabilities of its own to keep")
    if judge.needs_labels and true_labels is None:
        raise JudgingError(f"{judge.describe()} needs true labels; none are available for this pool")
    folder = scores_folder(store, judge)
    key = judge_key(judge)
    scores = {
        case_id: _saved_score(folder, case_id, judge, store, key, keep_voxel_probabilities) for case_id in case_ids
    }
    missing = [case_id for case_id, value in scores.items() if value is None]
    truth = true_labels if judge.needs_labels else None
    task = _CaseScorer(judge, store, reader, labels, truth, keep_voxel_probabilities, folder, key)
    bar = tqdm(total=len(missing), desc=f"judge {judge.display_name}", unit="case", disable=not progress)
    held_elsewhere = missing  # the cases left to the claim loop below: all of them without workers
    if workers > 1 and len(missing) > 1:
        held_elsewhere = []
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(missing)), initializer=_single_threaded) as pool:
            for case_id, case_scores in pool.imap_unordered(task.score_unless_held, missing):
                if case_scores is None:
                    held_elsewhere.append(case_id)
                    continue
                scores[case_id] = case_scores
                bar.update()
    # each case another process holds is waited for and its score read (or taken over when that process died)
    for case_id in each_claimed(held_elsewhere, task.claim_path):
        saved = _saved_score(folder, case_id, judge, store, key, keep_voxel_probabilities)
        scores[case_id] = saved if saved is not None else task(case_id)[1]
        bar.update()
    bar.close()
    return scores


def merge_scores(judge: Judge, store: ProposalStore, case_ids: Sequence[str]) -> dict[str, list[float]]:
    """Every case's score (after all shards were scored) in one file, <store>/judges/<key>.scores.json."""
    folder = scores_folder(store, judge)
    scores = {}
    for case_id in case_ids:
        saved = _saved_score(folder, case_id, judge, store, judge_key(judge), False)
        if saved is None:
            raise JudgingError(f"{judge.describe()}: no score of case {case_id!r} in {folder}")
        scores[case_id] = saved
    save_json(
        {"judge": judge.describe(), "research_only_uses_labels": bool(judge.needs_labels), "scores": scores},
        folder.parent / f"{folder.name}.json",
    )
    return scores


def _saved_score(
    folder: Path, case_id: str, judge: Judge, store: ProposalStore, key: str, with_voxels: bool
) -> Optional[list[float]]:
    path = folder / f"{case_id}.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged file is scored again
    if saved.get("judge") != judge.describe():
        return None
    if with_voxels and not store.voxel_probabilities_path(key, case_id).is_file():
        return None
    return [float(value) for value in saved["scores"]]


class _CaseScorer:
    """Scores one case and writes its file (a picklable callable for the worker processes)."""

    def __init__(self, judge, store, reader, labels, true_labels, keep_voxels, folder, key):
        self.judge, self.store, self.reader, self.labels = judge, store, reader, labels
        self.true_labels, self.keep_voxels, self.folder, self.key = true_labels, keep_voxels, folder, key

    def __call__(self, case_id: str) -> tuple[str, list[float]]:
        case = judge_input(self.store, self.reader, case_id, self.labels, self.true_labels)
        if self.keep_voxels:
            case_scores, probabilities = score_case_with_voxels(self.judge, case)
            self.store.save_voxel_probabilities(self.key, case_id, probabilities)
        else:
            case_scores = score_case(self.judge, case)
        values = [float(value) for value in case_scores]
        save_json({"judge": self.judge.describe(), "scores": values}, self.folder / f"{case_id}.json")
        return case_id, values

    def claim_path(self, case_id: str) -> Path:
        return self.folder / f".{case_id}.claim"

    def score_unless_held(self, case_id: str) -> tuple[str, Optional[list[float]]]:
        """The case's score (read where another process wrote it meanwhile), or None while another process holds
        its claim (a worker does not wait: the caller's claim loop does)."""
        with exclusive_claim(self.claim_path(case_id)) as held:
            if not held:
                return case_id, None
            saved = _saved_score(self.folder, case_id, self.judge, self.store, self.key, self.keep_voxels)
            return (case_id, saved) if saved is not None else self(case_id)


def _single_threaded() -> None:
    """Each scoring worker uses one thread of its own: the workers share the cores."""
    import torch

    torch.set_num_threads(1)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        pass
