"""Fill a proposal store for a pool: load the model once, preprocess each case once, K proposals per case,
optional NIfTI export once per case. Used by `nnunet_rndpo propose` and by the trainers' start."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_rndpo.atomic import atomic_path, each_claimed
from nnunet_rndpo.nnunet_paths import sibling_fold_checkpoints
from nnunet_rndpo.proposals.engine import DROPOUT_DRAWS, ProposalEngine
from nnunet_rndpo.proposals.model import LoadedModel, file_sha256, load_model_like
from nnunet_rndpo.proposals.plan import ProposalSettings, case_seed, plan_members
from nnunet_rndpo.proposals.pool import CasePool, PoolReader
from nnunet_rndpo.proposals.sharing import find_donors
from nnunet_rndpo.proposals.store import ProposalStore, StoreError


@dataclass
class GenerationSummary:
    cases_in_part: int
    cases_generated: int
    cases_reused: int
    proposals_per_case: int
    seconds: float
    cases_copied: int = 0  # taken from a sibling store of the same passes (nnunet_rndpo/proposals/sharing.py)

    @property
    def seconds_per_generated_case(self) -> float:
        return self.seconds / self.cases_generated if self.cases_generated else 0.0

    def describe(self) -> str:
        copied = f", {self.cases_copied} copied from a store of the same passes" if self.cases_copied else ""
        return (
            f"{self.cases_in_part} cases ({self.cases_generated} generated, {self.cases_reused} already in the store"
            f"{copied}), "
            f"{self.proposals_per_case} proposals each, {self.seconds:.1f} s "
            f"({self.seconds_per_generated_case:.2f} s per generated case)"
        )


def with_other_folds(settings: ProposalSettings, checkpoint_path: Path) -> ProposalSettings:
    """`other_folds`: the base's sibling fold checkpoints appended to extra_checkpoints (idempotent)."""
    if not settings.other_folds:
        return settings
    siblings = [str(path) for path in sibling_fold_checkpoints(checkpoint_path)]
    if not siblings:
        raise ValueError(
            f"other_folds: no other fold's {Path(checkpoint_path).name} beside {checkpoint_path}; "
            "train the other folds (nnUNetv2_train D C 1 ... 4) or drop other_folds"
        )
    missing = [path for path in siblings if path not in settings.extra_checkpoints]
    return replace(settings, extra_checkpoints=tuple(settings.extra_checkpoints) + tuple(missing))


def store_manifest(model: LoadedModel, settings: ProposalSettings, pool: CasePool) -> dict:
    settings = with_other_folds(settings, model.checkpoint_path)
    members = plan_members(settings, model.proposal_mirror_axes)
    # the extra networks' files, not only their paths: a sibling fold retrained in place makes other proposals
    extra_sha256 = [file_sha256(path) for path in settings.extra_checkpoints] if settings.uses_extra_networks else []
    manifest = {
        "dataset": model.plans["dataset_name"],
        "plans": model.plans["plans_name"],
        "configuration": model.configuration,
        "fold": model.fold,
        "checkpoint": str(model.checkpoint_path),
        "checkpoint_sha256": model.checkpoint_sha256,
        "extra_checkpoints_sha256": list(extra_sha256),
        "settings": settings.to_dict(),
        "members": [m.to_dict() for m in members],
        "labels": model.dataset_json["labels"],
        "pool_source": pool.source,
    }
    if any(member.dropout_p > 0 for member in members):
        manifest["dropout_draws"] = DROPOUT_DRAWS
    return manifest


def load_extra_networks(model: LoadedModel, settings: ProposalSettings, device) -> list[torch.nn.Module]:
    networks = []
    if settings.uses_extra_networks:
        for path in settings.extra_checkpoints:
            networks.append(load_model_like(path, model, device).network)
    return networks


