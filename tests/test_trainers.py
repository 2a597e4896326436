"""The trainers end to end on the tiny synthetic configuration (CPU): in-process runs of each objective, the
real nnUNetv2_train / nnUNetv2_predict entry points, resume with --c, and failures at start."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_rndpo.training import trainers as named
from nnunet_rndpo.training.losses import preference_loss_over_scales
from nnunet_rndpo.training.pair_data import TrainingItem
from nnunet_rndpo.training.settings import SETTINGS_ENV_VARIABLE, SettingsError

BIN = Path(sys.executable).parent


# The tests' short schedule, given as a user gives settings: the RNDPO_SETTINGS file (no test-only trainer ships).
# recipe none: the plain defaults (agreement judge), fast on the synthetic data; the recipes are tested on their own.
TINY = {"num_epochs": 2, "iterations_per_epoch": 4, "val_iterations_per_epoch": 2, "recipe": "none"}


# In-process runs use their own class names, so their output folders never collide with the subprocess runs.
class InProcessRNDPO(named.nnUNetTrainerRNDPO):
    pass


class InProcessDPO(named.nnUNetTrainerDPO):
    pass


class InProcessSelfTrain(named.nnUNetTrainerSelfTrain):
    pass


def make_trainer(trainer_class, dataset, configuration: str):
    plans = json.loads(dataset.plans_file.read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((dataset.preprocessed_folder / "dataset.json").read_text())
    return trainer_class(plans, configuration, 0, dataset_json, torch.device("cpu"))


def write_settings(tmp_path: Path, **settings) -> Path:
    """An RNDPO_SETTINGS file: the tiny schedule and `settings`."""
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**TINY, **settings}))
    return path


@pytest.fixture
def settings_file(tmp_path, monkeypatch, base_checkpoint):
    """RNDPO_SETTINGS pointing at a JSON; the tests add their keys."""

    def make(**settings):
        path = write_settings(tmp_path, **settings)
        monkeypatch.setenv(SETTINGS_ENV_VARIABLE, str(path))
        return path

    return make


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer_class, objective",
    [(InProcessRNDPO, "rn_dpo"), (InProcessDPO, "dpo"), (InProcessSelfTrain, "self_train")],
)
def test_each_trainer_runs_in_process(
    trainer_class, objective, preprocessed_synthetic, tiny_configuration, base_checkpoint, settings_file
):
    settings_file()
    trainer = make_trainer(trainer_class, preprocessed_synthetic, tiny_configuration)
    statistics_at_checkpoint = []  # (epoch, epochs in rndpo_statistics.json) as each checkpoint_latest.pth is written
    save_checkpoint = trainer.save_checkpoint

    def watched_save_checkpoint(filename):
        if filename.endswith("checkpoint_latest.pth"):
            path = Path(trainer.output_folder) / "rndpo_statistics.json"
            history = json.loads(path.read_text())["history"] if path.is_file() else {}
            statistics_at_checkpoint.append((trainer.current_epoch, len(next(iter(history.values()), []))))
        save_checkpoint(filename)

    trainer.save_checkpoint = watched_save_checkpoint
    trainer.run_training()
    output = Path(trainer.output_folder)
    assert (output / "checkpoint_final.pth").is_file()
    written = json.loads((output / "rndpo_settings.json").read_text())
    assert written["settings"]["objective"] == objective
    assert written["settings"]["num_epochs"] == 2 and written["trainer"] == trainer_class.__name__
    pairs = json.loads((output / "rndpo_pairs.json").read_text())
    assert pairs["items"], "the synthetic pool must give training items"
    assert "agreement" in pairs["judge"]
    assert len(trainer.logger.get_value("mean_fg_dice", step=None)) == 2
    # nnU-Net's logger holds its own keys only; ours are in rndpo_statistics.json, one value per epoch
    statistics = json.loads((output / "rndpo_statistics.json").read_text())["history"]
    assert statistics == trainer.statistics.history
    # validate_base (default): the base was validated before epoch 0 and saved as the first best checkpoint
    assert isinstance(trainer.base_pseudo_dice, float) and (output / "checkpoint_best.pth").is_file()
    summary = json.loads((output / "rndpo_summary.json").read_text())
    assert summary["pairs"]["pairs"] == len(pairs["items"]) and summary["pseudo_dice"]["epochs"] == 2
    assert summary["pseudo_dice"]["base"] == trainer.base_pseudo_dice and summary["final_checkpoint"] == "last"
    # the start phase of a trainer that reuses prepared pairs rounds to 0.0 s: the key is what is asserted
    assert summary["recipe"].startswith("recipe 'none'") and summary["seconds"]["start_phase_s"] >= 0
    assert "summary of the run:" in Path(trainer.log_file).read_text()
    if objective == "self_train":
        assert trainer.reference is None
        assert all(item["chosen"] == item["rejected"] for item in pairs["items"])
        assert statistics == {}
    else:
        assert len(statistics["rewards/margins"]) == 2 and all(np.isfinite(statistics["rewards/margins"]))
        # an epoch's statistics are on disk before its checkpoint: a run killed between the two resumes with both
        assert statistics_at_checkpoint == [(0, 1)]
        assert all(0.0 <= a <= 1.0 for a in statistics["rewards/accuracies"])
        assert (output / "progress_preference.png").stat().st_size > 0
        # the reference is frozen: still the base checkpoint's weights after training
        base = torch.load(base_checkpoint, map_location="cpu", weights_only=False)["network_weights"]
        for name, value in trainer.reference.state_dict().items():
            assert torch.equal(value, base[name]), name
        assert not any(p.requires_grad for p in trainer.reference.parameters())
        # and the policy moved away from it
        policy = trainer.network.state_dict()
        assert any(not torch.equal(policy[name], base[name]) for name in base)


def test_named_trainers_differ_only_by_settings():
    for trainer_class in (named.nnUNetTrainerRNDPO, named.nnUNetTrainerDPO, named.nnUNetTrainerSelfTrain):
        assert trainer_class.__mro__[1] is named.nnUNetTrainerPreference
        assert set(vars(trainer_class)) <= {
            "settings_overrides",
            "__doc__",
            "__module__",
            "__qualname__",
            "__firstlineno__",
            "__static_attributes__",
            "__annotations__",
        }
    assert named.nnUNetTrainerRNDPO.settings_overrides["objective"] == "rn_dpo"
    assert named.nnUNetTrainerDPO.settings_overrides["objective"] == "dpo"
    assert named.nnUNetTrainerSelfTrain.settings_overrides["objective"] == "self_train"


@pytest.mark.slow
def test_wrong_setting_fails_at_start_with_valid_names(preprocessed_synthetic, tiny_configuration, settings_file):
    settings_file(objectiv="rn_dpo")
    with pytest.raises(SettingsError, match="unknown setting.*objectiv.*valid:.*objective"):
        make_trainer(named.nnUNetTrainerRNDPO, preprocessed_synthetic, tiny_configuration)
    settings_file(mining="best_worst")
    with pytest.raises(SettingsError, match="mining='best_worst'.*top_bottom"):
        make_trainer(named.nnUNetTrainerRNDPO, preprocessed_synthetic, tiny_configuration)
    settings_file(judge="crystal_ball")
    with pytest.raises(SettingsError, match="agreement"):
        make_trainer(named.nnUNetTrainerRNDPO, preprocessed_synthetic, tiny_configuration)


@pytest.mark.slow
def test_missing_base_checkpoint_fails_at_start(preprocessed_synthetic, tiny_configuration, settings_file, tmp_path):
    missing = tmp_path / "nowhere" / "checkpoint_final.pth"
    settings_file(base_checkpoint=str(missing))
    trainer = make_trainer(InProcessRNDPO, preprocessed_synthetic, tiny_configuration)
    from nnunet_rndpo.proposals.model import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        trainer.run_training()


@pytest.mark.slow
def test_checkpoint_of_another_configuration_fails_at_start(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, settings_file
):
    from nnunet_rndpo.demo import nnunet_steps
    from nnunet_rndpo.proposals.model import CheckpointError

    nnunet_steps.add_configuration(
        preprocessed_synthetic.dataset_id,
        "3d_tiny_wide",
        patch_size=(32, 32, 32),
        batch_size=2,
        features_per_stage=(16, 32, 64),
    )
    settings_file(base_checkpoint=str(base_checkpoint))
    trainer = make_trainer(InProcessRNDPO, preprocessed_synthetic, "3d_tiny_wide")
    with pytest.raises(CheckpointError, match=r"trained for another setting: configuration '3d_tiny'"):
        trainer.run_training()


@pytest.mark.slow
def test_empty_pool_fails_at_start(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, settings_file, tmp_path, monkeypatch
):
    from nnunet_rndpo.proposals.pool import PoolError

    raw_copy = tmp_path / "raw" / preprocessed_synthetic.name
    (raw_copy / "imagesUnlabeled").mkdir(parents=True)
    shutil.copy(preprocessed_synthetic.raw_folder / "dataset.json", raw_copy / "dataset.json")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))  # nnunetv2 2.8 reads its paths at use
    settings_file(base_checkpoint=str(base_checkpoint))
    trainer = make_trainer(InProcessRNDPO, preprocessed_synthetic, tiny_configuration)
    with pytest.raises(PoolError, match="imagesUnlabeled is empty"):
        trainer.run_training()


def test_loss_finite_when_every_pair_has_empty_disagreement():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 3, 8, 8, 8, requires_grad=True), torch.randn(2, 3, 4, 4, 4, requires_grad=True)]
    references = [o.detach() + 0.1 for o in outputs]
    masks = [torch.randint(0, 3, (2, 1) + o.shape[2:]) for o in outputs]
    targets = [torch.cat([m, m], dim=1) for m in masks]  # chosen == rejected everywhere
    for loss_type in ("rn_dpo", "dpo", "mean", "ipo"):
        loss, statistics = preference_loss_over_scales(
            outputs, references, targets, [0.67, 0.33], loss_type=loss_type, beta=1.0
        )
        loss.backward()
        assert torch.isfinite(loss) and loss.item() == 0.0
        assert float(statistics["pairs/skipped_fraction"]) == 1.0
        assert all(torch.isfinite(o.grad).all() and (o.grad == 0).all() for o in outputs)


def _environment(**extra) -> dict:
    environment = dict(os.environ)
    environment.update({k: str(v) for k, v in extra.items()})
    return environment


@pytest.mark.slow
def test_real_nnunetv2_train_and_predict_entry_points_with_resume(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, tmp_path
):
    """nnUNetv2_train -tr nnUNetTrainerRNDPO finds our class (nnUNet_extTrainer from conftest), trains,
    validates; nnUNetv2_predict loads the checkpoint; --c resumes with the same pairs and no new proposals."""
    dataset_id = str(preprocessed_synthetic.dataset_id)
    settings = write_settings(tmp_path, base_checkpoint=str(base_checkpoint), num_epochs=2)
    environment = _environment(**{SETTINGS_ENV_VARIABLE: settings, "nnUNet_def_n_proc": 1})
    command = [
        str(BIN / "nnUNetv2_train"),
        dataset_id,
        tiny_configuration,
        "0",
        "-tr",
        "nnUNetTrainerRNDPO",
        "-device",
        "cpu",
    ]
    first = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    output = (
        Path(os.environ["nnUNet_results"])
        / preprocessed_synthetic.name
        / f"nnUNetTrainerRNDPO__nnUNetPlans__{tiny_configuration}"
        / "fold_0"
    )
    assert (output / "checkpoint_final.pth").is_file()
    assert "Mean Validation Dice" in first.stdout
    pairs_before = (output / "rndpo_pairs.json").read_text()

    prediction = tmp_path / "predictions"
    predict = subprocess.run(
        [
            str(BIN / "nnUNetv2_predict"),
            "-i",
            str(preprocessed_synthetic.raw_folder / "imagesTs"),
            "-o",
            str(prediction),
            "-d",
            dataset_id,
            "-c",
            tiny_configuration,
            "-f",
            "0",
            "-tr",
            "nnUNetTrainerRNDPO",
            "-device",
            "cpu",
            "--disable_tta",
            "-npp",
            "1",
            "-nps",
            "1",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    assert len(list(prediction.glob("*.nii.gz"))) == 3

    # resume for one more epoch: no proposal regenerated, same pairs
    write_settings(tmp_path, base_checkpoint=str(base_checkpoint), num_epochs=3)
    resumed = subprocess.run(command + ["--c"], env=environment, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "0 generated" in resumed.stdout
    assert (output / "rndpo_pairs.json").read_text() == pairs_before
    assert re.search(r": Epoch 2$", resumed.stdout, re.M) and not re.search(r": Epoch [01]$", resumed.stdout, re.M)

    # the fine-tuned model against its base on the fold's validation cases, as the README's block runs it
    compare_folder = tmp_path / "compare"
    compared = subprocess.run(
        [
            str(BIN / "nnunet_rndpo"),
            "compare",
            "-d",
            dataset_id,
            "-c",
            tiny_configuration,
            "-f",
            "0",
            "-device",
            "cpu",
            "--disable_tta",
            "-o",
            str(compare_folder),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert compared.returncode == 0, compared.stdout[-3000:] + compared.stderr[-3000:]
    report = json.loads((compare_folder / "compare.json").read_text())
    validation = json.loads((preprocessed_synthetic.preprocessed_folder / "splits_final.json").read_text())[0]["val"]
    assert report["num_cases"] == len(validation) and set(report["per_case"]["base"]) == set(validation)
    assert set(report["classes"]) == {"organ", "lesion", "mean"}
    mean = report["classes"]["mean"]
    assert mean["difference"]["cases"] == len(validation)
    assert mean["fine_tuned"] - mean["base"] == pytest.approx(mean["difference"]["mean"])
    assert "difference (points)" in compared.stdout and "organ" in compared.stdout


@pytest.mark.slow
def test_export_predicts_without_our_package_on_nnunets_path(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, tmp_path, settings_file
):
    from nnunet_rndpo.cli import main

    settings_file()
    trainer = make_trainer(InProcessRNDPO, preprocessed_synthetic, tiny_configuration)
    if not (Path(trainer.output_folder) / "checkpoint_final.pth").is_file():
        trainer.run_training()
    exported = tmp_path / "exported"
    assert (
        main(
            [
                "export",
                "-d",
                str(preprocessed_synthetic.dataset_id),
                "-c",
                tiny_configuration,
                "-tr",
                "InProcessRNDPO",
                "-o",
                str(exported),
            ]
        )
        == 0
    )
    checkpoint = torch.load(exported / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    environment = _environment()
    environment.pop("nnUNet_extTrainer", None)
    prediction = tmp_path / "predictions"
    result = subprocess.run(
        [
            str(BIN / "nnUNetv2_predict_from_modelfolder"),
            "-i",
            str(preprocessed_synthetic.raw_folder / "imagesTs"),
            "-o",
            str(prediction),
            "-m",
            str(exported),
            "-f",
            "0",
            "-device",
            "cpu",
            "--disable_tta",
            "-npp",
            "1",
            "-nps",
            "1",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list(prediction.glob("*.nii.gz"))) == 3


def test_removed_precomputed_reference_says_what_to_use():
    from nnunet_rndpo.training.settings import resolve_settings

    with pytest.raises(SettingsError, match=r"setting 'reference' .*was removed: the frozen reference always runs"):
        resolve_settings({"reference": "precomputed"}, environ={})
    with pytest.raises(SettingsError, match="final_checkpoint='first'.*last, best"):
        resolve_settings({"final_checkpoint": "first"}, environ={})
    with pytest.raises(SettingsError, match="warmup_iterations"):
        resolve_settings({"warmup_iterations": -1}, environ={})
    with pytest.raises(SettingsError, match="target_margin"):
        resolve_settings({"target_margin": -0.5}, environ={})


def test_warmup_learning_rate_is_linear_then_the_schedules():
    assert [named.warmup_learning_rate(1.0, i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert named.warmup_learning_rate(0.3, 0, 0) == 0.3


def _started(trainer_class, dataset, configuration):
    trainer = make_trainer(trainer_class, dataset, configuration)
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return trainer


@pytest.mark.slow
def test_ranked_consensus_trains_on_the_narrowed_pairs(
    preprocessed_synthetic, tiny_configuration, settings_file, tmp_path
):
    """preference_region ranked_consensus end to end at the trainer's start: the pairs file names the judge's
    halves, the loader's rejected channel is the narrowed mask, and a step runs on it. (The same start checks
    `proposal_store`: the proposals go to the folder given, not to the default store.)"""
    from nnunet_rndpo.preference_region import preference_rejected

    class ConsensusRNDPO(named.nnUNetTrainerRNDPO):
        pass

    own_store = tmp_path / "proposals_of_this_run"
    settings_file(validate_base=False, preference_region="ranked_consensus", proposal_store=str(own_store))
    trainer = _started(ConsensusRNDPO, preprocessed_synthetic, tiny_configuration)
    try:
        store, pool = trainer.prepared.store, trainer.prepared.pool
        assert store.folder == own_store and (own_store / "manifest.json").is_file()
        assert sorted(p.stem for p in (own_store / "cases").glob("*.npz")) == sorted(pool.case_ids)
        pairs = json.loads((Path(trainer.output_folder) / "rndpo_pairs.json").read_text())
        assert pairs["summary"]["preference_region"] == "ranked_consensus"
        assert all(item["top_half"] and item["bottom_half"] for item in pairs["items"])
        assert all(item["preference_voxels"] <= item["disagreement_voxels"] for item in pairs["items"])
        assert any(item["preference_voxels"] < item["disagreement_voxels"] for item in pairs["items"]), (
            "the synthetic pool's pairs should lose some voxels to the consensus"
        )
        item = TrainingItem.from_record(trainer.prepared.items[0])
        proposals = store.load_case(item.case_id)["proposals"]
        narrowed = preference_rejected(
            proposals, item.chosen, item.rejected, item.region, item.top_half, item.bottom_half
        )
        trainer.train_step(next(trainer.dataloader_train))
        assert np.isfinite(trainer.statistics.epoch_means()["rewards/margins"])
        assert np.count_nonzero(narrowed != proposals[item.chosen]) == pairs["items"][0]["preference_voxels"]
    finally:
        trainer.on_train_end()


@pytest.mark.slow
@pytest.mark.parametrize("deep_supervision", ("all_scales", "full_resolution"))
def test_margin_is_zero_at_the_first_step_at_every_scale(
    deep_supervision, preprocessed_synthetic, tiny_configuration, base_checkpoint, settings_file
):
    """The reference is exact: on the first (augmented) batch, policy == reference at every output scale, so
    every pair's margin is 0, and so are the logged margins of that step."""
    from nnunet_rndpo.objectives import pair_log_ratios

    class FirstStepRNDPO(named.nnUNetTrainerRNDPO):
        pass

    settings_file(validate_base=False, deep_supervision=deep_supervision)
    trainer = _started(FirstStepRNDPO, preprocessed_synthetic, tiny_configuration)
    try:
        batch = next(trainer.dataloader_train)
        data, targets = batch["data"], batch["target"]
        assert isinstance(targets, list) and len(targets) > 1
        policy = trainer.network(data)
        reference_network = copy.deepcopy(trainer.reference.network)
        reference_network.decoder.deep_supervision = True  # every scale, also those the loss leaves out
        with torch.inference_mode():
            reference = reference_network(data)
        assert len(policy) == len(reference) == len(targets)
        # the reference runs its lower-resolution heads only when the loss uses them
        lower_scales_used = any(weight != 0 for weight in trainer.loss.scale_weights[1:])
        assert lower_scales_used == (deep_supervision == "all_scales" and len(targets) > 2)
        assert trainer.reference.network.decoder.deep_supervision == lower_scales_used
        for scale, (p, r, masks) in enumerate(zip(policy, reference, targets)):
            ratios = pair_log_ratios(p, r, masks[:, :1], masks[:, 1:2])
            assert ratios.disagreement_voxels.sum() > 0 or scale > 0
            assert torch.allclose(ratios.margin, torch.zeros_like(ratios.margin), atol=1e-4), scale
            assert torch.allclose(ratios.chosen, torch.zeros_like(ratios.chosen), atol=1e-4), scale
        # the reference's terms, as the step computes them, at every scale the loss weights
        terms = trainer.reference.terms(data, targets)
        assert [t is not None for t in terms] == [w != 0 for w in trainer.loss.scale_weights]
        for scale, (term, p, masks) in enumerate(zip(terms, policy, targets)):
            if term is not None:
                ratios = pair_log_ratios(
                    p, None, masks[:, :1], masks[:, 1:2], reference_voxel_ll=term, normalized=scale == 0
                )
                assert torch.allclose(ratios.margin, torch.zeros_like(ratios.margin), atol=1e-4), scale
        trainer.train_step(batch)
        statistics = trainer.statistics.epoch_means()
        assert statistics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert statistics["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    finally:
        trainer.on_train_end()


@pytest.mark.slow
def test_warmup_raises_the_learning_rate_linearly(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, settings_file
):
    class WarmupRNDPO(named.nnUNetTrainerRNDPO):
        pass

    settings_file(validate_base=False, warmup_iterations=3, initial_lr=0.01)
    trainer = _started(WarmupRNDPO, preprocessed_synthetic, tiny_configuration)
    try:
        seen = []
        for _ in range(4):
            trainer.train_step(next(trainer.dataloader_train))
            seen.append(trainer.optimizer.param_groups[0]["lr"])
        assert seen == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01])
    finally:
        trainer.on_train_end()


