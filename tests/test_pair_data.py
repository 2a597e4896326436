"""Pairs through nnU-Net's own data loader and augmentation: masks stay aligned with the image, deep
supervision gets both masks at every scale, and patches favour the disagreement region."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_rndpo.training.pair_data import LOCATIONS_KEY, PairDataset, TrainingItem, sample_locations

SHAPE = (48, 48, 48)


class FakeStore:
    """Two proposals: a cube (chosen) and the same cube grown by 2 voxels on one side (rejected)."""

    def __init__(self):
        chosen = np.zeros(SHAPE, np.uint8)
        chosen[16:32, 16:32, 16:32] = 1
        rejected = chosen.copy()
        rejected[16:32, 16:32, 32:34] = 1
        self.proposals = np.stack([chosen, rejected])

    def load_case(self, case_id):
        return {"proposals": self.proposals}


class FakeReader:
    """The image is the chosen mask itself (plus a constant), so alignment can be read off the batch."""

    def __init__(self, store):
        self.image = store.proposals[0][None].astype(np.float32) * 2.0 + 1.0
        self.outside = np.zeros((1, *SHAPE), np.int8)

    def load(self, case_id):
        return self.image, self.outside, {}


def make_loader(oversample: float, transforms=None, patch=(32, 32, 32), initial=(32, 32, 32)):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 1)], store, FakeReader(store))
    labels = LabelManager({"background": 0, "thing": 1}, regions_class_order=None)
    return nnUNetDataLoader(
        dataset, 2, initial, patch, labels, oversample_foreground_percent=oversample, transforms=transforms
    )


def test_sample_locations_has_nnunets_layout():
    region = np.zeros((4, 4, 4), bool)
    region[1, 2, 3] = True
    locations = sample_locations(region, np.random.default_rng(0))
    assert locations.tolist() == [[0, 1, 2, 3]]  # leading channel index, as nnU-Net stores class_locations


def test_load_case_gives_two_mask_channels_and_disagreement_locations():
    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 1)], store, FakeReader(store))
    data, seg, seg_prev, properties = dataset.load_case("case::0>1")
    assert seg.shape == (2, *SHAPE) and seg_prev is None
    assert (seg[0] == store.proposals[0]).all() and (seg[1] == store.proposals[1]).all()
    coordinates = properties["class_locations"][LOCATIONS_KEY][:, 1:]
    assert len(coordinates) == 16 * 16 * 2
    assert all(store.proposals[0][tuple(c)] != store.proposals[1][tuple(c)] for c in coordinates)


def test_no_items_is_a_clear_error():
    store = FakeStore()
    with pytest.raises(ValueError, match="no preference pair"):
        PairDataset([], store, FakeReader(store))


def test_forced_patches_contain_the_disagreement_region():
    torch.manual_seed(0)
    np.random.seed(0)
    loader = make_loader(oversample=1.0)
    for _ in range(10):
        batch = loader.generate_train_batch()
        target = batch["target"]
        assert target.shape == (2, 2, 32, 32, 32)
        for sample in target:
            assert (sample[0] != sample[1]).any(), "a forced patch must hold disagreeing voxels"


def test_masks_stay_aligned_with_the_image_through_nnunets_augmentation():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    np.random.seed(1)
    torch.manual_seed(1)
    patch = (32, 32, 32)
    scales = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    transforms = nnUNetTrainer.get_training_transforms(
        patch,
        (-0.5, 0.5),
        scales,
        (0, 1, 2),
        False,
        use_mask_for_norm=[False],
        is_cascaded=False,
        foreground_labels=[1],
        regions=None,
        ignore_label=None,
    )
    loader = make_loader(oversample=1.0, transforms=transforms, patch=patch, initial=(44, 44, 44))
    for _ in range(5):
        batch = loader.generate_train_batch()
        targets = batch["target"]
        assert [tuple(t.shape) for t in targets] == [(2, 2, 32, 32, 32), (2, 2, 16, 16, 16), (2, 2, 8, 8, 8)]
        for data, chosen in zip(batch["data"], targets[0][:, 0]):
            inside = chosen > 0
            if inside.sum() < 50 or (~inside).sum() < 50:
                continue
            # the image is bright where the chosen mask is: intensity augmentation changes values, not places
            assert data[0][inside].mean() > data[0][~inside].mean()
        # the rejected mask only ever adds voxels to the chosen one (as built), at every scale
        for target in targets:
            assert ((target[:, 0] > 0) <= (target[:, 1] > 0)).all()


def test_single_mask_gives_nnunets_one_channel_layout():
    """Self-training: the chosen mask alone, as nnU-Net's supervised loader gives a label map."""
    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 0)], store, FakeReader(store), single_mask=True)
    data, seg, _, properties = dataset.load_case("case::0>0")
    assert seg.shape == (1, *SHAPE) and (seg[0] == store.proposals[0]).all()
    # patches centre on the chosen mask's foreground
    coordinates = properties["class_locations"][LOCATIONS_KEY][:, 1:]
    assert len(coordinates) and all(store.proposals[0][tuple(c)] == 1 for c in coordinates)


def test_disagreement_sampling_means_the_fraction_of_patches_it_names():
    # nnU-Net's default rule forces the last round(batch * p) patches: with batch 2, p = 0.67 forced one of two
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_rndpo.training.pair_data import pair_loader

    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 1)], store, FakeReader(store))
    labels = LabelManager({"background": 0, "thing": 1}, regions_class_order=None)
    np.random.seed(0)
    for fraction in (0.33, 0.67, 0.9):
        loader = pair_loader(dataset, 2, (32, 32, 32), (32, 32, 32), labels, fraction, None)
        forced = [loader.get_do_oversample(index % 2) for index in range(4000)]
        assert np.mean(forced) == pytest.approx(fraction, abs=0.03)


def test_a_dataset_with_an_ignore_label_gives_batches():
    # nnU-Net's loader looks unforced patches up under its annotated-classes key when an ignore label exists
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_rndpo.training.pair_data import annotated_key, pair_loader

    labels = LabelManager({"background": 0, "thing": 1, "ignore": 2}, regions_class_order=None)
    store = FakeStore()
    dataset = PairDataset([TrainingItem("case", 0, 1)], store, FakeReader(store), annotated_key=annotated_key(labels))
    np.random.seed(0)
    loader = pair_loader(dataset, 2, (32, 32, 32), (32, 32, 32), labels, 0.5, None)
    for _ in range(5):
        batch = loader.generate_train_batch()
        assert batch["target"].shape == (2, 2, 32, 32, 32)
    assert annotated_key(LabelManager({"background": 0, "thing": 1}, regions_class_order=None)) is None
