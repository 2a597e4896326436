"""The pure parts of benchmarks/low_label.py: the split and the phase timings read from nnU-Net's log."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def low_label():
    from benchmarks import low_label

    return low_label


def _fake_dataset(folder: Path, cases: int) -> Path:
    (folder / "labelsTr").mkdir(parents=True)
    for index in range(cases):
        (folder / "labelsTr" / f"case_{index:03d}.nii.gz").write_bytes(b"")
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    return folder


def test_split_is_disjoint_complete_and_fixed_by_seed(low_label, tmp_path):
    data = _fake_dataset(tmp_path / "data", 30)
    split = low_label.make_split(data, seed=3, labeled=5, validation=4, unlabeled=12)
    parts = [set(split[name]) for name in ("labeled", "validation", "unlabeled", "test")]
    assert [len(p) for p in parts] == [5, 4, 12, 9]
    assert set().union(*parts) == {f"case_{i:03d}" for i in range(30)}
    assert sum(len(p) for p in parts) == 30  # no case in two parts
    assert low_label.make_split(data, seed=3, labeled=5, validation=4, unlabeled=12) == split
    assert low_label.make_split(data, seed=4, labeled=5, validation=4, unlabeled=12) != split


LOG = """
#######################################################################
2026-11-23 19:24:30.000000: policy initialised from the base checkpoint /x/checkpoint_final.pth
2026-11-23 19:24:36.500000: proposals: 120 cases (120 generated, 0 already in the store), 8 proposals each, 95.3 s (0.79 s per generated case)
2026-11-23 19:24:46.000000: training items: {"pairs": 120}; judge 'agreement'
2026-11-23 19:24:46.100000: Epoch 0
2026-11-23 19:29:46.000000: Epoch time: 34.14 s
2026-11-23 19:29:47.000000: Training done.
"""


def test_phase_seconds_reads_the_log_timestamps(low_label, tmp_path):
    (tmp_path / "training_log_2026_11_23_19_00_00.txt").write_text("an interrupted earlier run\n")
    (tmp_path / "training_log_2026_11_23_19_24_30.txt").write_text(LOG)
    phases = low_label.phase_seconds(tmp_path)
    assert phases["proposals_generated"] == 120
    assert phases["proposals_s"] == pytest.approx(95.3)
    assert phases["judging_s"] == pytest.approx(9.5)
    assert phases["fine_tuning_s"] == pytest.approx(301.0)


def test_phase_seconds_of_an_unfinished_run_is_empty(low_label, tmp_path):
    (tmp_path / "training_log_2026_11_23_19_24_30.txt").write_text(LOG.replace("Training done.", "Epoch 6"))
    assert low_label.phase_seconds(tmp_path) == {}


def test_runner_refuses_a_part_outside_the_parts(low_label, capsys):
    with pytest.raises(SystemExit):
        low_label.main(["--part_id", "1", "--num_parts", "1"])
    assert "--part_id 1" in capsys.readouterr().err


def _package_imports(path: Path):
    """Every `from nnunet_rndpo... import name` in a file, wherever it sits (benchmarks import inside functions)."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nnunet_rndpo"):
            for alias in node.names:
                yield node.module, alias.name, node.lineno


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_scripts_import_only_names_that_exist(script):
    # the benchmarks run by hand, rarely: a renamed or removed function must fail here, not an hour into a run
    import importlib

    missing = []
    for module_name, name, line in _package_imports(ROOT / "benchmarks" / script):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"{script}:{line}: {module_name}.{name}")
    assert not missing, missing


def test_an_arm_is_claimed_by_one_process_at_a_time(low_label, tmp_path):
    with low_label.claim(tmp_path, "rn_dpo_x_s0") as first:
        assert first and (tmp_path / "rn_dpo_x_s0.claim").read_text() == str(__import__("os").getpid())
        with low_label.claim(tmp_path, "rn_dpo_x_s0") as second:
            assert not second  # the holder (this process) is alive
    assert not (tmp_path / "rn_dpo_x_s0.claim").exists()