@pytest.mark.slow
def test_final_checkpoint_best_never_ends_below_the_validated_base(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, settings_file
):
    """An absurd learning rate ruins fine-tuning: the base, validated before epoch 0, stays the best, and
    final_checkpoint "best" makes it the final checkpoint."""

    class RuinedRNDPO(named.nnUNetTrainerRNDPO):
        pass

    settings_file(final_checkpoint="best", initial_lr=50.0)
    trainer = make_trainer(RuinedRNDPO, preprocessed_synthetic, tiny_configuration)
    trainer.run_training()
    output = Path(trainer.output_folder)
    base = torch.load(base_checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    best = torch.load(output / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    final = torch.load(output / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert best["_best_ema"] == pytest.approx(trainer.base_pseudo_dice)
    assert best["current_epoch"] == 0  # --c from the base's checkpoint starts at epoch 0
    assert len(trainer.logger.get_value("mean_fg_dice", step=None)) == 2  # the base's validation is not an epoch
    assert all(not (dice > trainer.base_pseudo_dice) for dice in trainer.logger.get_value("ema_fg_dice", step=None))
    assert all(torch.equal(final[name], base[name]) for name in base)
    summary = json.loads((output / "rndpo_summary.json").read_text())
    assert summary["final_checkpoint"] == "best (the base)"


@pytest.mark.slow
def test_prepare_before_training_then_the_trainer_only_reads_the_pairs(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, settings_file, monkeypatch
):
    """The two-step path: `nnunet_rndpo prepare` makes the proposals, the judge's scores and the pairs with the
    settings the trainer will resolve; the trainer's start then reads that pairs file: no judge, no scores."""
    from nnunet_rndpo import pipeline
    from nnunet_rndpo.cli import main

    settings_file(validate_base=False, mining="top_rest")
    arguments = ["-d", str(preprocessed_synthetic.dataset_id), "-c", tiny_configuration, "-f", "0"]
    assert main(["prepare", *arguments, "-tr", "nnUNetTrainerRNDPO", "-device", "cpu"]) == 0

    def not_again(*args, **kwargs):
        raise AssertionError("the trainer judged again instead of reading the prepared pairs")

    monkeypatch.setattr(pipeline, "ready_judge", not_again)
    monkeypatch.setattr(pipeline, "score_store", not_again)

    class PreparedRNDPO(named.nnUNetTrainerRNDPO):
        pass

    trainer = _started(PreparedRNDPO, preprocessed_synthetic, tiny_configuration)
    try:
        prepared_file = next(trainer.prepared.store.folder.glob("pairs/agreement*__top_rest/rndpo_pairs.json"))
        written = json.loads((Path(trainer.output_folder) / "rndpo_pairs.json").read_text())
        assert written == json.loads(prepared_file.read_text()) and trainer.prepared.judge is None
        assert written["summary"]["strategy"] == "top_rest"
        trainer.train_step(next(trainer.dataloader_train))
    finally:
        trainer.on_train_end()


@pytest.mark.slow
def test_a_checkpoint_cut_short_while_written_leaves_the_previous_one_whole(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, settings_file, tmp_path, monkeypatch
):
    settings_file()
    trainer = make_trainer(InProcessRNDPO, preprocessed_synthetic, tiny_configuration)
    trainer.initialize()
    target = tmp_path / "output" / "checkpoint_latest.pth"
    target.parent.mkdir()
    trainer.save_checkpoint(str(target))
    before = target.read_bytes()
    assert torch.load(target, map_location="cpu", weights_only=False)["trainer_name"] == "InProcessRNDPO"

    def stopped_while_writing(checkpoint, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # docker stop reaches the training as SIGINT

    monkeypatch.setattr(torch, "save", stopped_while_writing)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(target))
    assert target.read_bytes() == before and [p.name for p in target.parent.iterdir()] == [target.name]
