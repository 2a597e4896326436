"""The README's user block, run as a user pastes it, on real Hippocampus cases with a tiny schedule.

The block runs in bash exactly as the README writes it, but for two lines a user would also change for a first try:
the base is trained for a few iterations (in this process, as nnUNetv2_train would: its 1,000 epochs are the user's
own, not this package's), and the settings file holds a tiny schedule instead of `nnunet_rndpo settings --example`;
nnU-Net's own commands get `-device cpu` (this machine has no GPU).
Every other line (plan and preprocess, env, audit, the fine-tuning with nnUNetv2_train, compare, nnUNetv2_predict)
is the README's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, _copy_hippocampus_cases, shared_hippocampus_folder

DATASET_ID = 908
BASE_LINE = "nnUNetv2_train $DATASET $CONFIG $FOLD"
SETTINGS_LINE = "nnunet_rndpo settings --example > rndpo_settings.json"
TINY_SCHEDULE = {"num_epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1}


def readme_block() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## From your nnU-Net dataset") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return block.splitlines()


def on_the_cpu(line: str) -> str:
    command, _, comment = line.partition("#")
    if command.strip().startswith(("nnUNetv2_train", "nnUNetv2_predict")):
        return f"{command.rstrip()} -device cpu  #{comment}" if comment else f"{command.rstrip()} -device cpu"
    return line


def test_the_user_block_holds_the_lines_this_test_replaces():
    lines = [line.split("#")[0].strip() for line in readme_block()]
    assert lines[0].startswith("DATASET=") and BASE_LINE in lines and SETTINGS_LINE in lines
    assert any(line.startswith("nnUNetv2_train $DATASET $CONFIG $FOLD -tr nnUNetTrainerRNDPO") for line in lines)
    assert any(line.startswith("nnunet_rndpo compare") for line in lines)


@pytest.mark.slow
def test_the_readme_block_runs_end_to_end_on_hippocampus(tmp_path):
    from nnunet_rndpo.demo import nnunet_steps

    source = shared_hippocampus_folder()
    if source is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Dataset004_Hippocampus not found and CI=true requires the real-data tests")
        pytest.skip("Dataset004_Hippocampus not found")
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (source / "imagesTr").glob("*_0000.nii.gz"))
    labeled, unlabeled, test = cases[20:26], cases[26:29], cases[29:31]
    raw = Path(os.environ["nnUNet_raw"]) / f"Dataset{DATASET_ID}_ReadmeHippocampus"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(Path(os.environ["nnUNet_preprocessed"]) / raw.name, ignore_errors=True)
    shutil.rmtree(Path(os.environ["nnUNet_results"]) / raw.name, ignore_errors=True)
    _copy_hippocampus_cases(source, raw, labeled)
    for folder, names in (("imagesUnlabeled", unlabeled), ("inputs", test)):
        (raw / folder).mkdir()
        for case in names:
            shutil.copyfile(source / "imagesTr" / f"{case}_0000.nii.gz", raw / folder / f"{case}_0000.nii.gz")

    lines = readme_block()
    lines[0] = f"DATASET={DATASET_ID} CONFIG=3d_fullres FOLD=0"
    split = next(index for index, line in enumerate(lines) if line.split("#")[0].strip() == BASE_LINE)
    first, rest = lines[:split], lines[split + 1 :]
    settings = tmp_path / "tiny_schedule.json"
    settings.write_text(json.dumps(TINY_SCHEDULE))
    rest = [f"cp {settings} rndpo_settings.json" if line.strip().startswith(SETTINGS_LINE) else line for line in rest]
    rest = [line.replace("INPUT_FOLDER", str(raw / "inputs")).replace("OUTPUT_FOLDER", "predictions") for line in rest]
    # nnU-Net's own commands default to a GPU; this machine has none (the package's commands pick the CPU themselves)
    rest = [on_the_cpu(line) for line in rest]
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "nnUNet_extTrainer": "",  # the block's `eval "$(nnunet_rndpo env)"` sets it
    }
    environment.pop("RNDPO_SETTINGS", None)
    environment.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planner refuses 0; the user's shell has it unset

    def bash(script: list[str]) -> str:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(script)],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return result.stdout

    bash(first)  # plan and preprocess
    # the base: nnUNetTrainer for a few iterations, where nnUNetv2_train puts it
    nnunet_steps.train_supervised(
        DATASET_ID, "3d_fullres", 0, num_epochs=1, iterations_per_epoch=5, val_iterations=1, seed=0, device="cpu"
    )
    printed = bash([lines[0], *rest])
    assert "recommendation: judge=" in printed  # the audit
    assert "difference (points)" in printed and "mean" in printed  # compare
    fine_tuned = (
        Path(os.environ["nnUNet_results"]) / raw.name / "nnUNetTrainerRNDPO__nnUNetPlans__3d_fullres" / "fold_0"
    )
    summary = json.loads((fine_tuned / "rndpo_summary.json").read_text())
    assert summary["recipe"].startswith("recipe 'single_model' (auto)")  # one model, an unlabeled pool: the atlas
    assert json.loads((fine_tuned / "rndpo_settings.json").read_text())["settings"]["judge"] == "atlas"
    assert sorted(p.name for p in (tmp_path / "predictions").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in test]
