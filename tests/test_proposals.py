"""Proposal engine, MC-dropout hooks, member planning, the proposal store, the pool and `nnunet_rndpo propose`.

Fast tests build their own small inputs; the `slow` ones use the session's base checkpoint (3d_tiny, patch 32^3)
on the synthetic dataset. Network passes are kept few: most engine checks run on a single 32^3 tile, and the
store/CLI checks use K=2 (plain + one mirror member).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_rndpo.proposals.dropout import RowDropout, dropout_hooks, dropout_target_modules
from nnunet_rndpo.proposals.members import ProposalMember
from nnunet_rndpo.proposals.model import CheckpointError, load_model, read_checkpoint
from nnunet_rndpo.proposals.plan import ProposalSettings, case_seed, plan_members
from nnunet_rndpo.proposals.pool import CasePool, PoolError, discover_pool
from nnunet_rndpo.proposals.sources import flip_combinations, needs_forward
from nnunet_rndpo.proposals.store import ProposalStore, StoreError

ALL_AXES = (0, 1, 2)


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The machine's 2 cores are shared: one thread is steadier (see conftest's TRAINING_THREADS).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_unet() -> torch.nn.Module:
    """A 3-stage PlainConvUNet (the architecture nnU-Net builds), small enough for fast tests."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    network = PlainConvUNet(
        input_channels=1,
        n_stages=3,
        features_per_stage=(4, 8, 16),
        conv_op=torch.nn.Conv3d,
        kernel_sizes=3,
        strides=(1, 2, 2),
        n_conv_per_stage=1,
        num_classes=3,
        n_conv_per_stage_decoder=1,
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )
    return network.eval()


def fake_manifest(**changes) -> dict:
    settings = ProposalSettings(num_proposals=3)
    manifest = {
        "dataset": "Dataset999_Fake",
        "plans": "nnUNetPlans",
        "configuration": "3d_fullres",
        "fold": 0,
        "checkpoint": "/models/checkpoint_final.pth",
        "checkpoint_sha256": "a" * 64,
        "settings": settings.to_dict(),
        "members": [m.to_dict() for m in plan_members(settings, ALL_AXES)],
    }
    manifest.update(changes)
    return manifest


def fake_case(seed: int, k: int = 3, shape=(4, 5, 6)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, (k, *shape), dtype=np.uint8), rng.random((3, *shape)).astype(np.float16)