def test_a_claim_left_by_a_dead_process_is_taken_over(low_label, tmp_path):
    import subprocess
    import sys as system

    dead = subprocess.run(
        [system.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / "arm_s0.claim").write_text(dead)
    with low_label.claim(tmp_path, "arm_s0") as claimed:
        assert claimed


def test_datasets_are_prepared_by_one_part_at_a_time(low_label, tmp_path, monkeypatch):
    """A part that finds another part preparing waits for its claim to go, then prepares (finding the plans)."""
    import subprocess
    import sys as system
    import threading

    calls = []
    monkeypatch.setattr(low_label, "prepare", lambda work, data, seed, protocol: calls.append(work))
    preparing = subprocess.Popen([system.executable, "-c", "import time; time.sleep(1.5)"])
    reaper = threading.Thread(target=preparing.wait)  # reaped when it ends, so its pid is no longer alive
    reaper.start()
    (tmp_path / "prepare.claim").write_text(str(preparing.pid))
    low_label.prepare_once(tmp_path, tmp_path, 0, low_label.PROTOCOLS["v3"], poll_seconds=0.2)
    assert preparing.poll() is not None, "prepared while another part held the claim"
    reaper.join()
    assert calls == [tmp_path] and not (tmp_path / "prepare.claim").exists()


def test_protocol_v2_runs_the_sanity_gate_first_and_pairs_every_judge_with_self_training(low_label):
    arms = low_label.build_arms_v2("anatomy", ("agreement", "anatomy"))
    names = [arm.name for arm in arms]
    assert tuple(names[:4]) == low_label.GATE_ARMS
    assert len(names) == len(set(names))
    for arm in arms:
        if arm.kind == "rn_dpo":
            assert f"self_train_{arm.judge}_s{arm.seed}" in names, arm.name
        if arm.judge is not None:
            assert arm.judge in low_label.JUDGES
    assert {"base_s1", "base_s2", "rn_dpo_anatomy_top_bottom_s2"} <= set(names)
    assert sum(name.startswith("rn_dpo_oracle_noise_") for name in names) == 4  # the reliability sweep
    schedule = low_label.PROTOCOLS["v2"].schedule
    assert schedule.tune_epochs * schedule.tune_iterations >= 2000
    # the audit's recommended mining for the best judge: one more RN-DPO arm, right after its top_bottom one
    audit = {"recommendation": {"judge": "anatomy", "mining": "margin"}}
    assert low_label.audit_mining(audit, "agreement") is None
    with_margin = [arm.name for arm in low_label.build_arms_v2("anatomy", ("agreement", "anatomy"), (0,), "margin")]
    assert with_margin == names[: names.index("self_train_anatomy_s0") + 1] + ["rn_dpo_anatomy_margin_s0"]
    margin = low_label.build_arms_v2("anatomy", ("anatomy",), (0,), low_label.audit_mining(audit, "anatomy"))[-1]
    assert (margin.judge, margin.mining) == ("anatomy", "margin")


def test_protocol_v3_has_fewer_labels_more_validation_and_refuses_another_protocols_split(low_label, tmp_path):
    v2, v3 = low_label.PROTOCOLS["v2"], low_label.PROTOCOLS["v3"]
    assert v3.gated and v2.gated and not low_label.PROTOCOLS["v1"].gated
    assert v3.labeled < v2.labeled and v3.validation > v2.validation
    assert 180 - (v3.labeled + v3.validation + v3.unlabeled) == 180 - (v2.labeled + v2.validation + v2.unlabeled)
    split = {"seed": 0, "labeled": ["a"] * 10, "validation": ["b"] * 10, "unlabeled": ["c"] * 120, "test": []}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(SystemExit, match="protocol v3 needs"):
        low_label.prepare(tmp_path, tmp_path, 0, v3)


def test_the_gate_reads_whole_case_validation_and_needs_rn_dpo_above_base_and_self_training(low_label):
    def arm(final, curve=0.5):
        return {
            "validation": {"checkpoint_final": {"foreground_mean": final}},
            "validation_curve": [curve] * low_label.GATE_EPOCHS,
        }

    results = {
        "base_s0": arm(0.80),
        "upper_s0": arm(0.83),
        "rn_dpo_oracle_reliable_top_bottom_s0": arm(0.81),
        "self_train_oracle_reliable_s0": arm(0.805),
    }
    assert low_label.gate_verdict(results)[0]
    assert not low_label.gate_verdict({**results, "self_train_oracle_reliable_s0": arm(0.82)})[0]
    assert not low_label.gate_verdict({**results, "rn_dpo_oracle_reliable_top_bottom_s0": arm(0.803)})[0]
    # the per-epoch pseudo Dice on random patches does not decide: a high curve with a low final checkpoint fails
    lucky = arm(0.803, curve=0.95)
    assert not low_label.gate_verdict({**results, "rn_dpo_oracle_reliable_top_bottom_s0": lucky})[0]
    passed, verdict = low_label.gate_verdict({"base_s0": arm(0.8)})
    assert not passed and "not finished" in verdict


def test_paired_case_difference_by_hand(low_label):
    def arm(seed, test_cases):
        return {
            "arm": {"seed": seed},
            "test": {"checkpoint_final": {"per_case": {c: {"1": d, "2": d} for c, d in test_cases.items()}}},
        }

    base = arm(0, {"a": 0.80, "b": 0.80, "c": 0.80})
    tuned = arm(0, {"a": 0.81, "b": 0.83, "c": 0.79})  # +1, +3, -1 points: mean +1, std 2, se 2 / sqrt(3)
    figures = low_label.paired_case_difference(tuned, base, "test")
    assert figures["mean"] == pytest.approx(1.0)
    assert figures["standard_error"] == pytest.approx(2 / np.sqrt(3))
    assert (figures["better"], figures["cases"]) == (2, 3)
    assert low_label.paired_case_difference(tuned, base, "validation") is None
    lines = low_label.paired_by_case_lines({"base_s0": base, "x_s0": tuned})
    assert lines == ["- x_s0: test +1.00 ± 1.15 pts (2/3 cases better)"]


def test_rn_dpo_is_paired_with_its_self_training_by_case_and_seed(low_label):
    def arm(kind, seed, cases, tag=None, settings=None):
        group = low_label.cross_seed_group_name(kind, "agreement", "seeds_0_1", tag)
        per_case = {c: {"1": d, "2": d} for c, d in cases.items()}
        result = {
            "arm": {"kind": kind, "judge": "agreement", "seed": seed, "settings": settings or {}},
            "test": {"checkpoint_final": {"per_case": per_case}},
        }
        return group, result

    sft3 = {"sft_weight": 3.0}
    rn_dpo = [
        arm("rn_dpo", 0, {"a": 0.82, "b": 0.80}, "sft3", sft3),
        arm("rn_dpo", 1, {"a": 0.80, "b": 0.84}, "sft3", sft3),
    ]
    self_train = [arm("self_train", 0, {"a": 0.80, "b": 0.80}), arm("self_train", 1, {"a": 0.80, "b": 0.80})]
    stepped = [arm("self_train", 1, {"a": 0.81, "b": 0.81}, "lr3x")]  # seed 1 only
    grouped = {}
    for name, result in rn_dpo + self_train + stepped:
        grouped.setdefault(name, []).append(result)

    runs = grouped["rn_dpo_agreement_sft3_seeds_0_1"]
    assert low_label.self_training_counterparts("rn_dpo_agreement_sft3_seeds_0_1", runs) == [
        "self_train_agreement_seeds_0_1",
        "self_train_agreement_lr3x_seeds_0_1",
    ]
    # case a: (+2 + 0) / 2 = +1, case b: (0 + 4) / 2 = +2 points; mean 1.5, std 0.707, se 0.5
    figures = low_label.paired_seed_difference(runs, grouped["self_train_agreement_seeds_0_1"], "test")
    assert figures["mean"] == pytest.approx(1.5)
    assert figures["standard_error"] == pytest.approx(0.5)
    assert (figures["better"], figures["cases"], figures["seeds"]) == (2, 2, [0, 1])
    assert low_label.paired_seed_difference(runs, grouped["self_train_agreement_seeds_0_1"], "validation") is None
    lines = low_label.against_self_training_lines(grouped)
    assert lines == [
        "- rn_dpo_agreement_sft3_seeds_0_1 − self_train_agreement_seeds_0_1: test +1.50 ± 0.50 pts "
        "(2/2 cases better; seeds 0, 1)",
        # seed 1 alone: a -1, b +3
        "- rn_dpo_agreement_sft3_seeds_0_1 − self_train_agreement_lr3x_seeds_0_1: test +1.00 ± 2.00 pts "
        "(1/2 cases better; seeds 1)",
    ]
    # at the SFT weight the arms were measured with there is no step-matched control; self-training has none
    plain = [{**runs[0], "arm": {**runs[0]["arm"], "settings": {}}}]
    assert low_label.self_training_counterparts("rn_dpo_agreement_seeds_0_1", plain) == [
        "self_train_agreement_seeds_0_1"
    ]
    assert low_label.self_training_counterparts("self_train_agreement_seeds_0_1", self_train[0][1:]) == []


def test_an_arm_is_scored_on_the_validation_cases_once(low_label, tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(checkpoint, predictions, device="cpu", cases=None):
        calls.append((Path(checkpoint).name, Path(cases)))
        return {"foreground_mean": 0.8}

    monkeypatch.setattr(low_label, "evaluate_checkpoint", fake_evaluate)
    result = low_label.score_validation(tmp_path, "arm_s0", {"folder": str(tmp_path / "run")})
    assert low_label.validation_dice(result) == 0.8
    assert calls == [("checkpoint_final.pth", low_label.validation_folder(tmp_path))]
    low_label.score_validation(tmp_path, "arm_s0", result)
    assert len(calls) == 1


def test_the_preference_sweep_varies_one_setting_per_arm_and_reads_validation(low_label):
    from nnunet_rndpo.training.settings import PreferenceSettings, validate

    arms = low_label.preference_arms(0)
    # every variant but the one that reads the judge's own voxel probabilities, which the oracle has not
    assert {arm.name for arm in arms} == {f"rn_dpo_oracle_reliable_{n}_s0" for n in low_label.PREFERENCE_VARIANTS} - {
        "rn_dpo_oracle_reliable_sft3_voxels_s0"
    }
    label_free = low_label.preference_arms(0, ("oracle_reliable", "agreement"))
    assert "rn_dpo_agreement_majority_s0" in {arm.name for arm in label_free} and len(label_free) == 2 * len(arms)
    (voxels,) = [arm for arm in low_label.preference_arms(0, ("atlas",)) if "voxels" in arm.name]
    assert (voxels.name, voxels.settings) == (
        "rn_dpo_atlas_sft3_voxels_s0",
        {"sft_weight": 3.0, "preference_region": "judge_voxels"},
    )
    validate(PreferenceSettings(judge="atlas", **voxels.settings))
    defaults = PreferenceSettings(**low_label.MEASURED_WITH)  # what the arms run with besides their own setting
    for arm in arms:
        assert arm.kind == "rn_dpo" and arm.judge == "oracle_reliable" and arm.name.endswith("_s0")
        validate(PreferenceSettings(**arm.settings))  # every variant is a valid setting
        assert any(getattr(defaults, key) != value for key, value in arm.settings.items()), arm.name
    assert all(arm.mining == "top_bottom" for arm in arms)

    def arm(validation, test):
        return {
            "validation": {"checkpoint_final": {"foreground_mean": validation}},
            "validation_curve": [0.1] * 3 + [0.5] * low_label.GATE_EPOCHS,
            "test": {"checkpoint_final": {"foreground_mean": test}},
        }

    results = {"base_s0": arm(0.80, 0.70), f"{arms[0].name}": arm(0.812, 0.99)}
    table = "\n".join(low_label.preference_sweep_table(results))
    assert f'| {arms[0].name} | {{"beta": 0.03}} | 0.8120 | +1.20 pts | 0.5000 | 0.9900 |' in table
    assert "| rn_dpo_oracle_reliable_top_bottom_s0 | defaults (sigmoid, beta 0.1, SFT 1) | not run | | | |" in table


def test_the_reliability_curve_pairs_each_oracle_levels_audit_with_its_gain(low_label, tmp_path):
    from nnunet_rndpo.audit import expected_gain, load_reliability_curve

    audit = {
        "oracle_reliable": {"spearman": 0.95, "top1_lift": 0.020},
        "oracle_noise_0.01": {"spearman": 0.90, "top1_lift": 0.015},
        "oracle_noise_0.1": {"spearman": 0.30, "top1_lift": 0.002},
        "oracle_noise_0.3": {"spearman": 0.30, "top1_lift": 0.001},  # equal reliability: the first level kept
        "agreement": {"spearman": 0.80, "top1_lift": 0.0},  # not an oracle level: never a point
    }
    gains = {"oracle_reliable": 1.0, "oracle_noise_0.01": 0.6, "oracle_noise_0.1": -0.2, "agreement": 5.0}
    assert low_label.reliability_points(audit, gains, "spearman") == [
        ("oracle_noise_0.1", 0.30, -0.2),
        ("oracle_noise_0.01", 0.90, 0.6),
        ("oracle_reliable", 0.95, 1.0),
    ]

    def arm(test_dice):
        return {"test": {"checkpoint_final": {"foreground_mean": test_dice}}}

    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "judge_audit.json").write_text(json.dumps({"judges": audit}))
    results = {
        "base_s0": arm(0.80),
        "rn_dpo_oracle_reliable_top_bottom_s0": arm(0.81),
        "rn_dpo_oracle_noise_0.1_top_bottom_s0": arm(0.79),
        "self_train_oracle_reliable_s0": arm(0.804),
    }
    table = low_label.reliability_curves(tmp_path, results, figures=tmp_path / "figures")
    assert "| oracle_reliable | 0.005 | 0.950 | 0.0200 | +1.00 | +0.40 |  |" in table
    assert not any(line.startswith("| agreement") for line in table)  # audited but never trained
    assert (tmp_path / "figures" / "reliability_curve.png").stat().st_size > 0
    curve = load_reliability_curve(tmp_path / "reliability" / "reliability_curve_rn_dpo_top1_lift.json")
    assert curve.metric == "top1_lift"
    assert [list(point) for point in curve.points] == [[0.002, pytest.approx(-1.0)], [0.02, pytest.approx(1.0)]]
    # the audit reads a judge's top-1 lift off it: halfway between the two levels, halfway between their gains
    assert expected_gain(0.011, curve.points) == pytest.approx(0.0)
    self_training = load_reliability_curve(tmp_path / "reliability" / "reliability_curve_self_train_spearman.json")
    assert [list(point) for point in self_training.points] == [[0.95, pytest.approx(0.4)]]


def test_a_cross_seed_reliability_curve_reads_its_audit_and_arms_and_tests_label_free_judges(
    low_label, bases_of_seeds, tmp_path
):
    from nnunet_rndpo.audit import load_reliability_curve

    ensemble = "seeds_0_1_2"
    audit = {
        "oracle_reliable": {"spearman": 0.8, "top1_lift": 0.012},
        "oracle_noise_0.03": {"spearman": 0.2, "top1_lift": 0.004},
        "agreement": {"spearman": 0.45, "top1_lift": 0.008},
        "oracle": {"spearman": 1.0, "top1_lift": 0.015},  # the exact oracle is no level and no label-free judge
    }
    (tmp_path / f"audit_{ensemble}").mkdir()
    (tmp_path / f"audit_{ensemble}" / "judge_audit.json").write_text(json.dumps({"judges": audit}))

    def arm(test_dice):
        return {"test": {"checkpoint_final": {"foreground_mean": test_dice}}}

    names = [arm.name for arm in low_label.cross_seed_arms(0, ("oracle_reliable",), (0, 1, 2))]
    assert sorted(low_label.reliability_arms("oracle_reliable", ensemble).values()) == sorted(names)
    results = {
        "base_s0": arm(0.80),
        "rn_dpo_oracle_reliable_top_bottom_s0": arm(0.70),  # mirror members: another curve, not read here
        f"rn_dpo_oracle_reliable_{ensemble}_s0": arm(0.81),
        f"rn_dpo_oracle_noise_0.03_{ensemble}_s0": arm(0.80),
        f"rn_dpo_agreement_{ensemble}_s0": arm(0.803),
        f"self_train_agreement_{ensemble}_s0": arm(0.806),
    }
    assert low_label.reliability_curves(tmp_path, results) == []  # no mirror-member audit in this work folder
    table = low_label.reliability_curves(tmp_path, results, tmp_path / "figures", ensemble)
    assert "| oracle_reliable | 0.005 | 0.800 | 0.0120 | +1.00 |  |  |" in table
    # agreement's lift is halfway between the two levels: the curve expects +0.50, it brought +0.30
    assert "| agreement | label-free | 0.450 | 0.0080 | +0.30 | +0.60 | +0.50 /  |" in table
    assert not any(line.startswith("| oracle |") for line in table)
    curve = load_reliability_curve(tmp_path / "reliability" / ensemble / "reliability_curve_rn_dpo_top1_lift.json")
    assert [list(point) for point in curve.points] == [[0.004, pytest.approx(0.0)], [0.012, pytest.approx(1.0)]]
    assert (tmp_path / "figures" / f"reliability_curve_{ensemble}.png").stat().st_size > 0


def test_rn_dpos_curve_under_a_preference_setting_keeps_self_trainings_arms(low_label, bases_of_seeds, tmp_path):
    from nnunet_rndpo.audit import load_reliability_curve

    ensemble = "seeds_0_1_2"
    audit = {
        "oracle_reliable": {"spearman": 0.8, "top1_lift": 0.012},
        "oracle_noise_0.03": {"spearman": 0.2, "top1_lift": 0.004},
        "agreement": {"spearman": 0.45, "top1_lift": 0.008},
    }
    (tmp_path / f"audit_{ensemble}").mkdir()
    (tmp_path / f"audit_{ensemble}" / "judge_audit.json").write_text(json.dumps({"judges": audit}))
    variants = {"sft3": low_label.PREFERENCE_VARIANTS["sft3"]}
    (sft3,) = low_label.cross_seed_preference_arms(0, "oracle_reliable", (0, 1, 2), variants=variants)
    arms = low_label.reliability_arms("oracle_reliable", ensemble, "sft3")
    assert arms == {"rn_dpo": sft3.name, "self_train": f"self_train_oracle_reliable_{ensemble}_s0"}

    def arm(test_dice):
        return {"test": {"checkpoint_final": {"foreground_mean": test_dice}}}

    results = {
        "base_s0": arm(0.80),
        f"rn_dpo_oracle_reliable_{ensemble}_s0": arm(0.81),  # the defaults' curve: not read under sft3
        f"rn_dpo_oracle_noise_0.03_{ensemble}_s0": arm(0.80),
        f"rn_dpo_oracle_reliable_sft3_{ensemble}_s0": arm(0.82),
        f"rn_dpo_oracle_noise_0.03_sft3_{ensemble}_s0": arm(0.805),
        f"self_train_oracle_reliable_{ensemble}_s0": arm(0.809),
        f"rn_dpo_agreement_sft3_{ensemble}_s0": arm(0.81),
    }
    table = low_label.reliability_curves(tmp_path, results, tmp_path / "figures", ensemble, "sft3")
    assert "| oracle_reliable | 0.005 | 0.800 | 0.0120 | +2.00 | +0.90 |  |" in table
    # agreement's lift halfway: RN-DPO's sft3 curve expects +1.25 (between +0.50 and +2.00), it brought +1.00
    assert "| agreement | label-free | 0.450 | 0.0080 | +1.00 |  | +1.25 /  |" in table
    folder = tmp_path / "reliability" / ensemble / "sft3"
    curve = load_reliability_curve(folder / "reliability_curve_rn_dpo_top1_lift.json")
    assert [list(point) for point in curve.points] == [[0.004, pytest.approx(0.5)], [0.012, pytest.approx(2.0)]]
    assert (tmp_path / "figures" / f"reliability_curve_{ensemble}_sft3.png").stat().st_size > 0


def test_validation_noise_computes_nnunets_pseudo_dice_from_summed_counts():
    from benchmarks.validation_noise import pseudo_dice, spread

    # class 1: 2*(3+1) / (2*4 + 2 + 2) = 8/12; class 2 never present in any batch: left out of the mean
    outputs = [
        {"tp_hard": np.array([3, 0]), "fp_hard": np.array([1, 0]), "fn_hard": np.array([0, 0])},
        {"tp_hard": np.array([1, 0]), "fp_hard": np.array([1, 0]), "fn_hard": np.array([2, 0])},
    ]
    assert pseudo_dice(outputs) == pytest.approx(8 / 12)
    assert spread([0.5, 0.7])["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


@pytest.fixture
def bases_of_seeds(low_label, monkeypatch):
    monkeypatch.setattr(low_label, "base_folder", lambda seed: Path(f"/results/Bench_base_s{seed}/fold_0"))


def test_cross_seed_proposals_are_every_base_of_the_ensemble_and_its_mean(low_label, bases_of_seeds):
    from nnunet_rndpo.proposals.members import ProposalSettings, plan_members

    proposals = low_label.cross_seed_proposals(1, seeds=(0, 1, 2))
    assert proposals["extra_checkpoints"] == [
        "/results/Bench_base_s0/fold_0/checkpoint_final.pth",
        "/results/Bench_base_s2/fold_0/checkpoint_final.pth",
    ]
    members = plan_members(ProposalSettings.from_dict(proposals), mirror_axes=(0, 1, 2))
    # the own base's 8 mirror members, each other base's 8, and nnU-Net's ensemble of all of them
    assert len(members) == proposals["num_proposals"] == 25
    assert sum(m.source == "ensemble" for m in members) == 1
    assert {m.network_index for m in members if m.source in ("checkpoint", "checkpoint_tta")} == {1, 2}
    assert sum(m.network_index == 2 for m in members) == 8


def test_cross_seed_arms_pair_rn_dpo_with_self_training_on_the_same_proposals(low_label, bases_of_seeds):
    arms = low_label.cross_seed_arms(0, ("agreement", "oracle_reliable"), stores=Path("/work/proposals"))
    assert [arm.name for arm in arms] == [
        "rn_dpo_agreement_seeds_0_1_2_s0",
        "self_train_agreement_seeds_0_1_2_s0",
        "rn_dpo_oracle_reliable_seeds_0_1_2_s0",
        "self_train_oracle_reliable_seeds_0_1_2_s0",
    ]
    # one store per ensemble and seed, shared by its arms: never the base's default store of mirror members
    expected = {"proposals": low_label.cross_seed_proposals(0), "proposal_store": "/work/proposals/seeds_0_1_2_s0"}
    assert all(arm.settings == expected for arm in arms)
    assert all(arm.judge in low_label.JUDGES for arm in arms)
    # an ensemble of two bases names other arms (and stores) than one of three
    assert low_label.cross_seed_arms(0, ("agreement",), seeds=(0, 1))[0].name == "rn_dpo_agreement_seeds_0_1_s0"


def test_cross_seed_preference_arms_change_one_setting_on_the_shared_proposals(low_label, bases_of_seeds):
    plain = low_label.cross_seed_arms(0, ("agreement",))[0]
    arms = low_label.cross_seed_preference_arms(0, "agreement", variants={"sft3": {"sft_weight": 3.0}})
    assert [(arm.name, arm.kind, arm.judge, arm.mining) for arm in arms] == [
        ("rn_dpo_agreement_sft3_seeds_0_1_2_s0", "rn_dpo", "agreement", "top_bottom")
    ]
    assert arms[0].settings == {**plain.settings, "sft_weight": 3.0}  # same proposals, same store
    (spread,) = low_label.cross_seed_preference_arms(
        0, "agreement", variants={"sft3": {"sft_weight": 3.0}}, mining="halves"
    )
    assert (spread.name, spread.mining) == ("rn_dpo_agreement_halves_sft3_seeds_0_1_2_s0", "halves")
    assert spread.settings == arms[0].settings
    every = low_label.cross_seed_preference_arms(0, "agreement")
    assert [arm.settings["sft_weight"] for arm in every if "sft_weight" in arm.settings] == [3.0]
    assert len(every) == len(low_label.PREFERENCE_VARIANTS) - 1  # agreement has no voxel probabilities

    def finished(arm, validation):
        return {"arm": asdict(arm), "validation": {"checkpoint_final": {"foreground_mean": validation}}}

    by_name = {arm.name: arm for arm in every}
    results = {
        "rn_dpo_agreement_beta1_seeds_0_1_2_s0": finished(by_name["rn_dpo_agreement_beta1_seeds_0_1_2_s0"], 0.85),
        "rn_dpo_agreement_beta0.03_seeds_0_1_2_s0": finished(by_name["rn_dpo_agreement_beta0.03_seeds_0_1_2_s0"], 0.86),
    }
    assert low_label.best_preference_variant(results) == "beta0.03"
    # an arm whose settings hold two variants' (sft3_voxels holds sft3's) is the more specific one
    (voxels,) = low_label.cross_seed_preference_arms(
        0, "atlas", variants={"sft3_voxels": low_label.PREFERENCE_VARIANTS["sft3_voxels"]}
    )
    results[voxels.name] = finished(voxels, 0.87)
    assert low_label.best_preference_variant(results) == "sft3_voxels"


def test_an_arm_keeps_the_sft_weight_it_was_measured_with_unless_its_variant_changes_it(low_label, bases_of_seeds):
    from nnunet_rndpo.training.settings import PreferenceSettings, apply_overrides, validate

    schedule = low_label.Schedule(tune_epochs=3, tune_iterations=7, val_iterations=2, tune_lr=5e-4)
    plain, self_train = low_label.cross_seed_arms(0, ("agreement",))
    (sft3,) = low_label.cross_seed_preference_arms(0, "agreement", variants={"sft3": {"sft_weight": 3.0}})
    settings = low_label.fine_tuning_settings(plain, schedule)
    assert settings["sft_weight"] == 1.0  # BENCHMARKS.md's defaults row, whatever today's default
    assert low_label.fine_tuning_settings(sft3, schedule)["sft_weight"] == 3.0
    assert settings["base_checkpoint"] == "/results/Bench_base_s0/fold_0/checkpoint_final.pth"
    assert (settings["num_epochs"], settings["iterations_per_epoch"], settings["val_iterations_per_epoch"]) == (3, 7, 2)
    assert (settings["initial_lr"], settings["seed"], settings["mining"]) == (5e-4, 0, "top_bottom")
    assert settings["proposals"] == plain.settings["proposals"]
    # every key is a setting the trainer accepts
    applied = validate(
        apply_overrides(PreferenceSettings(), low_label.fine_tuning_settings(self_train, schedule), "test")
    )
    assert applied.sft_weight == 1.0 and applied.judge == low_label.JUDGES["agreement"][0]


def test_step_matched_self_training_takes_rn_dpos_sft_step_on_the_same_proposals(low_label, bases_of_seeds):
    schedule = low_label.Schedule(tune_lr=1e-3)
    plain = low_label.cross_seed_arms(1, ("agreement",))[1]
    control = low_label.step_matched_self_training(1, "agreement", 3.0, schedule)
    assert (control.name, control.kind, control.judge, control.seed) == (
        "self_train_agreement_lr3x_seeds_0_1_2_s1",
        "self_train",
        "agreement",
        1,
    )
    assert control.settings == {**plain.settings, "initial_lr": pytest.approx(3e-3)}  # same proposals and store
    settings = low_label.fine_tuning_settings(control, schedule)
    assert settings["initial_lr"] == pytest.approx(3e-3) and settings["num_epochs"] == schedule.tune_epochs


def test_the_sweep_adds_the_best_judges_settings_with_the_mining_its_audit_recommends(low_label, bases_of_seeds):
    schedule = low_label.Schedule()
    plain = low_label.preference_sweep_arms((0, 1), ("agreement", "atlas"), "atlas", None, schedule)
    assert plain == low_label.preference_sweep_arms((0, 1), ("agreement", "atlas"), "atlas", "top_bottom", schedule)
    assert {arm.mining for arm in plain} == {"top_bottom"}
    swept = low_label.preference_sweep_arms((0, 1), ("agreement", "atlas"), "atlas", "margin", schedule)
    margin = {arm.name: arm for arm in swept if arm.mining == "margin"}
    # the best judge only, each setting on each seed, named before the setting; nothing else changes
    assert len(margin) == 2 * len(low_label.preference_arms(0, ("atlas",)))
    assert {arm.judge for arm in margin.values()} == {"atlas"}
    sft3 = margin["rn_dpo_atlas_margin_sft3_s1"]
    assert (sft3.kind, sft3.seed, sft3.settings) == ("rn_dpo", 1, {"sft_weight": 3.0})
    assert low_label.fine_tuning_settings(sft3, schedule)["mining"] == "margin"
    assert [arm for arm in swept if arm.mining != "margin"] == plain
    # the step-matched controls come last, as before
    assert [arm.kind for arm in swept[-4:]] == ["self_train"] * 4 and swept[-1].name == "self_train_atlas_lr3x_s1"


def test_preference_controls_are_self_training_at_each_larger_sft_weight_times_the_step(low_label, bases_of_seeds):
    schedule = low_label.Schedule(tune_lr=1e-3)
    (control,) = low_label.preference_controls(2, ("atlas",), schedule)  # the sweep raises the SFT weight once: 3
    assert (control.name, control.kind, control.judge, control.seed, control.mining) == (
        "self_train_atlas_lr3x_s2",
        "self_train",
        "atlas",
        2,
        "top_bottom",
    )
    settings = low_label.fine_tuning_settings(control, schedule)
    assert settings["initial_lr"] == pytest.approx(3e-3) and settings["sft_weight"] == 1.0
    assert "Bench_base_s2" in settings["base_checkpoint"]  # from its own seed's base
    variants = {arm.name: arm for arm in low_label.preference_arms(2, ("atlas",))}
    assert variants["rn_dpo_atlas_sft3_s2"].settings == {"sft_weight": 3.0}  # the RN-DPO arm it controls


def test_cross_seed_arms_with_each_mining_and_the_mining_validation_prefers(low_label, bases_of_seeds):
    arms = low_label.cross_seed_arms(1, ("agreement",), minings=("top_bottom", "top_plain"))
    assert [(arm.name, arm.kind, arm.mining) for arm in arms] == [
        ("rn_dpo_agreement_seeds_0_1_2_s1", "rn_dpo", "top_bottom"),
        ("rn_dpo_agreement_top_plain_seeds_0_1_2_s1", "rn_dpo", "top_plain"),
        ("self_train_agreement_seeds_0_1_2_s1", "self_train", "top_bottom"),
    ]
    # each seed fine-tunes its own base, with the other bases as the rest of its ensemble
    assert arms[0].settings["proposals"]["extra_checkpoints"] == [
        str(low_label.base_folder(0) / "checkpoint_final.pth"),
        str(low_label.base_folder(2) / "checkpoint_final.pth"),
    ]

    def result(kind, mining, validation):
        return {
            "arm": {"kind": kind, "mining": mining},
            "validation": {"checkpoint_final": {"foreground_mean": validation}},
        }

    results = {
        "a": result("rn_dpo", "top_bottom", 0.860),
        "b": result("rn_dpo", "top_plain", 0.864),
        "c": result("self_train", "top_bottom", 0.870),  # not an RN-DPO arm: never the choice
    }
    assert low_label.best_mining(results) == "top_plain"
    assert low_label.best_mining({"c": results["c"]}) == "top_bottom"  # nothing finished: the default


def test_the_best_label_free_judge_is_the_one_whose_pick_lifts_most(low_label):
    audit = {
        "judges": {
            "agreement": {"top1_lift": 0.002},
            "anatomy": {"top1_lift": 0.004},
            "uncertainty": {"top1_lift": None},
            "oracle_reliable": {"top1_lift": 0.009},  # reads labels: never a candidate
        }
    }
    assert low_label.best_label_free(audit, ("agreement", "anatomy", "uncertainty", "learned_qc")) == "anatomy"


def test_run_cross_seed_follows_validation_from_step_to_step(low_label, tmp_path, monkeypatch):
    """The whole --cross_seed --preference_sweep plan with a fake training: every choice (judge, mining, preference
    setting, spread mining) is read from seed 0's validation and carried to the other seeds and the oracle."""
    from argparse import Namespace

    for seed in (0, 1, 2):
        (tmp_path / f"base_s{seed}").mkdir()
        (tmp_path / f"base_s{seed}" / "checkpoint_final.pth").write_bytes(b"")
    monkeypatch.setattr(low_label, "base_folder", lambda seed: tmp_path / f"base_s{seed}")
    audited = {"agreement": 0.001, "atlas": 0.004, "agreement_other_models": 0.007, "oracle_reliable": 0.01}

    def fake_audit(work, seed, threads, device, label_free, proposals, folder):
        assert seed == 0 and proposals == low_label.cross_seed_proposals(0, (0, 1, 2))
        (work / folder).mkdir(parents=True)
        judges = {judge: {"top1_lift": lift} for judge, lift in audited.items()}
        (work / folder / "judge_audit.json").write_text(json.dumps({"judges": judges}))

    monkeypatch.setattr(low_label, "audit_on_validation", fake_audit)
    monkeypatch.setattr(low_label, "summarise", lambda work: "")
    # seed 0's validation prefers top_plain among the minings, SFT 3 among the settings, then halves under SFT 3
    judge, ensemble = "agreement_other_models", "seeds_0_1_2"
    preferred = {f"rn_dpo_{judge}_{tag}_{ensemble}_s0": 0.9 for tag in ("top_plain", "sft3", "halves_sft3")}
    preferred[f"rn_dpo_{judge}_halves_sft3_{ensemble}_s0"] = 0.92
    ran = []

    def fake_run(arm):  # as the real one: an arm already finished is skipped
        if (tmp_path / "arms" / f"{arm.name}.json").is_file():
            return
        ran.append(arm.name)
        result = {
            "arm": asdict(arm),
            "validation": {"checkpoint_final": {"foreground_mean": preferred.get(arm.name, 0.8)}},
        }
        (tmp_path / "arms").mkdir(exist_ok=True)
        (tmp_path / "arms" / f"{arm.name}.json").write_text(json.dumps(result))

    args = Namespace(only=None, part_id=0, num_parts=1, threads=1, device="cpu", preference_sweep=True)
    protocol, schedule = low_label.PROTOCOLS["v3"], low_label.PROTOCOLS["v3"].schedule
    assert low_label.run_cross_seed(tmp_path, args, protocol, schedule, fake_run) == 0
    assert ran[:3] == ["base_s0", "base_s1", "base_s2"] and len(ran) == len(set(ran))
    # seed 0 tries each mining; the other seeds take the one its validation preferred, top_plain, only
    assert {f"rn_dpo_{judge}_{ensemble}_s0", f"rn_dpo_{judge}_top_plain_{ensemble}_s0"} <= set(ran)
    assert f"rn_dpo_{judge}_top_plain_{ensemble}_s1" in ran and f"rn_dpo_{judge}_{ensemble}_s1" not in ran
    # SFT 3 chosen: the other seeds under it, step-matched self-training beside it (label-free and the oracle)
    assert {f"rn_dpo_{judge}_sft3_{ensemble}_s1", f"rn_dpo_{judge}_sft3_{ensemble}_s2"} <= set(ran)
    assert f"rn_dpo_{judge}_beta0.03_{ensemble}_s1" not in ran
    assert {f"self_train_{judge}_lr3x_{ensemble}_s0", f"self_train_oracle_reliable_lr3x_{ensemble}_s2"} <= set(ran)
    assert f"rn_dpo_oracle_noise_0.1_sft3_{ensemble}_s0" in ran and f"rn_dpo_oracle_reliable_sft3_{ensemble}_s1" in ran
    # halves preferred under SFT 3 (after the ceiling): the other seeds, then the oracle with it, last
    assert ran.index(f"rn_dpo_{judge}_halves_sft3_{ensemble}_s0") > ran.index(f"rn_dpo_oracle_reliable_{ensemble}_s2")
    assert ran[-3:] == [
        f"rn_dpo_{judge}_halves_sft3_{ensemble}_s1",
        f"rn_dpo_{judge}_halves_sft3_{ensemble}_s2",
        f"rn_dpo_oracle_reliable_halves_sft3_{ensemble}_s0",
    ]
