"""`nnunet_rndpo judge` and `nnunet_rndpo audit` on the synthetic dataset, through the CLI entry (in-process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nnunet_rndpo.cli import main


@pytest.fixture
def isolated_base(base_checkpoint, tiny_configuration, preprocessed_synthetic):
    """A copy of the base under its own trainer name, so this test's proposal stores are its own."""
    source_folder = base_checkpoint.parent.parent
    target_folder = source_folder.parent / f"CliJudgeBase__nnUNetPlans__{tiny_configuration}"

    def clean():
        shutil.rmtree(target_folder, ignore_errors=True)
        for store in Path(preprocessed_synthetic.preprocessed_folder, "rndpo_proposals").rglob("CliJudgeBase__*"):
            shutil.rmtree(store, ignore_errors=True)

    clean()
    shutil.copytree(source_folder, target_folder)
    yield "CliJudgeBase"
    clean()


def run_arguments(dataset, configuration, trainer):
    return ["-d", str(dataset.dataset_id), "-c", configuration, "-f", "0", "-tr", trainer]


@pytest.mark.slow
def test_judge_scores_a_store_and_mines_pairs(preprocessed_synthetic, tiny_configuration, isolated_base, capsys):
    arguments = run_arguments(preprocessed_synthetic, tiny_configuration, isolated_base)
    assert main(["propose", *arguments, "-k", "4"]) == 0
    assert main(["judge", *arguments, "--judges", "agreement", "virtual_annotator", "--mining", "top_bottom"]) == 0
    printed = capsys.readouterr().out
    assert "judge 'agreement'" in printed and "judge 'virtual_annotator'" in printed
    store = next(
        Path(preprocessed_synthetic.preprocessed_folder, "rndpo_proposals").rglob(f"{isolated_base}__*checkpoint_final")
    )
    scores = json.loads(next((store / "judges").glob("agreement*.scores.json")).read_text())
    assert set(scores["scores"]) == {
        p.name[: -len("_0000.nii.gz")] for p in (preprocessed_synthetic.raw_folder / "imagesUnlabeled").glob("*.nii.gz")
    }
    assert all(len(s) == 4 for s in scores["scores"].values())
    pairs_file = next((store / "pairs").glob("agreement*__top_bottom/rndpo_pairs.json"))
    assert str(pairs_file) in printed
    pairs = json.loads(pairs_file.read_text())
    assert pairs["summary"]["cases_total"] == len(scores["scores"])
    for pair in pairs["items"]:
        case_scores = scores["scores"][pair["case_id"]]
        assert pair["chosen"] != pair["rejected"] and case_scores[pair["chosen"]] > case_scores[pair["rejected"]]


@pytest.mark.slow
def test_judge_without_proposals_says_what_to_run(preprocessed_synthetic, tiny_configuration, isolated_base, capsys):
    # an error that names what to do is one line on stderr and exit code 2, not a traceback
    assert main(["judge", *run_arguments(preprocessed_synthetic, tiny_configuration, isolated_base)]) == 2
    assert "run `nnunet_rndpo propose` first" in capsys.readouterr().err


@pytest.mark.slow
def test_audit_reports_every_judge_against_true_dice(
    preprocessed_synthetic, tiny_configuration, isolated_base, tmp_path, capsys
):
    output = tmp_path / "audit"
    arguments = run_arguments(preprocessed_synthetic, tiny_configuration, isolated_base)
    assert main(["audit", *arguments, "-k", "4", "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((output / "judge_audit.json").read_text())
    assert (output / "judge_audit.png").stat().st_size > 0
    assert set(report["judges"]) == {
        "agreement",
        "uncertainty",
        "learned_qc",
        "virtual_annotator",
        "anatomy",
        "atlas",
        "oracle",
    }
    assert (output / "judge_audit_pairs.png").stat().st_size > 0 and (
        output / "judge_audit_ranks.png"
    ).stat().st_size > 0
    # the noiseless oracle ranks by true Dice itself: perfect wherever the true Dice differ
    oracle = report["judges"]["oracle"]
    assert oracle["uses_labels"] and oracle["top1_hit_rate"] == 1.0
    assert oracle["spearman"] is None or oracle["spearman"] == pytest.approx(1.0)
    assert report["recommendation"]["judge"] != "oracle"
    assert "recommendation:" in printed and "agreement" in printed
    assert report["cases"] == 2  # fold 0's validation cases of the 10 labeled ones
    # the judge_voxels region is measured for the atlas (it keeps its fused labels), for no judge without them
    regions = {
        name: figures["mining"]["top_bottom"]["preference_regions"] for name, figures in report["judges"].items()
    }
    assert regions["atlas"]["judge_voxels"]["kept_fraction"] is not None
    assert regions["agreement"]["judge_voxels"]["kept_fraction"] is None
