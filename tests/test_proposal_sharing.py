"""A store takes a case from a sibling store of the same passes (nnunet_rndpo/proposals/sharing.py): hand-made
manifests for which stores qualify and how members are reordered; a real pair of fold stores for the copy."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_rndpo.proposals.sharing import donor_folders, donor_order, find_donors, member_keys


def fold_manifest(base: str, others: list[str], **settings) -> dict:
    """A store's manifest for a base network and its other folds: plain, one mirror, each other's plain and mirror,
    the ensemble (network files named by their hash)."""
    members = [{"source": "plain", "flip_axes": [], "network_index": 0, "dropout_p": 0.0}]
    members.append({"source": "tta", "flip_axes": [0], "network_index": 0, "dropout_p": 0.0})
    for index in range(1, len(others) + 1):
        members.append({"source": "checkpoint", "flip_axes": [], "network_index": index, "dropout_p": 0.0})
        members.append({"source": "checkpoint_tta", "flip_axes": [0], "network_index": index, "dropout_p": 0.0})
    members.append({"source": "ensemble", "flip_axes": [], "network_index": 0, "dropout_p": 0.0})
    return {
        "format_version": 1,
        "dataset": "Dataset001_X",
        "plans": "nnUNetPlans",
        "configuration": "3d_fullres",
        "checkpoint_sha256": base,
        "extra_checkpoints_sha256": others,
        "settings": {
            "num_proposals": len(members),
            "sources": ["tta", "checkpoint", "checkpoint_tta", "ensemble"],
            "extra_checkpoints": [f"/models/{name}.pth" for name in others],
            "other_folds": True,
            "tile_step_size": 0.5,
            **settings,
        },
        "members": members,
    }


FOLD0 = fold_manifest("a", ["b", "c"])
FOLD1 = fold_manifest("b", ["a", "c"])


def test_a_sibling_folds_store_gives_each_member_from_its_own_position():
    # fold 1's members: b plain, b mirror, a plain, a mirror, c plain, c mirror, ensemble; fold 0 holds them as
    # a plain 0, a mirror 1, b plain 2, b mirror 3, c plain 4, c mirror 5, ensemble 6
    assert donor_order(FOLD1, FOLD0) == [2, 3, 0, 1, 4, 5, 6]
    assert donor_order(FOLD0, FOLD0) == list(range(7))
    assert member_keys(FOLD0)[1] == ("pass", "a", (0,)) and member_keys(FOLD0)[-1] == ("ensemble",)


def test_only_the_same_computation_qualifies():
    assert donor_order(FOLD1, fold_manifest("a", ["b", "d"])) is None  # another network
    assert donor_order(FOLD1, fold_manifest("a", ["b"])) is None  # fewer networks: another ensemble
    assert donor_order(FOLD1, fold_manifest("a", ["b", "c"], tile_step_size=0.25)) is None
    assert donor_order(FOLD1, {**FOLD0, "configuration": "3d_lowres"}) is None
    assert donor_order(FOLD1, {**FOLD0, "format_version": 2}) is None
    # a member that is not a pass of a named network (a dropout draw, a threshold of the base's own plain pass)
    for member in ({"source": "dropout", "dropout_p": 0.2}, {"source": "threshold", "threshold": 0.3}):
        drawn = {**FOLD0, "members": [*FOLD0["members"][:-1], {"network_index": 0, "flip_axes": [], **member}]}
        assert member_keys(drawn) is None and donor_order(drawn, drawn) is None


def test_donors_are_the_stores_beside_and_the_sibling_folds_default_stores(tmp_path):
    def store(folder: Path, manifest: dict) -> Path:
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    named = tmp_path / "named"
    fold0, fold1 = store(named / "fold0", FOLD0), named / "fold1"
    store(named / "other_settings", fold_manifest("a", ["b", "c"], tile_step_size=0.25))
    (named / "not_a_store").mkdir()
    assert donor_folders(fold1) == [fold0, named / "other_settings"]
    assert find_donors(fold1, FOLD1) == [(fold0, [2, 3, 0, 1, 4, 5, 6])]
    # nnU-Net's layout: rndpo_proposals/<plans>__<config>/fold_<F>/<model>__fold_<F>__checkpoint_final
    default = tmp_path / "rndpo_proposals" / "nnUNetPlans__3d_fullres"
    sibling = store(default / "fold_0" / "Trainer__fold_0__checkpoint_final", FOLD0)
    own = default / "fold_1" / "Trainer__fold_1__checkpoint_final"
    assert donor_folders(own) == [sibling]
    assert find_donors(own, {**FOLD1, "checkpoint_sha256": "z"}) == []  # not the same passes


@pytest.mark.slow
def test_the_second_folds_store_copies_every_case_from_the_first(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, tmp_path
):
    """Two fold models of one trainer folder, each fine-tuned with the other's members: the second store copies
    the first's cases, its members reordered, and they are the proposals it would have computed."""
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.proposals.model import load_model
    from nnunet_rndpo.proposals.plan import ProposalSettings, available_members
    from nnunet_rndpo.proposals.pool import validation_pool
    from nnunet_rndpo.proposals.run import generate_proposals, with_other_folds

    folder = tmp_path / "TwoFold__nnUNetPlans__tiny"
    for fold in (0, 1):
        (folder / f"fold_{fold}").mkdir(parents=True)
    shutil.copy(base_checkpoint, folder / "fold_0" / base_checkpoint.name)
    checkpoint = torch.load(base_checkpoint, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    for name, weights in checkpoint["network_weights"].items():  # another model: the same weights, perturbed
        if weights.is_floating_point():
            checkpoint["network_weights"][name] = weights + 0.05 * torch.randn(weights.shape, generator=generator)
    torch.save(checkpoint, folder / "fold_1" / base_checkpoint.name)

    location = locate(preprocessed_synthetic.dataset_id, tiny_configuration, 0)
    pool = validation_pool(location, location.fold_split(0)[1][:1])
    models = [load_model(folder / f"fold_{fold}" / base_checkpoint.name) for fold in (0, 1)]
    # every pass of both models and their ensemble, as the folds recipe asks: each store holds the same members
    every_member = ProposalSettings(sources=("tta", "checkpoint", "checkpoint_tta", "ensemble"), other_folds=True)
    every_member = with_other_folds(every_member, models[0].checkpoint_path)
    count = len(available_members(every_member, models[0].proposal_mirror_axes, 10**6))
    settings = replace(every_member, num_proposals=count, extra_checkpoints=())
    first, made = generate_proposals(models[0], pool, tmp_path / "stores" / "fold0", settings, progress=False)
    second, copied = generate_proposals(models[1], pool, tmp_path / "stores" / "fold1", settings, progress=False)
    fresh, computed = generate_proposals(models[1], pool, tmp_path / "elsewhere" / "fold1", settings, progress=False)
    assert (made.cases_generated, copied.cases_copied, copied.cases_generated) == (1, 1, 0)
    assert (computed.cases_generated, computed.cases_copied) == (1, 0)
    assert "1 copied from a store of the same passes" in copied.describe()
    # fewer members (fold 1's own mirrors, not fold 0's) are other passes: nothing to take
    fewer = {**second.manifest(), "members": second.manifest()["members"][:3]}
    assert find_donors(second.folder, fewer) == []
    assert second.manifest()["members"] == fresh.manifest()["members"]
    order = donor_order(second.manifest(), first.manifest())
    assert order != list(range(len(order)))  # fold 1's own passes first: a real reordering
    for case_id in pool.case_ids:
        taken, computed_case = second.load_case(case_id), fresh.load_case(case_id)
        passes = [index for index, member in enumerate(second.manifest()["members"]) if member["source"] != "ensemble"]
        assert np.array_equal(taken["proposals"][passes], computed_case["proposals"][passes])
        # the ensemble averages the same passes in another order: equal but for near-ties
        assert np.mean(taken["proposals"] == computed_case["proposals"]) > 0.999
        np.testing.assert_allclose(
            taken["mean_probabilities"].astype(np.float32),
            computed_case["mean_probabilities"].astype(np.float32),
            atol=2e-3,
        )
