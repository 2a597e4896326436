"""The command line as an nnU-Net user types it: nnU-Net's spellings, the device default, help with defaults, `env`,
`settings`, `export -f`; the recipes and the settings table the CLI and the README are made from."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_rndpo.cli import build_parser, main, resolve_device
from nnunet_rndpo.nnunet_env import export_lines
from nnunet_rndpo.training.recipes import SINGLE_MODEL, Situation, choose_recipe
from nnunet_rndpo.training.settings import PreferenceSettings, SettingsError, resolve_settings

RUN = ["-d", "4", "-c", "3d_fullres", "-f", "0"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("spelling", ["-device", "--device"])
def test_nnunet_spellings_of_device_and_parts(spelling):
    parser = build_parser()
    args = parser.parse_args(["propose", *RUN, spelling, "cpu", "-part_id", "1", "-num_parts", "3"])
    assert (args.device, args.part_id, args.num_parts) == ("cpu", 1, 3)
    args = parser.parse_args(["prepare", *RUN, "--part_id", "0", "--num_parts", "2", "-tr", "nnUNetTrainerDPO"])
    assert (args.part_id, args.num_parts, args.trainer) == (0, 2, "nnUNetTrainerDPO")
    with pytest.raises(SystemExit):
        parser.parse_args(["propose", *RUN, spelling, "tpu"])


def test_device_defaults_to_cuda_when_available_else_cpu(monkeypatch):
    import torch

    assert build_parser().parse_args(["audit", *RUN]).device is None  # resolved after parsing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    assert resolve_device("mps") == "mps"


def test_every_flag_has_help_that_states_its_default():
    for name, sub in subcommands(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            if not action.required and action.default is not None and not isinstance(action, argparse._StoreTrueAction):
                assert "default" in action.help, f"{name} {action.option_strings}: help does not say its default"


def test_flags_made_from_the_settings_carry_their_one_default():
    from nnunet_rndpo.proposals.plan import ProposalSettings

    args = build_parser().parse_args(["audit", *RUN])
    assert args.num_proposals == ProposalSettings().num_proposals and args.sources == list(ProposalSettings().sources)
    assert args.mining_margin == PreferenceSettings().mining_margin
    assert build_parser().parse_args(["audit", *RUN, "-k", "4", "--margin", "0.1"]).num_proposals == 4
    assert build_parser().parse_args(["judge", *RUN, "--margin", "0.1"]).mining_margin == 0.1


def test_env_prints_unset_folders_as_comments_never_as_exports():
    lines = export_lines({"nnUNet_raw": "/data/raw"})
    exports = [line for line in lines if line.startswith("export ")]
    assert len(exports) == 1 and exports[0].startswith("export nnUNet_extTrainer=")
    comments = [line for line in lines if line.startswith("#")]
    assert [re.match(r"# (\w+) is not set", line)[1] for line in comments] == ["nnUNet_preprocessed", "nnUNet_results"]
    # eval'd by a shell, the comments set nothing
    environment = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    script = "\n".join(lines) + '\necho "${nnUNet_preprocessed:-unset}"'
    result = subprocess.run(["bash", "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "unset"


def test_settings_prints_the_table_and_a_valid_example(capsys, tmp_path):
    from nnunet_rndpo.training.settings_table import settings_table

    assert main(["settings"]) == 0
    assert capsys.readouterr().out.strip() == settings_table()
    assert main(["settings", "--example"]) == 0
    example = tmp_path / "rndpo_settings.json"
    example.write_text(capsys.readouterr().out)
    settings, sources = resolve_settings({}, environ={"RNDPO_SETTINGS": str(example)})
    assert settings.num_epochs == json.loads(example.read_text())["num_epochs"] and str(example) in sources


def test_help_runs_without_nnunet_folders():
    environment = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    result = subprocess.run(
        [sys.executable, "-m", "nnunet_rndpo.cli", "compare", "--help"], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0 and "-device" in result.stdout and "-i IMAGES" in result.stdout


def test_export_takes_nnunets_fold_flag(tmp_path, capsys):
    from nnunet_rndpo.export import export_model_folder

    folder = tmp_path / "Trainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text("{}")
    args = build_parser().parse_args(["export", "-d", "4", "-c", "3d_fullres", "-f", "0", "all", "-o", "out"])
    assert args.folds == ["0", "all"]
    with pytest.raises(FileNotFoundError, match=r"has no fold_all; its folds: 0"):
        export_model_folder(folder, tmp_path / "exported", folds=["0", "all"])


# ------------------------------------------------------------------------------------------------ recipes
def test_auto_picks_the_folds_recipe_when_other_folds_are_trained():
    recipe = choose_recipe("auto", Situation(other_folds=4, pool_in_sample=False))
    assert recipe.name == "folds" and recipe.settings["proposals"]["num_proposals"] == 5 * 8 + 1
    assert recipe.settings["proposals"]["other_folds"] is True
    assert choose_recipe("auto", Situation(other_folds=1, pool_in_sample=True)).name == "folds"


def test_auto_picks_the_atlas_with_one_model_and_nothing_without_unlabeled_images():
    assert choose_recipe("auto", Situation(other_folds=0, pool_in_sample=False)).settings == SINGLE_MODEL.settings
    # the atlas learns from the labeled cases and would score memorised ones: the plain defaults
    assert choose_recipe("auto", Situation(other_folds=0, pool_in_sample=True)) is None
    assert choose_recipe("none", Situation(other_folds=4, pool_in_sample=False)) is None
    assert choose_recipe("single_model", Situation(other_folds=4, pool_in_sample=False)).name == "single_model"


def test_the_users_own_settings_win_over_the_recipe_key_by_key(tmp_path):
    file = tmp_path / "settings.json"
    file.write_text(json.dumps({"judge": "uncertainty", "proposals": {"num_proposals": 12}}))
    settings, sources = resolve_settings(
        {}, environ={"RNDPO_SETTINGS": str(file)}, situation=lambda given: Situation(4, False)
    )
    assert settings.judge == "uncertainty"  # the user's
    assert settings.proposals == {
        **choose_recipe("folds", Situation(4, False)).settings["proposals"],
        "num_proposals": 12,
    }
    assert settings.recipe == "auto" and any(
        "recipe 'folds' (auto)" in line and "Measured:" in line for line in sources
    )


def test_the_situation_is_not_read_for_recipe_none():
    def unreadable(given):
        raise AssertionError("recipe none reads no situation")

    settings, sources = resolve_settings({"recipe": "none"}, environ={}, situation=unreadable)
    assert settings.judge == PreferenceSettings().judge and "recipe 'none': the plain defaults" in sources


def test_settings_errors_name_the_setting_and_the_valid_values():
    with pytest.raises(SettingsError, match=r"setting recipe='best' is not valid; valid: auto, folds"):
        resolve_settings({"recipe": "best"}, environ={})
    with pytest.raises(SettingsError, match="setting rank_timeout_minutes .* must be > 0"):
        resolve_settings({"rank_timeout_minutes": 0}, environ={})
    with pytest.raises(SettingsError, match=r"setting num_epochs .* must be int, got 2.5"):
        resolve_settings({"num_epochs": 2.5}, environ={})


def test_readme_holds_the_generated_settings_table():
    from nnunet_rndpo.training.settings_table import settings_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert settings_table() in readme, "README's settings table differs from `nnunet_rndpo settings`: paste it"


def test_paired_difference_of_hand_made_cases():
    from nnunet_rndpo.compare import paired_difference

    base = {"a": 0.80, "b": 0.70, "c": 0.90, "d": float("nan")}
    tuned = {"a": 0.85, "b": 0.70, "c": 0.88, "d": 0.5, "e": 0.9}
    difference = paired_difference(base, tuned)  # d (no Dice in the base) and e (no base) are left out
    assert difference.cases == 3 and (difference.better, difference.worse) == (1, 1)
    assert difference.mean == pytest.approx((0.05 + 0.0 - 0.02) / 3)
    values = [0.05, 0.0, -0.02]
    mean = sum(values) / 3
    assert difference.standard_error == pytest.approx((sum((v - mean) ** 2 for v in values) / 2 / 3) ** 0.5)
