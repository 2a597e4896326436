"""`nnunet_rndpo demo --quick` as a user runs it: the story on one screen, the same figures on a rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nnunet_rndpo.demo.run import QUICK_WARNING, _duration, result_table


def run_quick_demo(output):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k != "RNDPO_SETTINGS"}
    return subprocess.run(
        [sys.executable, "-m", "nnunet_rndpo.cli", "demo", "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=1200,
    )


@pytest.mark.slow
def test_two_quick_runs_print_the_same_table_on_one_screen(tmp_path):
    runs = [run_quick_demo(tmp_path / f"run_{index}") for index in (1, 2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    tables = [run.stdout[run.stdout.index("Held-out test Dice") : run.stdout.index("\nTime:")] for run in runs]
    assert tables[0] == tables[1]
    reports = [json.loads((tmp_path / f"run_{index}" / "demo_results.json").read_text()) for index in (1, 2)]
    for name in ("base", "rn_dpo", "self_train"):
        assert round(reports[0]["results"][name]["foreground_mean"], 4) == round(
            reports[1]["results"][name]["foreground_mean"], 4
        )
    first = runs[0].stdout
    assert first.count(QUICK_WARNING) == 2  # before and after: its numbers mean nothing
    assert len(first.splitlines()) <= 40, "the story fits on one terminal page"
    assert "Epoch 0" not in first and "Epoch 0" in (tmp_path / "run_1" / "logs" / "base.log").read_text()
    assert "pairs from 20 cases" in first and set(reports[0]["phase_seconds"]) == {
        "data",
        "plan",
        "base",
        "proposals",
        "judge",
        "RN-DPO",
        "self-training",
        "test",
    }


def test_result_table_shows_each_model_against_the_base():
    result = {"num_cases": 2, "mean": {1: 0.5, 2: 0.25}, "foreground_mean": 0.375}
    better = {"num_cases": 2, "mean": {"1": 0.75, "2": 0.25}, "foreground_mean": 0.5}
    lines = result_table({"base": result, "rn_dpo": better}, {"background": 0, "organ": 1, "lesion": 2})
    assert lines[0].startswith("Held-out test Dice (2 cases")
    assert lines[2].split() == ["base", "0.5000", "0.2500", "0.3750"]
    assert lines[3].split() == ["RN-DPO", "0.7500", "0.2500", "0.5000", "+0.1250"]


def test_durations_read_as_a_person_would():
    assert _duration(4.4) == "4 s" and _duration(89.6) == "1 min 30 s" and _duration(419.6) == "7 min 00 s"
