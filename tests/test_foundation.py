"""The foundation the other tests stand on: the synthetic dataset, the nnU-Net step wrappers and the fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_rndpo.demo.synthetic import LABELS, make_case, make_synthetic_dataset

NNUNET_CHECKPOINT_KEYS = {
    "network_weights",
    "optimizer_state",
    "grad_scaler_state",
    "logging",
    "_best_ema",
    "current_epoch",
    "init_args",
    "trainer_name",
    "inference_allowed_mirroring_axes",
}


def read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def case_names(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_generator_is_deterministic_per_seed(tmp_path):
    small = dict(num_labeled=2, num_unlabeled=1, num_test=1, shape=(24, 28, 32))
    first = make_synthetic_dataset(tmp_path / "a", dataset_id=990, name="Det", seed=7, **small)
    second = make_synthetic_dataset(tmp_path / "b", dataset_id=990, name="Det", seed=7, **small)
    other = make_synthetic_dataset(tmp_path / "c", dataset_id=990, name="Det", seed=8, **small)

    files = sorted(p.relative_to(first) for p in first.rglob("*.nii.gz"))
    assert len(files) == 2 * (2 + 1 + 1)
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.nii.gz"))
    for relative in files:
        array, image = read(first / relative)
        assert image.GetSize() == (32, 28, 24)  # SimpleITK reports (x, y, z) of a (z, y, x) array
        np.testing.assert_array_equal(array, read(second / relative)[0])
    differing = [not np.array_equal(read(first / r)[0], read(other / r)[0]) for r in files]
    assert all(differing)
    assert json.loads((first / "dataset.json").read_text()) == json.loads((second / "dataset.json").read_text())


def test_make_case_depends_on_seed_and_index_only():
    a = make_case(3, 5, (32, 32, 32))
    b = make_case(3, 5, (32, 32, 32))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(make_case(3, 6, (32, 32, 32)).label, a.label)
    assert a.image.dtype == np.float32 and a.label.dtype == np.uint8


def test_synthetic_dataset_layout(synthetic_dataset):
    folder = synthetic_dataset.raw_folder
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert dataset_json["channel_names"] == {"0": "MRI"}
    assert dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["numTraining"] == synthetic_dataset.num_labeled == 10

    labeled = case_names(folder / "imagesTr", "_0000.nii.gz")
    unlabeled = case_names(folder / "imagesUnlabeled", "_0000.nii.gz")
    test = case_names(folder / "imagesTs", "_0000.nii.gz")
    assert labeled == case_names(folder / "labelsTr", ".nii.gz")  # every training image has its label
    assert unlabeled == case_names(folder / "labelsUnlabeled", ".nii.gz")
    assert test == case_names(folder / "labelsTs", ".nii.gz")
    assert (len(labeled), len(unlabeled), len(test)) == (10, 4, 3)
    assert len(set(labeled) | set(unlabeled) | set(test)) == 17  # names are unique across splits
    assert labeled[0] == "synth_000"

    for images, labels, cases in (
        ("imagesTr", "labelsTr", labeled),
        ("imagesUnlabeled", "labelsUnlabeled", unlabeled),
        ("imagesTs", "labelsTs", test),
    ):
        for case in cases:
            image_array, image = read(folder / images / f"{case}_0000.nii.gz")
            label_array, label = read(folder / labels / f"{case}.nii.gz")
            assert image.GetSize() == label.GetSize() == (40, 40, 40)
            assert image.GetSpacing() == label.GetSpacing() == (1.0, 1.0, 1.0)
            assert image.GetOrigin() == label.GetOrigin()
            assert image.GetDirection() == label.GetDirection()
            assert set(np.unique(label_array)) == {0, 1, 2}, case
            assert np.isfinite(image_array).all()


def test_synthetic_lesion_boundary_is_faint_and_organ_is_clear():
    """The organ stands out from the background; the lesion differs from the organ only slightly."""
    lesion_to_organ, organ_to_background = [], []
    for index in range(8):
        case = make_case(0, index)
        core = {label: case.image[_eroded(case.label == label)].mean() for label in LABELS.values()}
        lesion_to_organ.append(core[2] / core[1])
        organ_to_background.append(core[1] / core[0])
    assert 1.05 < np.mean(lesion_to_organ) < 1.4
    assert min(organ_to_background) > 2.0


def _eroded(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, iterations=1)
    return eroded if eroded.any() else mask


# ---------------------------------------------------------------------------------------------------------------
# nnU-Net steps


@pytest.mark.slow
def test_preprocessed_synthetic(preprocessed_synthetic):
    assert preprocessed_synthetic.name == "Dataset901_RNDPOSynthetic"
    assert preprocessed_synthetic.case_identifiers == tuple(f"synth_{i:03d}" for i in range(10))
    assert (preprocessed_synthetic.preprocessed_folder / "dataset_fingerprint.json").is_file()
    assert len(list((preprocessed_synthetic.preprocessed_folder / "gt_segmentations").glob("*.nii.gz"))) == 10


@pytest.mark.slow
def test_add_configuration_loads_in_plans_manager(preprocessed_synthetic, tiny_configuration):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_rndpo.demo.nnunet_steps import add_configuration

    plans = PlansManager(str(preprocessed_synthetic.plans_file))
    tiny = plans.get_configuration(tiny_configuration)
    fullres = plans.get_configuration("3d_fullres")
    assert tiny.patch_size == [32, 32, 32]
    assert tiny.batch_size == 2
    assert tiny.data_identifier == fullres.data_identifier  # no re-preprocessing
    assert tiny.spacing == fullres.spacing
    kwargs = tiny.network_arch_init_kwargs
    assert kwargs["n_stages"] == 3 and kwargs["features_per_stage"] == [8, 16, 32]
    assert len(kwargs["kernel_sizes"]) == len(kwargs["strides"]) == len(kwargs["n_conv_per_stage"]) == 3
    assert len(kwargs["n_conv_per_stage_decoder"]) == 2
    assert fullres.network_arch_init_kwargs["features_per_stage"] == [32, 64, 128, 256]  # parent unchanged

    with pytest.raises(ValueError, match="divisible"):
        add_configuration(
            preprocessed_synthetic.dataset_id,
            "3d_bad",
            patch_size=(30, 32, 32),
            batch_size=2,
            features_per_stage=(8, 16, 32),
        )
    assert "3d_bad" not in json.loads(preprocessed_synthetic.plans_file.read_text())["configurations"]


def test_in_process_pools_are_threads_and_are_restored():
    import multiprocessing
    from multiprocessing.pool import ThreadPool

    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor

    from nnunet_rndpo.demo.nnunet_steps import PLANNING_POOL_MODULES, in_process_pools

    with in_process_pools(PLANNING_POOL_MODULES):
        with fingerprint_extractor.multiprocessing.get_context("spawn").Pool(1) as pool:
            assert isinstance(pool, ThreadPool)
            assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
    assert fingerprint_extractor.multiprocessing is multiprocessing


@pytest.mark.slow
def test_base_checkpoint_is_a_stock_nnunet_checkpoint(base_checkpoint, preprocessed_synthetic, tiny_configuration):
    import torch

    assert base_checkpoint.is_file()
    assert base_checkpoint.name == "checkpoint_final.pth"
    assert base_checkpoint.parent.name == "fold_0"
    assert base_checkpoint.parent.parent.name == f"nnUNetTrainer__nnUNetPlans__{tiny_configuration}"
    assert base_checkpoint.parents[2] == Path(os.environ["nnUNet_results"]) / preprocessed_synthetic.name

    checkpoint = torch.load(base_checkpoint, map_location="cpu", weights_only=False)
    assert NNUNET_CHECKPOINT_KEYS <= set(checkpoint)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == tiny_configuration
    assert checkpoint["init_args"]["fold"] == 0
    assert checkpoint["current_epoch"] == 2
    assert len(checkpoint["logging"]["train_losses"]) == 2
    first_conv = next(v for k, v in checkpoint["network_weights"].items() if k.endswith("conv.weight"))
    assert tuple(first_conv.shape) == (8, 1, 3, 3, 3)  # 8 features, 1 input channel: the tiny network


@pytest.mark.slow
def test_predict_and_evaluate_test_cases(base_checkpoint, synthetic_dataset, tmp_path):
    from nnunet_rndpo.demo.nnunet_steps import evaluate_folder, predict_folder

    output = predict_folder(base_checkpoint.parent, synthetic_dataset.raw_folder / "imagesTs", tmp_path / "pred")
    predicted = case_names(output, ".nii.gz")
    assert predicted == case_names(synthetic_dataset.raw_folder / "labelsTs", ".nii.gz")
    for case in predicted:
        array, image = read(output / f"{case}.nii.gz")
        reference = sitk.ReadImage(str(synthetic_dataset.raw_folder / "labelsTs" / f"{case}.nii.gz"))
        assert image.GetSize() == reference.GetSize() and image.GetSpacing() == reference.GetSpacing()
        assert set(np.unique(array)) <= {0, 1, 2}

    result = evaluate_folder(output, synthetic_dataset.raw_folder / "labelsTs", synthetic_dataset.labels)
    assert result["num_cases"] == 3 and result["labels"] == [1, 2]
    assert all(0.0 <= d <= 1.0 for scores in result["per_case"].values() for d in scores.values())
    assert result["foreground_mean"] == pytest.approx(np.mean(list(result["mean"].values())))

    # evaluate_checkpoint: one checkpoint as predict_folder scores it; an ensemble of two copies of it averages equal
    # logits, so it scores the same, to the digit
    from nnunet_rndpo.demo.nnunet_steps import evaluate_checkpoint

    single = evaluate_checkpoint(base_checkpoint, synthetic_dataset.raw_folder, tmp_path / "single")
    assert single["per_case"] == result["per_case"]
    twice = evaluate_checkpoint([base_checkpoint] * 2, synthetic_dataset.raw_folder, tmp_path / "twice")
    assert twice["per_case"] == single["per_case"]


def test_evaluate_folder_on_hand_made_maps(tmp_path):
    from nnunet_rndpo.demo.nnunet_steps import evaluate_folder

    reference = np.zeros((4, 4, 4), dtype=np.uint8)
    reference[0, :2, :4] = 1  # 8 voxels of class 1
    prediction = np.zeros_like(reference)
    prediction[0, :1, :4] = 1  # 4 of them ...
    prediction[3, :1, :4] = 1  # ... and 4 wrong ones: Dice 2*4 / (8 + 8) = 0.5
    empty = np.zeros_like(reference)
    for folder, arrays in (("ref", (reference, reference)), ("pred", (prediction, empty))):
        (tmp_path / folder).mkdir()
        for case, array in zip(("a", "b"), arrays):
            # Labels stored as float32, as some real label files are.
            sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(tmp_path / folder / f"{case}.nii.gz"))

    result = evaluate_folder(tmp_path / "pred", tmp_path / "ref", {"background": 0, "one": 1, "two": 2})
    assert result["per_case"]["a"] == {1: 0.5, 2: 1.0}  # class 2 absent from both maps: agreement
    assert result["per_case"]["b"] == {1: 0.0, 2: 1.0}
    assert result["mean"] == {1: 0.25, 2: 1.0}
    assert result["foreground_mean"] == pytest.approx(0.625)
    identical = evaluate_folder(tmp_path / "ref", tmp_path / "ref", [1, 2])
    assert identical["foreground_mean"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Real data


@pytest.mark.slow
def test_hippocampus_fixture_preprocesses_five_cases(hippocampus_dataset):
    assert hippocampus_dataset.name == "Dataset904_Hippocampus5"
    assert len(hippocampus_dataset.case_identifiers) == 5
    assert all(case.startswith("hippocampus_") for case in hippocampus_dataset.case_identifiers)
    assert len(list(hippocampus_dataset.data_folder.glob("*_seg.b2nd"))) == 5
    assert (hippocampus_dataset.preprocessed_folder / "dataset_fingerprint.json").is_file()
    fingerprint = json.loads((hippocampus_dataset.preprocessed_folder / "dataset_fingerprint.json").read_text())
    assert len(fingerprint["spacings"]) == 5
    dataset_json = json.loads((hippocampus_dataset.raw_folder / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 5
    assert dataset_json["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert "CC-BY-SA" in dataset_json["licence"] and "Decathlon" in dataset_json["reference"]
    # A copy, never a link into the read-only shared folder.
    assert not any(p.is_symlink() for p in hippocampus_dataset.raw_folder.rglob("*"))


@pytest.mark.slow
def test_an_interrupted_training_goes_on_from_its_latest_checkpoint(preprocessed_synthetic, tiny_configuration):
    """train_supervised(resume=True) continues a fold from checkpoint_latest.pth, as nnUNetv2_train --c does (what
    lets a benchmark's hours-long base survive the end of a session), and does not train a finished fold again."""
    import shutil

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_rndpo.demo import nnunet_steps

    first_draws = []  # each start's first number of NumPy's generator, which nnU-Net's patch sampling draws from

    def run_training(trainer):
        first_draws.append(np.random.random())
        nnUNetTrainer.run_training(trainer)

    trainer_class = type("ResumedTrainer", (nnUNetTrainer,), {"__module__": __name__, "run_training": run_training})
    schedule = dict(iterations_per_epoch=2, val_iterations=1, device="cpu", trainer_class=trainer_class, seed=0)
    dataset = preprocessed_synthetic.dataset_id
    folder = nnunet_steps.train_supervised(dataset, tiny_configuration, 0, num_epochs=1, save_every=1, **schedule)
    try:
        # as if the process had died after epoch 0 of a 2-epoch run: only the latest checkpoint is there
        (folder / "checkpoint_final.pth").rename(folder / "checkpoint_latest.pth")
        for log in folder.glob("training_log_*.txt"):
            log.unlink()
        nnunet_steps.train_supervised(dataset, tiny_configuration, 0, num_epochs=2, resume=True, **schedule)
        final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert final["current_epoch"] == 2
        log = "".join(path.read_text() for path in folder.glob("training_log_*.txt"))
        assert "Epoch 1" in log and "Epoch 0" not in log
        # the resumed start draws the stream of epoch 1, not again the one its first start drew
        np.random.seed(nnunet_steps.resumed_seed(0, 1))
        assert first_draws[1] == np.random.random() != first_draws[0]
        written = (folder / "checkpoint_final.pth").stat().st_mtime_ns
        nnunet_steps.train_supervised(dataset, tiny_configuration, 0, num_epochs=2, resume=True, **schedule)
        assert (folder / "checkpoint_final.pth").stat().st_mtime_ns == written  # finished: not trained again
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