def generate_proposals(
    model: LoadedModel,
    pool: CasePool,
    store_folder: Path,
    settings: ProposalSettings,
    *,
    device: torch.device | str = "cpu",
    part_id: int = 0,
    num_parts: int = 1,
    overwrite: bool = False,
    export_nifti: Optional[Path] = None,
    progress: bool = True,
    case_ids: Optional[Sequence[str]] = None,
) -> tuple[ProposalStore, GenerationSummary]:
    """Fill `store_folder` with K proposals for this part of the pool; finished cases are reused."""
    settings = with_other_folds(settings, model.checkpoint_path)
    extra_networks = load_extra_networks(model, settings, device)
    my_cases = list(case_ids) if case_ids is not None else pool.shard(part_id, num_parts)
    # only this part's stale temporaries are removed: other parts may be writing theirs right now
    store = ProposalStore(store_folder).open(
        store_manifest(model, settings, pool), overwrite=overwrite, case_ids=my_cases
    )
    engine = ProposalEngine(
        [model.network, *extra_networks],
        model.plans_manager,
        model.configuration_manager,
        model.label_manager,
        model.dataset_json,
        settings,
        model.mirror_axes,
        device,
    )
    reader = PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    donors = [(ProposalStore(folder), order) for folder, order in find_donors(store.folder, store.manifest())]
    started = time.perf_counter()
    generated = reused = copied = 0
    with tqdm(total=len(my_cases), desc="proposals", unit="case", disable=not progress) as bar:
        # a case another process is generating (a second training on the same base and pool) is left to it
        for case_id in each_claimed(my_cases, store.claim_path):
            if store.has_case(case_id):
                reused += 1
                if export_nifti is None:
                    bar.update()
                    continue
                proposals = store.load_proposals(case_id)
            elif (proposals := copy_from_donor(store, donors, case_id)) is not None:
                copied += 1
            else:
                result = engine.generate(reader.load(case_id)[0], case_seed(settings.seed, case_id))
                store.save_case(case_id, result.proposals, result.mean_probabilities, result.case_seed)
                proposals = result.proposals
                generated += 1
            if export_nifti is not None:
                export_case_nifti(proposals, reader.load(case_id)[2], model, Path(export_nifti), case_id)
            bar.update()
    seconds = time.perf_counter() - started
    summary = GenerationSummary(len(my_cases), generated, reused, engine.num_proposals, seconds, copied)
    return store, summary


def copy_from_donor(store: ProposalStore, donors: list, case_id: str) -> Optional[np.ndarray]:
    """The case's proposals taken from the first donor store that has it (its members put in this store's order),
    saved into `store`; None when no donor has it."""
    for donor, order in donors:
        if not donor.has_case(case_id):
            continue
        try:
            case = donor.load_case(case_id)
        except StoreError:
            continue  # a damaged donor case: computed here instead
        proposals = np.ascontiguousarray(case["proposals"][order])
        store.save_case(case_id, proposals, case["mean_probabilities"], int(case["case_seed"]))
        return proposals
    return None


def export_case_nifti(
    proposals: np.ndarray, properties: dict, model: LoadedModel, folder: Path, case_id: str
) -> list[Path]:
    """Write each proposal in the original image geometry (nnU-Net's own revert of crop/resample/transpose)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    folder.mkdir(parents=True, exist_ok=True)
    plans_manager, configuration_manager, label_manager = (
        model.plans_manager,
        model.configuration_manager,
        model.label_manager,
    )
    writer = plans_manager.image_reader_writer_class()
    ending = model.dataset_json["file_ending"]
    written = []
    for index, proposal in enumerate(proposals):
        one_hot = np.eye(label_manager.num_segmentation_heads, dtype=np.float32)[proposal.astype(np.int64)]
        one_hot = np.moveaxis(one_hot, -1, 0)
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            torch.from_numpy(one_hot),
            plans_manager,
            configuration_manager,
            label_manager,
            properties,
            num_threads_torch=1,
        )
        target = folder / f"{case_id}_proposal{index:02d}{ending}"
        with atomic_path(target) as temporary:
            # the writer picks its format from the name ending, so write beside the temporary with that ending
            staged = temporary.with_name(temporary.name + ending)
            writer.write_seg(segmentation, str(staged), properties)
            staged.replace(temporary)
        written.append(target)
    return written