def write_dataset_json(folder: Path, channels: int = 1) -> dict:
    dataset_json = {
        "channel_names": {str(c): f"ch{c}" for c in range(channels)},
        "labels": {"background": 0, "organ": 1},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return dataset_json


def label_mismatch_outside_ties(labels: np.ndarray, logits: torch.Tensor, tolerance: float = 1e-4) -> int:
    """Voxels where `labels` differ from argmax(logits) although the two best logits are not (almost) tied.

    Batched and single passes round differently, so a near-tie may legitimately flip; anything else is a bug.
    """
    logits = logits.float()
    expected = logits.argmax(0).numpy()
    top2 = torch.topk(logits, 2, dim=0).values
    tied = (top2[0] - top2[1]).numpy() < tolerance
    return int(np.count_nonzero((labels != expected) & ~tied))


# ------------------------------------------------------------------------------------------------ member planning
def test_plan_members_plain_first_then_round_robin():
    settings = ProposalSettings(num_proposals=6, sources=("tta", "dropout"), dropout_p=0.1)
    members = plan_members(settings, ALL_AXES)
    assert members[0] == ProposalMember("plain")
    assert [m.source for m in members] == ["plain", "tta", "dropout", "tta", "dropout", "tta"]
    # TTA members walk through the flip combinations in order; dropout draws are numbered
    assert [m.flip_axes for m in members if m.source == "tta"] == [(0,), (1,), (2,)]
    assert [m.sample_index for m in members if m.source == "dropout"] == [0, 1]
    assert all(m.dropout_p == 0.1 for m in members if m.source == "dropout")


def test_plan_members_tta_alone_gives_at_most_eight():
    assert len(flip_combinations(ALL_AXES)) == 7
    assert len(plan_members(ProposalSettings(num_proposals=8, sources=("tta",)), ALL_AXES)) == 8
    with pytest.raises(ValueError, match=r"at most 8 proposals.*num_proposals=9"):
        plan_members(ProposalSettings(num_proposals=9, sources=("tta",)), ALL_AXES)
    # a network allowing mirroring on two axes only has 3 flips
    with pytest.raises(ValueError, match=r"at most 4 proposals"):
        plan_members(ProposalSettings(num_proposals=5, sources=("tta",)), (1, 2))
    # an exhausted source stops contributing; a stochastic one fills up
    sources = [m.source for m in plan_members(ProposalSettings(num_proposals=18, sources=("tta", "dropout")), ALL_AXES)]
    assert sources[1:15] == ["tta", "dropout"] * 7 and sources[15:] == ["dropout"] * 3


def test_case_seed_is_stable_and_case_specific():
    assert case_seed(0, "synth_010") == case_seed(0, "synth_010")
    assert len({case_seed(0, "synth_010"), case_seed(0, "synth_011"), case_seed(1, "synth_010")}) == 3
    # a fixed value: Python's salted hash() would change between processes
    assert case_seed(0, "a") == int.from_bytes(hashlib.sha256(b"0:a").digest()[:4], "little")


# ------------------------------------------------------------------------------------------------ dropout hooks
def test_dropout_hooks_keep_weights_and_touch_only_rows_with_a_rate():
    network = tiny_unet()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    x = torch.randn(1, 1, 16, 16, 16).repeat(3, 1, 1, 1, 1)
    with torch.no_grad():
        reference = network(x)
        with dropout_hooks(network, "all", "element") as hooks:
            # the weights keep their names and values: a checkpoint saved without dropout loads strictly
            assert network.state_dict().keys() == before.keys()
            network.load_state_dict(before, strict=True)
            assert len(hooks) == 1 + len(network.decoder.stages)
            for hook in hooks:
                hook.rates = [0.0, 0.5, 0.0]
                hook.generators = [None, torch.Generator().manual_seed(0), None]
            assert not network.training  # eval mode, and dropout still acts (it does not use the training flag)
            dropped = network(x)
        after = network(x)
    assert torch.equal(dropped[0], reference[0]) and torch.equal(dropped[2], reference[2])
    assert not torch.allclose(dropped[1], reference[1])
    # hooks are gone after the block: same output as before, no hook left on any module
    assert torch.equal(after, reference)
    assert all(not module._forward_hooks for module in network.modules())
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_dropout_hooks_are_removed_when_the_block_fails():
    network = tiny_unet()
    with pytest.raises(RuntimeError, match="boom"):
        with dropout_hooks(network, "decoder", "channel"):
            assert any(module._forward_hooks for module in network.modules())
            raise RuntimeError("boom")
    assert all(not module._forward_hooks for module in network.modules())


def test_dropout_targets_and_channel_mode():
    network = tiny_unet()
    assert dropout_target_modules(network, "bottleneck") == [network.encoder.stages[-1]]
    assert dropout_target_modules(network, "decoder") == list(network.decoder.stages)
    with pytest.raises(ValueError, match="unknown dropout location"):
        dropout_target_modules(network, "head")
    with pytest.raises(ValueError, match="encoder.stages"):
        dropout_target_modules(torch.nn.Conv3d(1, 2, 1), "decoder")
    # channel mode zeroes whole feature maps of a row
    hook = RowDropout("channel")
    hook.rates = [0.5, 0.0]
    hook.generators = [torch.Generator().manual_seed(1), None]
    output = hook(None, None, torch.ones(2, 64, 3, 3, 3))
    per_channel = output[0].flatten(1)
    assert torch.all(per_channel.min(1).values == per_channel.max(1).values)  # constant per channel
    assert set(per_channel[:, 0].tolist()) == {0.0, 2.0}  # dropped or rescaled by 1/(1-p)
    assert torch.equal(output[1], torch.ones(64, 3, 3, 3))


def test_a_dropout_row_draws_from_its_own_generator_whatever_shares_its_batch():
    # The engine may pass a member alone or beside others (members per sweep depend on the case's size): its draws
    # must not change with that.
    hook = RowDropout("element")
    features = torch.randn(3, 8, 4, 4, 4)
    hook.rates, hook.generators = [0.3], [torch.Generator().manual_seed(5)]
    alone = hook(None, None, features[1:2])
    hook.rates = [0.0, 0.3, 0.2]
    hook.generators = [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    together = hook(None, None, features)
    assert torch.equal(together[1], alone[0])
    assert torch.equal(together[0], features[0])  # rate 0: untouched
    assert not torch.equal(together[2], features[2]) and not torch.equal(together[1], features[1])
    with pytest.raises(RuntimeError, match="dropout generators for 1 rows, batch has 3"):
        hook.generators = [None]
        hook(None, None, features)


# ------------------------------------------------------------------------------------------------ engine (fast)
class _PlansManager:
    """What the engine reads of nnU-Net's PlansManager: the label manager."""

    def __init__(self, label_manager):
        self.label_manager = label_manager

    def get_label_manager(self, dataset_json):
        return self.label_manager


def tiny_engine(network=None, patch_size=(16, 16, 16), num_classes=3, networks=None, **kwargs):
    """An engine around `tiny_unet` (random weights: many near-ties, so any change of rounding would show)."""
    from types import SimpleNamespace

    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_rndpo.proposals.engine import ProposalEngine

    labels = {"background": 0, **{f"class{c}": c for c in range(1, num_classes)}}
    label_manager = LabelManager(labels, None)
    engine_options = {
        key: kwargs.pop(key) for key in ("accumulator_memory_gib", "max_batch_voxels", "log") if key in kwargs
    }
    return ProposalEngine(
        networks if networks is not None else [network if network is not None else tiny_unet()],
        _PlansManager(label_manager),
        SimpleNamespace(patch_size=list(patch_size)),
        label_manager,
        {"labels": labels},
        ProposalSettings(**kwargs),
        ALL_AXES,
        **engine_options,
    )


def reference_generate(engine, data: np.ndarray, case_seed: int):
    """The engine as it was before proposals were made member by member (git show 71961b2:
    nnunet_rndpo/proposals/engine.py), without its dropout: every forward member's float32 logits at full size at
    once, in batches of members_per_batch members of one network per tile, then softmax and mean over all.
    Returns (proposals, mean_probabilities float16, the forward members' cropped logits)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from nnunet_rndpo.proposals.sources import SOURCES

    def flip(tensor, axes):
        return torch.flip(tensor, [axis + 2 for axis in axes]) if axes else tensor

    assert not any(member.dropout_p > 0 for member in engine.members), "the reference has no dropout"
    with torch.inference_mode():
        image = torch.as_tensor(np.asarray(data), dtype=torch.float32)
        padded, revert_padding = pad_nd_image(image, engine.patch_size, "constant", {"value": 0}, True, None)
        slicers = engine._tiler._internal_get_sliding_window_slicers(padded.shape[1:])
        gaussian = compute_gaussian(engine.patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10, device="cpu")
        forward_members = [m for m in engine.members if needs_forward(m)]
        accumulated = torch.zeros((len(forward_members), engine.num_classes, *padded.shape[1:]), dtype=torch.float32)
        weight = torch.zeros(padded.shape[1:], dtype=torch.float32)
        by_network = {}
        for slot, member in enumerate(forward_members):
            by_network.setdefault(member.network_index, []).append((slot, member))
        for slicer in slicers:
            tile = padded[slicer][None]
            for index, group in by_network.items():
                for start in range(0, len(group), engine.settings.members_per_batch):
                    chunk = group[start : start + engine.settings.members_per_batch]
                    batch = torch.cat([flip(tile, member.flip_axes) for _, member in chunk])
                    logits = engine.networks[index](batch).float()
                    for row, (slot, member) in enumerate(chunk):
                        accumulated[(slot, *slicer)] += flip(logits[row : row + 1], member.flip_axes)[0] * gaussian
            weight[slicer[1:]] += gaussian
        accumulated /= weight
        accumulated = accumulated[(slice(None), slice(None), *revert_padding[1:])]
        mean_probabilities = torch.softmax(accumulated, dim=1).mean(0)
        labels, forward_index = [], 0
        for member_index, member in enumerate(engine.members):
            if needs_forward(member):
                labels.append(accumulated[forward_index].argmax(0))
                forward_index += 1
            else:
                rng = np.random.default_rng([case_seed, member_index])
                derive = SOURCES[member.source].derive
                labels.append(derive(member, accumulated[0], mean_probabilities, engine.settings, rng))
        proposals = torch.stack(labels).to(torch.uint8).numpy()
        return proposals, mean_probabilities.to(torch.float16).numpy(), accumulated


def assert_same_as_reference(engine, data, case_seed=3):
    """Every member's labels equal to the voxel, mean probabilities within float16 rounding."""
    result = engine.generate(data, case_seed)
    proposals, mean_probabilities, _ = reference_generate(engine, data, case_seed)
    assert result.proposals.shape == proposals.shape and result.proposals.dtype == np.uint8
    for index, member in enumerate(engine.members):
        assert np.array_equal(result.proposals[index], proposals[index]), (index, member)
    assert result.mean_probabilities.dtype == np.float16
    np.testing.assert_allclose(
        result.mean_probabilities.astype(np.float32), mean_probabilities.astype(np.float32), rtol=0, atol=1e-3
    )
    return result


def test_engine_makes_the_proposals_of_the_engine_that_held_every_member(monkeypatch):
    rng = np.random.default_rng(0)
    case = rng.normal(size=(1, 37, 29, 41)).astype(np.float32)  # 3 x 3 x 4 tiles of 16^3, odd sizes
    members = ("tta", "threshold", "temperature", "ensemble")
    engine = tiny_engine(num_proposals=8, sources=members)
    assert engine.members_per_sweep((37, 29, 41)) == 8  # a small case: one sweep for all three passes
    result = assert_same_as_reference(engine, case)
    assert len({p.tobytes() for p in result.proposals}) >= 6  # the members differ: the comparison means something
    # every mirror member, one sweep of eight; and a case smaller than the patch (padded, cropped back)
    assert_same_as_reference(tiny_engine(num_proposals=8, sources=("tta",)), case)
    small = np.ascontiguousarray(case[:, :11, 3:20, :16])
    assert tiny_engine(num_proposals=8).generate(small, 0).proposals.shape == (8, 11, 17, 16)
    assert_same_as_reference(tiny_engine(num_proposals=8, sources=members), small)
    # members_per_batch smaller than the passes: several sweeps, the same batches as before
    assert_same_as_reference(tiny_engine(num_proposals=8, sources=("tta",), members_per_batch=3), case)
    # a case finished in many slabs (as a CT-sized one is)
    from nnunet_rndpo.proposals import engine as engine_module

    monkeypatch.setattr(engine_module, "SLAB_VOXELS", 2000)
    wide = rng.normal(size=(1, 37, 32, 24)).astype(np.float32)
    assert len(engine_module._slabs(wide.shape[1:])) == 19
    assert_same_as_reference(tiny_engine(num_proposals=8, sources=members), wide)


def test_logits_labels_and_softmax_by_slabs_equal_those_of_the_whole_volume(monkeypatch):
    from nnunet_rndpo.proposals import engine as engine_module

    monkeypatch.setattr(engine_module, "SLAB_VOXELS", 4000)
    generator = torch.Generator().manual_seed(0)
    for shape in ((15, 37, 40, 28), (3, 45, 32, 32), (4, 70, 6, 12)):
        sums = torch.randn((2, *shape), generator=generator) * 50
        weight = torch.rand(shape[1:], generator=generator) * 10 + 0.1
        slabs = engine_module._slabs(shape[1:])
        assert len(slabs) > 1 and all((s.stop - s.start) * math.prod(shape[2:]) % 64 == 0 for s in slabs[:-1])
        logits = sums / weight  # the whole volume at once, as the engine that held every member did
        probabilities = torch.softmax(logits, dim=1)
        proposals = torch.zeros((3, *shape[1:]), dtype=torch.uint8)
        total = torch.zeros(shape)
        engine_module._finish(sums, weight, proposals, total, [2, 0])
        # bit for bit (one torch thread, as these tests run): a slab never splits a vector of the whole-volume pass
        assert torch.equal(sums, logits)  # divided in place
        assert torch.equal(proposals[2], logits[0].argmax(0).to(torch.uint8))
        assert torch.equal(proposals[0], logits[1].argmax(0).to(torch.uint8))
        assert torch.equal(total, probabilities[0] + probabilities[1])
        assert not proposals[1].any()


def test_engine_with_two_networks_keeps_every_member_and_the_mean():
    rng = np.random.default_rng(1)
    case = rng.normal(size=(1, 30, 20, 24)).astype(np.float32)
    other = tiny_unet()
    torch.manual_seed(1)
    for parameter in other.parameters():
        parameter.data += 0.1 * torch.randn_like(parameter)
    engine = tiny_engine(
        networks=[tiny_unet(), other],
        num_proposals=7,
        sources=("tta", "checkpoint_tta", "ensemble"),
        extra_checkpoints=("other.pth",),
    )
    assert [m.source for m in engine.members] == ["plain", "tta", "checkpoint_tta", "ensemble", "tta"] + [
        "checkpoint_tta",
        "tta",
    ]
    assert [(index, [i for i, _ in group]) for index, group in engine.sweeps(8)] == [(0, [0, 1, 4, 6]), (1, [2, 5])]
    # the running mean adds network 0's passes before network 1's, the old mean took them in plan order: float32
    # rounding apart, which the ensemble's argmax could only see at an exact tie
    assert_same_as_reference(engine, case)


def test_engine_in_less_memory_takes_fewer_members_per_sweep_and_keeps_the_labels_but_near_ties():
    rng = np.random.default_rng(2)
    case = rng.normal(size=(1, 40, 20, 24)).astype(np.float32)
    accumulator_bytes = 4 * 3 * 40 * 20 * 24
    engine = tiny_engine(num_proposals=8, sources=("tta",), accumulator_memory_gib=2.5 * accumulator_bytes / 2**30)
    assert engine.members_per_sweep((40, 20, 24)) == 2
    assert [len(group) for _, group in engine.sweeps(2)] == [2, 2, 2, 2]
    assert tiny_engine(accumulator_memory_gib=1e-9).members_per_sweep((40, 20, 24)) == 1  # at least one
    # a batch holds at most max_batch_voxels (default one 128^3 patch): 3 of these 16^3 patches, 1 of a 128^3 one
    assert tiny_engine(num_proposals=8, max_batch_voxels=3 * 16**3 + 1).members_per_sweep((40, 20, 24)) == 3
    assert tiny_engine(num_proposals=8, patch_size=(128, 128, 128)).members_per_sweep((128, 128, 128)) == 1
    assert tiny_engine(num_proposals=8, patch_size=(64, 64, 64)).members_per_sweep((64, 64, 64)) == 8
    result = engine.generate(case, 3)
    _, mean_probabilities, logits = reference_generate(engine, case, 3)
    # batches of two rows instead of eight: the network's outputs may round differently (oneDNN picks its path by
    # batch size), so a label may flip where the two best logits are within float32 noise, nowhere else
    for index in range(8):
        assert label_mismatch_outside_ties(result.proposals[index], logits[index]) == 0, index
    np.testing.assert_allclose(result.mean_probabilities, mean_probabilities, rtol=0, atol=1e-3)
    one_at_a_time = tiny_engine(num_proposals=8, sources=("tta",), accumulator_memory_gib=1e-9).generate(case, 3)
    for index in range(8):
        assert label_mismatch_outside_ties(one_at_a_time.proposals[index], logits[index]) == 0, index


def test_dropout_members_draw_the_same_in_any_sweep():
    rng = np.random.default_rng(3)
    case = rng.normal(size=(1, 24, 20, 20)).astype(np.float32)
    settings = {"num_proposals": 5, "sources": ("tta", "dropout"), "dropout_p": 0.3, "dropout_location": "all"}
    together = tiny_engine(**settings).generate(case, 7)
    apart = tiny_engine(**settings, members_per_batch=1).generate(case, 7)
    # the dropout masks are the member's own; only the batch's rounding may differ, and mostly it does not
    for index in (2, 4):
        assert np.mean(together.proposals[index] == apart.proposals[index]) > 0.999
    assert not np.array_equal(together.proposals[2], together.proposals[4])  # two draws, two masks
    assert not np.array_equal(together.proposals[2], together.proposals[0])
    again = tiny_engine(**settings).generate(case, 7)
    assert np.array_equal(again.proposals, together.proposals)  # reproducible from the case seed
    assert not np.array_equal(tiny_engine(**settings).generate(case, 8).proposals[2], together.proposals[2])


def test_a_case_that_does_not_fit_the_device_is_redone_with_its_sums_on_the_cpu_and_logged_once():
    messages = []
    engine = tiny_engine(num_proposals=3, log=messages.append)
    case = np.random.default_rng(4).normal(size=(1, 20, 20, 20)).astype(np.float32)
    expected = engine.generate(case, 1)
    tried = []
    real_generate = engine._generate

    def out_of_memory_on_the_device(image, case_seed, results_device):
        tried.append(len(tried))
        if len(tried) % 2 == 1:  # the first try of every case: on the "device"
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(image, case_seed, results_device)

    engine._generate = out_of_memory_on_the_device
    engine.results_devices = lambda: (torch.device("cpu"), torch.device("cpu"))  # (the GPU's, then the CPU's)
    for _ in range(2):
        again = engine.generate(case, 1)
        assert np.array_equal(again.proposals, expected.proposals)
        assert np.array_equal(again.mean_probabilities, expected.mean_probabilities)
    assert len(tried) == 4
    assert len(messages) == 1 and "redone with their sums on the CPU" in messages[0]
    # an error that is not about memory is not retried
    engine._generate = lambda image, case_seed, results_device: (_ for _ in ()).throw(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        engine.generate(case, 1)


# ------------------------------------------------------------------------------------------------ store (fast)
def test_store_refuses_other_settings_or_checkpoint_and_overwrite_replaces(tmp_path):
    store = ProposalStore(tmp_path / "store").open(fake_manifest())
    store.save_case("case_a", *fake_case(0), case_seed=7)
    ProposalStore(tmp_path / "store").open(fake_manifest())  # same identity: reused
    assert store.case_ids() == ["case_a"]

    other_settings = ProposalSettings(num_proposals=3, dropout_p=0.3)
    with pytest.raises(
        StoreError, match=r"different settings \(settings: dropout_p: store has 0\.2, now 0\.3\)"
    ) as error:
        ProposalStore(tmp_path / "store").open(fake_manifest(settings=other_settings.to_dict()))
    assert "--overwrite" in str(error.value)
    with pytest.raises(
        StoreError, match=r"different checkpoint_sha256 \(checkpoint_sha256: store has \"a+\", now \"b+\"\)"
    ):
        ProposalStore(tmp_path / "store").open(fake_manifest(checkpoint_sha256="b" * 64))
    # a checkpoint moved to another path but with the same bytes is the same model
    ProposalStore(tmp_path / "store").open(fake_manifest(checkpoint="/elsewhere/checkpoint_final.pth"))

    replaced = ProposalStore(tmp_path / "store").open(fake_manifest(checkpoint_sha256="b" * 64), overwrite=True)
    assert replaced.case_ids() == []
    assert replaced.manifest()["checkpoint_sha256"] == "b" * 64


def test_store_round_trip_and_corrupt_case_named(tmp_path):
    store = ProposalStore(tmp_path / "store").open(fake_manifest())
    proposals, probabilities = fake_case(1)
    store.save_case("good", proposals, probabilities, case_seed=11)
    loaded = store.load_case("good")
    assert np.array_equal(loaded["proposals"], proposals) and loaded["proposals"].dtype == np.uint8
    assert np.array_equal(loaded["mean_probabilities"], probabilities) and int(loaded["case_seed"]) == 11

    store.case_path("broken").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(StoreError, match=r"broken\.npz is corrupt"):
        store.load_case("broken")
    store.save_case("short", *fake_case(2, k=2), case_seed=0)  # 2 proposals, the manifest plans 3
    problems = store.verify()
    assert len(problems) == 2
    assert any("broken.npz" in p and "corrupt" in p for p in problems)
    assert any("short.npz holds 2 proposals, the manifest 3" in p for p in problems)
    with pytest.raises(StoreError, match="'missing' is not in the proposal store"):
        store.load_case("missing")
    with pytest.raises(StoreError, match="uint8"):
        store.save_case("bad", proposals.astype(np.int64), probabilities, case_seed=0)


def test_store_loads_the_label_maps_without_decompressing_the_probabilities(tmp_path):
    import zipfile

    store = ProposalStore(tmp_path / "store").open(fake_manifest())
    proposals, probabilities = fake_case(3)
    store.save_case("case_a", proposals, probabilities, case_seed=4)
    # the same case with its mean_probabilities member cut in half: only a reader of the probabilities can notice
    ruined = store.case_path("case_b")
    with zipfile.ZipFile(store.case_path("case_a")) as source, zipfile.ZipFile(ruined, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            target.writestr(item, data[: len(data) // 2] if item.filename == "mean_probabilities.npy" else data)
    assert np.array_equal(store.load_proposals("case_b"), proposals)
    labels_only = store.load_case("case_b", probabilities=False)
    assert set(labels_only) == {"proposals", "case_seed"} and int(labels_only["case_seed"]) == 4
    with pytest.raises(StoreError, match=r"case_b\.npz is corrupt"):
        store.load_case("case_b")
    # the checks of a whole load stay: a corrupt label map, a count that is not the manifest's
    store.case_path("broken").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(StoreError, match=r"broken\.npz is corrupt"):
        store.load_proposals("broken")
    store.save_case("short", *fake_case(2, k=2), case_seed=0)
    with pytest.raises(StoreError, match="short.npz holds 2 proposals, the manifest 3"):
        store.load_proposals("short")


def test_a_store_with_dropout_members_records_how_they_draw(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from nnunet_rndpo.proposals import run
    from nnunet_rndpo.proposals.engine import DROPOUT_DRAWS

    model = SimpleNamespace(
        plans={"dataset_name": "Dataset999_Fake", "plans_name": "nnUNetPlans"},
        configuration="3d_fullres",
        fold=0,
        checkpoint_path=Path("/models/checkpoint_final.pth"),
        checkpoint_sha256="a" * 64,
        proposal_mirror_axes=ALL_AXES,
        dataset_json={"labels": {"background": 0, "organ": 1}},
    )
    pool = CasePool("Dataset999_Fake", "imagesUnlabeled", ["case_a"])
    with_dropout = run.store_manifest(model, ProposalSettings(num_proposals=3, sources=("dropout",)), pool)
    assert with_dropout["dropout_draws"] == DROPOUT_DRAWS
    assert "dropout_draws" not in run.store_manifest(model, ProposalSettings(num_proposals=3), pool)
    # a store filled before the draws were per member (no such field) is not mixed with new dropout proposals
    before = {key: value for key, value in with_dropout.items() if key != "dropout_draws"}
    ProposalStore(tmp_path / "old").open(before)
    with pytest.raises(StoreError, match=r"different dropout_draws \(dropout_draws: store has null, now"):
        ProposalStore(tmp_path / "old").open(with_dropout)
    ProposalStore(tmp_path / "new").open(with_dropout)
    ProposalStore(tmp_path / "new").open(with_dropout)  # the same: reused


def test_store_open_cleans_only_the_temporaries_of_its_own_cases(tmp_path):
    # Parts of one pool may run at once (as nnUNetv2_predict's parts): a part that opens the store must not
    # delete another part's temporary file while that part is writing it.
    store = ProposalStore(tmp_path / "store").open(fake_manifest())
    mine = store.cases_folder / ".case_a.npz.x1y2z3.partial"
    theirs = store.cases_folder / ".case_b.npz.q7r8s9.partial"
    mine.write_bytes(b"half")
    theirs.write_bytes(b"half")
    ProposalStore(tmp_path / "store").open(fake_manifest(), case_ids=["case_a"])
    assert not mine.exists() and theirs.exists()
    ProposalStore(tmp_path / "store").open(fake_manifest())  # no part given: every temporary is stale
    assert not theirs.exists()


# ------------------------------------------------------------------------------------------------ checkpoints
def test_unreadable_checkpoints_raise_checkpoint_error_naming_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere\.pth"):
        read_checkpoint(tmp_path / "nowhere.pth")

    foreign = tmp_path / "foreign.pth"
    torch.save({"a": 1}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pth is not an nnU-Net checkpoint.*found \['a'\]"):
        load_model(foreign)

    whole = tmp_path / "whole.pth"
    torch.save({"network_weights": {"w": torch.randn(64, 64)}, "init_args": {}, "trainer_name": "nnUNetTrainer"}, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # a copy cut off mid-transfer
    with pytest.raises(CheckpointError, match=r"truncated\.pth cannot be read.*truncated or corrupt"):
        load_model(truncated)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x04 this is not a pickle at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        load_model(garbage)


# ------------------------------------------------------------------------------------------------ pool (fast)
def test_empty_unlabeled_folder_is_an_error_naming_it(tmp_path):
    dataset_json = write_dataset_json(tmp_path / "raw" / "Dataset999_Fake")
    folder = tmp_path / "raw" / "Dataset999_Fake" / "imagesUnlabeled"
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"")  # hidden files are not cases
    with pytest.raises(PoolError, match=rf"{folder} is empty"):
        discover_pool(tmp_path / "raw", tmp_path / "pre", "Dataset999_Fake", dataset_json, "data", 0)


def test_wrongly_named_unlabeled_file_is_an_error_naming_it(tmp_path):
    dataset_json = write_dataset_json(tmp_path / "raw" / "Dataset999_Fake")
    folder = tmp_path / "raw" / "Dataset999_Fake" / "imagesUnlabeled"
    folder.mkdir()
    (folder / "case_001_0000.nii.gz").write_bytes(b"")
    (folder / "case_002.nii.gz").write_bytes(b"")  # channel suffix forgotten
    with pytest.raises(PoolError, match=r"case_002\.nii\.gz: not an nnU-Net image name"):
        discover_pool(tmp_path / "raw", tmp_path / "pre", "Dataset999_Fake", dataset_json, "data", 0)


def test_wrong_channel_count_is_an_error_naming_the_case(tmp_path):
    dataset_json = write_dataset_json(tmp_path / "raw" / "Dataset999_Fake", channels=2)
    folder = tmp_path / "raw" / "Dataset999_Fake" / "imagesUnlabeled"
    folder.mkdir()
    for name in ("case_001_0000.nii.gz", "case_001_0001.nii.gz", "case_002_0000.nii.gz"):
        (folder / name).write_bytes(b"")
    with pytest.raises(PoolError, match=r"'case_002'.*channel\(s\) \[0\].*declares 2 channel"):
        discover_pool(tmp_path / "raw", tmp_path / "pre", "Dataset999_Fake", dataset_json, "data", 0)


def test_shards_cover_every_case_exactly_once():
    cases = [f"case_{i:02d}" for i in range(11)]
    pool = CasePool("Dataset999_Fake", "imagesUnlabeled", cases)
    for num_parts in range(1, 5):
        parts = [pool.shard(part, num_parts) for part in range(num_parts)]
        together = [case for part in parts for case in part]
        assert sorted(together) == cases and len(together) == len(cases)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    for bad in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="part_id"):
            pool.shard(*bad)


# ------------------------------------------------------------------------------------------------ engine (slow)
@pytest.fixture(scope="module")
def base_model(base_checkpoint):
    return load_model(base_checkpoint)


def load_preprocessed(data_folder: Path, case_id: str) -> np.ndarray:
    """A case's preprocessed image as nnU-Net's own dataset class reads it for training."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = str(data_folder)
    data, _, _, _ = infer_dataset_class(folder)(folder, [case_id]).load_case(case_id)
    return np.asarray(data[:], dtype=np.float32)


@pytest.fixture(scope="module")
def training_case(preprocessed_synthetic):
    case_id = preprocessed_synthetic.case_identifiers[0]
    return case_id, load_preprocessed(preprocessed_synthetic.data_folder, case_id)


@pytest.fixture(scope="module")
def single_tile(training_case):
    """A 32^3 crop through the organ: exactly one patch, so every member is one network pass."""
    _, data = training_case
    return np.ascontiguousarray(data[:, 4:36, 4:36, 4:36])


def make_engine(model, **settings):
    from nnunet_rndpo.proposals.engine import ProposalEngine

    return ProposalEngine(
        [model.network],
        model.plans_manager,
        model.configuration_manager,
        model.label_manager,
        model.dataset_json,
        ProposalSettings(**settings),
        model.mirror_axes,
    )


@pytest.fixture(scope="module")
def tta_result(base_model, single_tile):
    engine = make_engine(base_model, num_proposals=8, sources=("tta",))
    return engine.members, engine.generate(single_tile, case_seed=3)


def by_hand(network, image: np.ndarray, flip_axes: tuple[int, ...]) -> torch.Tensor:
    """Logits of one member computed directly: flip the input, run the network, flip the logits back."""
    dims = [axis + 1 for axis in flip_axes]
    x = torch.from_numpy(image)
    with torch.inference_mode():
        x = torch.flip(x, dims) if dims else x
        logits = network(x[None])[0]
        return torch.flip(logits, dims) if dims else logits


@pytest.mark.slow
def test_tta_members_differ_and_map_back_to_the_unflipped_frame(base_model, single_tile, tta_result):
    members, result = tta_result
    assert result.proposals.shape == (8, 32, 32, 32) and result.proposals.dtype == np.uint8
    assert [m.flip_axes for m in members] == [(), *flip_combinations(ALL_AXES)]
    assert np.count_nonzero(result.proposals[0]) > 100  # the base model segments something
    distinct = {p.tobytes() for p in result.proposals}
    assert len(distinct) >= 4, "mirror members of an imperfect model should disagree somewhere"

    # Each member equals argmax(flip(net(flip(x)))): flipped back into the frame of the plain mask.
    hand_probabilities = []
    for member, proposal in zip(members, result.proposals):
        logits = by_hand(base_model.network, single_tile, member.flip_axes)
        assert label_mismatch_outside_ties(proposal, logits) == 0, member
        hand_probabilities.append(torch.softmax(logits, 0))
    # Forgetting to flip back would put the mask in the mirrored frame: far from the plain mask.
    flipped = torch.flip(by_hand(base_model.network, single_tile, (0,)), [1]).argmax(0).numpy()
    assert np.count_nonzero(flipped != result.proposals[1]) > 100
    # mean_probabilities is the softmax averaged over the 8 passes (stored as float16)
    assert result.mean_probabilities.dtype == np.float16
    np.testing.assert_allclose(result.mean_probabilities, torch.stack(hand_probabilities).mean(0).numpy(), atol=2e-3)


@pytest.mark.slow
def test_dropout_members_differ_and_are_reproducible(base_model, single_tile, tta_result):
    engine = make_engine(base_model, num_proposals=4, sources=("dropout",), dropout_p=0.2, dropout_location="decoder")
    first = engine.generate(single_tile, case_seed=5).proposals
    assert len({p.tobytes() for p in first[1:]}) == 3  # three different draws
    assert all(np.count_nonzero(p != first[0]) > 0 for p in first[1:])
    # the plain member of the batch carries no dropout: same as the plain member of the TTA run
    assert np.array_equal(first[0], tta_result[1].proposals[0])
    # determinism: the same case seed gives the same draws; another seed other draws
    assert np.array_equal(engine.generate(single_tile, case_seed=5).proposals, first)
    assert not np.array_equal(engine.generate(single_tile, case_seed=6).proposals[1:], first[1:])
    # the hooks are gone after generate: the network's own output is unchanged
    assert all(not module._forward_hooks for module in base_model.network.modules())


@pytest.mark.slow
def test_dropout_off_gives_k_copies_of_the_plain_mask(base_model, single_tile, tta_result):
    engine = make_engine(base_model, num_proposals=3, sources=("dropout",), dropout_p=0.0, dropout_location="all")
    proposals = engine.generate(single_tile, case_seed=5).proposals
    for proposal in proposals:
        assert np.array_equal(proposal, tta_result[1].proposals[0])


@pytest.mark.slow
def test_hooked_base_network_keeps_the_checkpoint_weights(base_model, base_checkpoint):
    saved = read_checkpoint(base_checkpoint)["network_weights"]
    with dropout_hooks(base_model.network, "all", "element"):
        state = base_model.network.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[key], saved[key]) for key in saved)


@pytest.mark.slow
def test_plain_member_matches_nnunet_sliding_window_on_a_whole_case(base_model, training_case):
    """Proposals live in nnU-Net's preprocessed voxel grid: the plain member is nnU-Net's own prediction."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _, data = training_case
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        base_model.network,
        base_model.plans_manager,
        base_model.configuration_manager,
        None,
        base_model.dataset_json,
        "nnUNetTrainer",
        base_model.mirror_axes,
    )
    nnunet_logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data))
    proposals = make_engine(base_model, num_proposals=2, sources=("tta",)).generate(data, case_seed=0).proposals
    assert proposals.shape == (2, *data.shape[1:])
    assert label_mismatch_outside_ties(proposals[0], nnunet_logits) == 0
    # a case smaller than the patch on some axes is padded for the pass and cropped back to its own shape
    small = np.ascontiguousarray(data[:, :20, 3:40, :27])
    assert make_engine(base_model, num_proposals=2).generate(small, case_seed=0).proposals.shape == (2, 20, 37, 27)


@pytest.mark.slow
def test_proposals_of_the_trained_base_are_those_of_the_engine_that_held_every_member(
    base_model, training_case, hippocampus_dataset
):
    """Unchanged to the voxel on whole cases: the synthetic case (2 x 2 x 2 tiles) and real Hippocampus images
    (other shapes, padding on some axes), K = 8."""
    _, data = training_case
    for sources in (("tta",), ("tta", "threshold", "temperature", "ensemble")):
        assert_same_as_reference(make_engine(base_model, num_proposals=8, sources=sources), data, case_seed=11)
    engine = make_engine(base_model, num_proposals=8, sources=("tta",))
    for case_id in hippocampus_dataset.case_identifiers[:3]:
        image = load_preprocessed(hippocampus_dataset.data_folder, case_id)
        assert_same_as_reference(engine, image, case_seed=case_seed(0, case_id))


# ------------------------------------------------------------------------------------------------ store + pool (slow)
@pytest.fixture(scope="module")
def unlabeled_pool(base_model, synthetic_dataset):
    return discover_pool(
        Path(os.environ["nnUNet_raw"]),
        Path(os.environ["nnUNet_preprocessed"]),
        synthetic_dataset.name,
        base_model.dataset_json,
        base_model.configuration_manager.data_identifier,
        0,
    )


@pytest.mark.slow
def test_generation_resumes_after_a_crash(base_model, unlabeled_pool, tmp_path):
    from nnunet_rndpo.proposals.run import generate_proposals

    assert unlabeled_pool.source == "imagesUnlabeled" and len(unlabeled_pool.case_ids) == 4
    settings = ProposalSettings(num_proposals=2)
    folder = tmp_path / "store"
    first, rest = unlabeled_pool.case_ids[:2], unlabeled_pool.case_ids[2:]
    store, summary = generate_proposals(base_model, unlabeled_pool, folder, settings, case_ids=first, progress=False)
    assert (summary.cases_generated, summary.cases_reused) == (2, 0)
    # A killed writer leaves its temporary file behind, never a case file.
    stale = store.cases_folder / f".{rest[0]}.npz.k1ll3d.partial"
    stale.write_bytes(b"half a case")
    stamps = {case: store.case_path(case).stat().st_mtime_ns for case in first}

    store, summary = generate_proposals(base_model, unlabeled_pool, folder, settings, progress=False)
    assert (summary.cases_in_part, summary.cases_generated, summary.cases_reused) == (4, 2, 2)
    assert store.case_ids() == unlabeled_pool.case_ids
    assert store.verify() == []
    assert not stale.exists()
    assert {case: store.case_path(case).stat().st_mtime_ns for case in first} == stamps  # not rewritten
    # the seed is per case: a resumed run draws the same as an uninterrupted one would
    assert int(store.load_case(rest[0])["case_seed"]) == case_seed(settings.seed, rest[0])

    # same store, other settings: refused before anything is computed, and nothing is lost
    with pytest.raises(StoreError, match=r"different settings, members"):
        generate_proposals(base_model, unlabeled_pool, folder, ProposalSettings(num_proposals=3), progress=False)
    assert store.verify() == [] and len(store.case_ids()) == 4


@pytest.mark.slow
def test_a_case_another_process_is_generating_is_left_to_it(base_model, unlabeled_pool, tmp_path, monkeypatch):
    """Two trainings on one base and pool fill one store: each takes the cases the other has not claimed, and a
    held case is taken over once the other process has written it (reused) or has died (generated here)."""
    import subprocess
    import sys as system

    from nnunet_rndpo import atomic
    from nnunet_rndpo.proposals import run as proposal_run

    settings = ProposalSettings(num_proposals=2)
    store = ProposalStore(tmp_path / "store")
    finished_by_other, left_by_dead, *_ = unlabeled_pool.case_ids
    other = subprocess.Popen([system.executable, "-c", "import time; time.sleep(60)"])
    try:
        for case_id in (finished_by_other, left_by_dead):
            store.claim_path(case_id).parent.mkdir(parents=True, exist_ok=True)
            store.claim_path(case_id).write_text(str(other.pid))
        saved, waits = [], []
        real_save = ProposalStore.save_case
        monkeypatch.setattr(
            ProposalStore,
            "save_case",
            lambda self, case_id, *arrays: (saved.append(case_id), real_save(self, case_id, *arrays)),
        )

        def other_process_finishes_one_case_and_dies():
            waits.append(1)
            shape = np.load(store.case_path(saved[0]))["proposals"].shape
            real_save(store, finished_by_other, np.zeros(shape, np.uint8), np.zeros((3, *shape[1:]), np.float16), 0)
            store.claim_path(finished_by_other).unlink()
            other.kill()
            other.wait()

        monkeypatch.setattr(atomic, "wait_for_claims", other_process_finishes_one_case_and_dies)
        store, summary = proposal_run.generate_proposals(
            base_model, unlabeled_pool, store.folder, settings, progress=False
        )
    finally:
        other.kill()
        other.wait()
    # the free cases first, then one wait for the two held ones: one written by the other, one taken over
    assert saved[:2] == unlabeled_pool.case_ids[2:] and saved[2:] == [left_by_dead]
    assert len(waits) == 1
    assert (summary.cases_in_part, summary.cases_generated, summary.cases_reused) == (4, 3, 1)
    assert store.case_ids() == unlabeled_pool.case_ids and not list(store.cases_folder.glob("*.claim"))


def test_store_refuses_proposals_of_an_extra_checkpoint_retrained_in_place(base_model, unlabeled_pool, tmp_path):
    # the trainer opens the store before any network is loaded: the manifest must hash the extra files itself
    from nnunet_rndpo.proposals.run import store_manifest

    sibling = tmp_path / "fold_1" / "checkpoint_final.pth"
    sibling.parent.mkdir()
    sibling.write_bytes(b"the first training of fold 1")
    settings = ProposalSettings(num_proposals=3, sources=("tta", "checkpoint"), extra_checkpoints=(str(sibling),))
    first = store_manifest(base_model, settings, unlabeled_pool)
    assert first["extra_checkpoints_sha256"] == [hashlib.sha256(b"the first training of fold 1").hexdigest()]
    ProposalStore(tmp_path / "store").open(first)
    ProposalStore(tmp_path / "store").open(store_manifest(base_model, settings, unlabeled_pool))  # same: reused

    sibling.write_bytes(b"fold 1 trained again")
    with pytest.raises(StoreError, match=r"different extra_checkpoints_sha256"):
        ProposalStore(tmp_path / "store").open(store_manifest(base_model, settings, unlabeled_pool))
    # one file is read once while it stays as it is: a run's start hashes each checkpoint in several places
    from nnunet_rndpo.proposals.model import _sha256_of_file, file_sha256

    reads = _sha256_of_file.cache_info().misses
    assert file_sha256(sibling) == file_sha256(tmp_path / "fold_1" / ".." / "fold_1" / "checkpoint_final.pth")
    assert _sha256_of_file.cache_info().misses == reads
    os.utime(sibling, ns=(0, 0))  # touched, same bytes: read again, same hash
    assert file_sha256(sibling) == hashlib.sha256(b"fold 1 trained again").hexdigest()
    assert _sha256_of_file.cache_info().misses == reads + 1
    # members of the base alone read no extra file
    assert (
        store_manifest(base_model, ProposalSettings(num_proposals=3), unlabeled_pool)["extra_checkpoints_sha256"] == []
    )


@pytest.mark.slow
def test_checkpoint_of_another_configuration_or_labels_is_refused(
    base_checkpoint, preprocessed_synthetic, tiny_configuration
):
    plans = json.loads(preprocessed_synthetic.plans_file.read_text())
    dataset_json = json.loads((preprocessed_synthetic.preprocessed_folder / "dataset.json").read_text())
    load_model(
        base_checkpoint,
        expected_plans=plans,
        expected_configuration=tiny_configuration,
        expected_dataset_json=dataset_json,
    )
    name = re.escape(str(base_checkpoint))
    with pytest.raises(
        CheckpointError,
        match=rf"{name} was trained for another setting: configuration '3d_tiny' \(expected '3d_fullres'\)",
    ):
        load_model(
            base_checkpoint,
            expected_plans=plans,
            expected_configuration="3d_fullres",
            expected_dataset_json=dataset_json,
        )
    other_labels = {**dataset_json, "labels": {"background": 0, "organ": 1}}
    with pytest.raises(CheckpointError, match=rf"{name} was trained for another setting: labels"):
        load_model(
            base_checkpoint,
            expected_plans=plans,
            expected_configuration=tiny_configuration,
            expected_dataset_json=other_labels,
        )
    # another checkpoint of a model's family (a fold, an ensemble member): checked against that model's setting
    from dataclasses import replace

    from nnunet_rndpo.proposals.model import load_model_like

    model = load_model(base_checkpoint)
    assert load_model_like(base_checkpoint, model).checkpoint_sha256 == model.checkpoint_sha256
    with pytest.raises(CheckpointError, match=rf"{name} was trained for another setting: labels"):
        load_model_like(base_checkpoint, replace(model, dataset_json=other_labels))
    # or against a run's location (its plans, configuration, dataset.json): a base to fine-tune
    from types import SimpleNamespace

    run = SimpleNamespace(plans=plans, configuration=tiny_configuration, dataset_json=dataset_json)
    assert load_model_like(base_checkpoint, run).checkpoint_sha256 == model.checkpoint_sha256
    with pytest.raises(CheckpointError, match=rf"{name} was trained for another setting: configuration '3d_tiny'"):
        load_model_like(base_checkpoint, SimpleNamespace(**{**vars(run), "configuration": "3d_fullres"}))


@pytest.mark.slow
def test_training_case_pool_is_voxel_aligned_with_preprocessed_data(base_model, preprocessed_synthetic, tmp_path):
    from nnunet_rndpo.proposals.run import generate_proposals

    # A raw root without imagesUnlabeled: the fold's training cases are the pool, read from nnU-Net's own data.
    pool = discover_pool(
        tmp_path / "no_raw",
        preprocessed_synthetic.preprocessed_folder.parent,
        preprocessed_synthetic.name,
        base_model.dataset_json,
        base_model.configuration_manager.data_identifier,
        0,
    )
    splits = json.loads((preprocessed_synthetic.preprocessed_folder / "splits_final.json").read_text())
    assert pool.source.startswith("training cases of fold 0") and pool.case_ids == sorted(splits[0]["train"])
    case_id = pool.case_ids[0]
    data = load_preprocessed(preprocessed_synthetic.data_folder, case_id)
    store, _ = generate_proposals(
        base_model, pool, tmp_path / "store", ProposalSettings(num_proposals=2), case_ids=[case_id], progress=False
    )
    case = store.load_case(case_id)
    assert case["proposals"].shape[1:] == data.shape[1:]
    assert case["mean_probabilities"].shape == (3, *data.shape[1:])
    assert set(case) == {"proposals", "mean_probabilities", "case_seed"}


# ------------------------------------------------------------------------------------------------ CLI (slow)
@pytest.fixture
def cli_checkpoint(base_checkpoint, preprocessed_synthetic, tiny_configuration, tmp_path):
    """A copy of the base checkpoint under a unique folder name, so the CLI's default store is this test's own."""
    from nnunet_rndpo.nnunet_paths import default_store_folder

    copy = tmp_path / f"model_{uuid.uuid4().hex[:8]}" / "fold_0" / "checkpoint_final.pth"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(base_checkpoint, copy)
    store_folder = default_store_folder(
        preprocessed_synthetic.preprocessed_folder.parent,
        preprocessed_synthetic.name,
        "nnUNetPlans",
        tiny_configuration,
        0,
        copy,
    )
    yield copy, store_folder
    shutil.rmtree(store_folder, ignore_errors=True)


def propose(dataset_id, checkpoint, *extra) -> int:
    from nnunet_rndpo.cli import main

    return main(
        ["propose", "-d", str(dataset_id), "-c", "3d_tiny", "-f", "0", "-chk", str(checkpoint), "-k", "2", *extra]
    )


@pytest.mark.slow
def test_cli_parts_fill_the_store_with_every_case_once(cli_checkpoint, synthetic_dataset, unlabeled_pool, capsys):
    checkpoint, store_folder = cli_checkpoint
    assert propose(synthetic_dataset.dataset_id, checkpoint, "--part_id", "0", "--num_parts", "2") == 0
    assert "2 cases (2 generated, 0 already in the store)" in capsys.readouterr().out
    store = ProposalStore(store_folder)
    assert store.case_ids() == unlabeled_pool.case_ids[0::2]
    assert propose(synthetic_dataset.dataset_id, checkpoint, "--part_id", "1", "--num_parts", "2") == 0
    assert "2 cases (2 generated, 0 already in the store)" in capsys.readouterr().out
    files = sorted(p.name for p in store.cases_folder.iterdir())
    assert files == [f"{case}.npz" for case in unlabeled_pool.case_ids]  # each once, no temporaries
    assert store.verify() == []
    assert store.manifest()["pool_source"] == "imagesUnlabeled"


@pytest.mark.slow
def test_cli_export_nifti_writes_k_files_in_the_original_geometry(
    cli_checkpoint, synthetic_dataset, unlabeled_pool, tmp_path
):
    import SimpleITK as sitk

    checkpoint, store_folder = cli_checkpoint
    export = tmp_path / "export"
    assert (
        propose(
            synthetic_dataset.dataset_id,
            checkpoint,
            "--part_id",
            "0",
            "--num_parts",
            "4",
            "--export_nifti",
            str(export),
        )
        == 0
    )
    case_id = unlabeled_pool.case_ids[0]
    assert sorted(p.name for p in export.iterdir()) == [f"{case_id}_proposal00.nii.gz", f"{case_id}_proposal01.nii.gz"]
    raw = sitk.ReadImage(str(synthetic_dataset.raw_folder / "imagesUnlabeled" / f"{case_id}_0000.nii.gz"))
    stored = ProposalStore(store_folder).load_case(case_id)["proposals"]
    for index in range(2):
        written = sitk.ReadImage(str(export / f"{case_id}_proposal{index:02d}.nii.gz"))
        assert written.GetSize() == raw.GetSize()
        assert written.GetSpacing() == pytest.approx(raw.GetSpacing())
        assert written.GetOrigin() == pytest.approx(raw.GetOrigin())
        assert written.GetDirection() == pytest.approx(raw.GetDirection())
        # spacing 1 and no crop here, so the exported mask holds the stored proposal's voxels label for label
        labels = sitk.GetArrayFromImage(written)
        assert np.array_equal(np.bincount(labels.ravel(), minlength=3), np.bincount(stored[index].ravel(), minlength=3))


def test_cleanup_spares_a_live_writers_temporary_and_removes_a_dead_ones(tmp_path):
    """Two processes filling one store (two trainers on one base) must not delete each other's files."""
    import subprocess
    import sys

    from nnunet_rndpo.atomic import remove_stale_temporaries

    live = tmp_path / f".case.npz.pid{os.getpid()}.abc.partial"
    live.write_bytes(b"being written")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".case.npz.pid{int(finished.stdout)}.xyz.partial"
    dead.write_bytes(b"left by a killed writer")
    assert remove_stale_temporaries(tmp_path) == 1
    assert live.exists() and not dead.exists()


# ================================================================================================ cross-model sources
def test_other_folds_are_found_beside_the_base_and_added_once(tmp_path):
    from nnunet_rndpo.nnunet_paths import sibling_fold_checkpoints
    from nnunet_rndpo.proposals.run import with_other_folds

    trainer_folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for fold in (0, 1, 3):
        (trainer_folder / f"fold_{fold}").mkdir(parents=True)
        (trainer_folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
    (trainer_folder / "fold_2").mkdir()  # a fold not trained yet: no checkpoint, not a source
    base = trainer_folder / "fold_0" / "checkpoint_final.pth"
    assert sibling_fold_checkpoints(base) == [
        trainer_folder / "fold_1" / "checkpoint_final.pth",
        trainer_folder / "fold_3" / "checkpoint_final.pth",
    ]
    settings = ProposalSettings(num_proposals=3, sources=("checkpoint",), other_folds=True)
    resolved = with_other_folds(settings, base)
    assert resolved.extra_checkpoints == tuple(str(p) for p in sibling_fold_checkpoints(base))
    assert with_other_folds(resolved, base) == resolved  # the store's manifest settings resolve to themselves
    assert [m.network_index for m in plan_members(resolved, ALL_AXES)] == [0, 1, 2]
    with pytest.raises(ValueError, match="other_folds: no other fold"):
        with_other_folds(settings, tmp_path / "elsewhere" / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ValueError, match="need extra_checkpoints"):
        ProposalSettings(num_proposals=3, sources=("checkpoint_tta",))


def test_checkpoint_tta_and_ensemble_members_are_planned_per_network():
    settings = ProposalSettings(num_proposals=5, sources=("ensemble", "checkpoint_tta"), extra_checkpoints=("a.pth",))
    members = plan_members(settings, (1, 2))
    assert [m.source for m in members] == ["plain", "ensemble", "checkpoint_tta", "checkpoint_tta", "checkpoint_tta"]
    assert [(m.network_index, m.flip_axes) for m in members[2:]] == [(1, (1,)), (1, (2,)), (1, (1, 2))]
    assert [needs_forward(m) for m in members] == [True, False, True, True, True]


@pytest.mark.slow
def test_ensemble_member_is_the_argmax_of_the_mean_over_every_pass(base_model, single_tile):
    engine = make_engine(base_model, num_proposals=5, sources=("tta", "ensemble"))
    result = engine.generate(single_tile, case_seed=3)
    sources = [m.source for m in engine.members]
    assert "ensemble" in sources
    ensemble = result.proposals[sources.index("ensemble")]
    # the stored mean is float16: the argmax of its rounded values may differ only at exact near-ties
    assert np.mean(ensemble == result.mean_probabilities.astype(np.float32).argmax(0)) > 0.999
