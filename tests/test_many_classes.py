"""Many classes and an ignore label through the whole path: proposals, judges, pairs and training; and a region-based
dataset refused at start with the dataset.json key named (not a failure deep in a loss).

The dataset is the session's synthetic one relabelled: the organ cut into 11 slabs along the first axis (classes
1-11), the lesion class 12, and nnU-Net's ignore label (13, named "ignore") on the labeled cases' outermost slices,
where the annotator "did not annotate". nnU-Net plans, preprocesses and trains it as any dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

SLABS = 11
LESION = SLABS + 1
IGNORE = SLABS + 2
DATASET_ID = 907
CONFIGURATION = "3d_tiny"


def relabel(label: np.ndarray, with_ignore: bool) -> np.ndarray:
    """Organ voxels -> 1 + their slab along axis 0 (11 slabs), lesion -> 12, the outermost slices -> ignore."""
    slab = np.minimum((np.arange(label.shape[0]) * SLABS) // label.shape[0], SLABS - 1) + 1
    out = np.zeros(label.shape, np.uint8)
    organ = label == 1
    out[organ] = np.broadcast_to(slab[:, None, None], label.shape)[organ]
    out[label == 2] = LESION
    if with_ignore:
        out[:2] = IGNORE
        out[-2:] = IGNORE
    return out


@pytest.fixture(scope="module")
def many_classes(preprocessed_synthetic, synthetic_dataset):
    """Dataset907: the synthetic cases with 12 foreground classes and an ignore label, planned, preprocessed, a tiny
    configuration and a base trained a few iterations."""
    import SimpleITK as sitk

    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.nnunet_paths import trainer_output_folder

    source = synthetic_dataset.raw_folder
    target = Path(os.environ["nnUNet_raw"]) / f"Dataset{DATASET_ID}_ManyClasses"
    shutil.rmtree(target, ignore_errors=True)
    for folder in ("imagesTr", "imagesUnlabeled", "imagesTs"):
        shutil.copytree(source / folder, target / folder)
    for folder, with_ignore in (("labelsTr", True), ("labelsUnlabeled", False), ("labelsTs", False)):
        (target / folder).mkdir(parents=True)
        for path in sorted((source / folder).glob("*.nii.gz")):
            image = sitk.ReadImage(str(path))
            relabelled = sitk.GetImageFromArray(relabel(sitk.GetArrayFromImage(image), with_ignore))
            relabelled.CopyInformation(image)
            sitk.WriteImage(relabelled, str(target / folder / path.name))
    dataset_json = json.loads((source / "dataset.json").read_text())
    labels = {"background": 0, **{f"slab_{i}": i for i in range(1, SLABS + 1)}, "lesion": LESION, "ignore": IGNORE}
    (target / "dataset.json").write_text(json.dumps({**dataset_json, "labels": labels}))
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / target.name
    shutil.rmtree(preprocessed, ignore_errors=True)
    nnunet_steps.plan_and_preprocess(DATASET_ID, configurations=("3d_fullres",), num_processes=1)
    nnunet_steps.add_configuration(
        DATASET_ID, CONFIGURATION, patch_size=(32, 32, 32), batch_size=2, features_per_stage=(8, 16, 32)
    )
    shutil.rmtree(trainer_output_folder(DATASET_ID, CONFIGURATION, 0), ignore_errors=True)
    fold = nnunet_steps.train_supervised(
        DATASET_ID, CONFIGURATION, 0, num_epochs=2, iterations_per_epoch=10, val_iterations=2, seed=0, device="cpu"
    )
    yield fold / "checkpoint_final.pth"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(preprocessed, ignore_errors=True)
    shutil.rmtree(fold.parent, ignore_errors=True)


def test_relabel_gives_eleven_slabs_a_lesion_and_an_ignore_band():
    label = np.zeros((22, 6, 6), np.uint8)
    label[:, 1:5, 1:5] = 1
    label[10, 2, 2] = 2
    out = relabel(label, with_ignore=True)
    assert set(np.unique(out[2:-2])) == {0, *range(1, SLABS + 1), LESION} - {1, SLABS}  # slabs 1 and 11 lie under
    assert (out[:2] == IGNORE).all() and (out[-2:] == IGNORE).all()


@pytest.mark.slow
def test_twelve_classes_and_an_ignore_label_through_proposals_judges_pairs_and_training(
    many_classes, tmp_path, monkeypatch
):
    from nnunet_rndpo.judging import score_store
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.pairs import PairSettings
    from nnunet_rndpo.pipeline import prepare_pairs
    from nnunet_rndpo.proposals.model import load_model
    from nnunet_rndpo.proposals.plan import ProposalSettings
    from nnunet_rndpo.proposals.pool import PoolReader
    from nnunet_rndpo.training import trainers
    from nnunet_rndpo.training.settings import SETTINGS_ENV_VARIABLE, PreferenceSettings

    location = locate(DATASET_ID, CONFIGURATION, 0)
    model = load_model(many_classes)
    label_manager = model.label_manager
    assert label_manager.has_ignore_label and label_manager.ignore_label == IGNORE
    assert label_manager.num_segmentation_heads == LESION + 1  # background and 12 classes, no head for ignore
    prepared = prepare_pairs(
        location,
        model,
        PairSettings.from_run_settings(PreferenceSettings(), proposals=ProposalSettings(num_proposals=4)),
        store_folder=tmp_path / "store",
        log=lambda message: None,
        progress=False,
    )
    store = prepared.store
    case = store.load_case(prepared.pool.case_ids[0])
    assert case["proposals"].shape[0] == 4 and case["proposals"].max() <= LESION  # the ignore label is never proposed
    assert case["mean_probabilities"].shape[0] == LESION + 1
    assert prepared.items, "12-class proposals should give pairs"
    # every label-free judge scores the 12 classes (the atlas registers labeled cases whose maps hold the ignore label)
    reader = PoolReader(prepared.pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    labels = tuple(range(1, LESION + 1))
    from nnunet_rndpo.judges import get_judge
    from nnunet_rndpo.judging import FittingExamples

    examples = FittingExamples(location, model, store, ProposalSettings(num_proposals=4), "cpu", False, print)
    for name, options in (
        ("agreement", {}),
        ("uncertainty", {}),
        ("virtual_annotator", {}),
        ("anatomy", {}),
        ("atlas", {"registration": "affine", "max_atlases": 2}),
    ):
        judge = get_judge(name, **options)
        judge.fit_from(examples)
        scores = score_store(judge, store, reader, prepared.pool.case_ids, labels, progress=False)
        assert all(len(s) == 4 and np.all(np.isfinite(s)) for s in scores.values()), name
    # and RN-DPO trains on the pairs: finite losses, statistics, the frozen reference untouched
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "num_epochs": 1,
                "iterations_per_epoch": 3,
                "val_iterations_per_epoch": 1,
                "recipe": "none",
                "proposal_store": str(tmp_path / "store"),
                "proposals": {"num_proposals": 4},
            }
        )
    )
    monkeypatch.setenv(SETTINGS_ENV_VARIABLE, str(settings))

    class ManyClassesRNDPO(trainers.nnUNetTrainerRNDPO):
        pass

    plans = json.loads((location.preprocessed_base / "nnUNetPlans.json").read_text())
    trainer = ManyClassesRNDPO(
        {**plans, "continue_training": False}, CONFIGURATION, 0, location.dataset_json, torch.device("cpu")
    )
    trainer.run_training()
    history = trainer.statistics.history
    assert len(history["rewards/margins"]) == 1 and np.isfinite(history["preference_loss"]).all()
    assert (Path(trainer.output_folder) / "checkpoint_final.pth").is_file()


@pytest.mark.slow
def test_a_region_based_dataset_is_refused_at_start_naming_the_key(preprocessed_synthetic, tiny_configuration):
    from nnunet_rndpo.training import trainers

    plans = json.loads(preprocessed_synthetic.plans_file.read_text())
    dataset_json = json.loads((preprocessed_synthetic.preprocessed_folder / "dataset.json").read_text())
    region_based = {
        **dataset_json,
        "labels": {"background": 0, "whole": [1, 2], "lesion": 2},
        "regions_class_order": [1, 2],
    }
    with pytest.raises(
        ValueError,
        match=r"region-based: dataset.json 'labels' define regions .*\"whole\": \[1, 2\].*'regions_class_order'",
    ):
        trainers.nnUNetTrainerRNDPO(
            {**plans, "continue_training": False}, tiny_configuration, 0, region_based, torch.device("cpu")
        )
