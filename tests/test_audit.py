"""Judge audit on a hand-made example whose figures are computed by hand below."""

import json

import numpy as np
import pytest

from nnunet_rndpo.audit import (
    AUDIT_JSON_NAME,
    AUDIT_PAIRS_PNG_NAME,
    AUDIT_PNG_NAME,
    AUDIT_RANKS_PNG_NAME,
    AuditCase,
    PairExample,
    audit_judges,
    disagreement_correctness,
    expected_gain,
    format_table,
    load_reliability_curve,
    pair_example,
    rank_curve,
    recommend,
    write_audit,
)


def distinct_proposals(count: int) -> np.ndarray:
    proposals = np.zeros((count, 4, 4), dtype=np.uint8)
    for index in range(count):
        proposals[index].reshape(-1)[: index + 1] = 1
    return proposals


# Two cases, three proposals each. Mean proposal Dice: (0.7 + 0.6) / 2 = 0.65; best: (0.9 + 0.8) / 2 = 0.85.
TRUE_DICE = {"a": np.array([0.9, 0.7, 0.5]), "b": np.array([0.6, 0.8, 0.4])}


def hand_cases(**judges):
    """judges: name -> function(true_dice) -> scores."""
    return [
        AuditCase(case_id, dice, {name: make(dice) for name, make in judges.items()}, distinct_proposals(3))
        for case_id, dice in TRUE_DICE.items()
    ]


def test_perfect_reversed_and_constant_judges():
    report = audit_judges(
        hand_cases(perfect=lambda dice: dice, reversed=lambda dice: -dice, constant=lambda dice: np.ones(3)),
        strategies=("top_bottom", "top_rest"),
    )
    assert report["cases"] == 2
    assert report["true_dice"]["mean_proposal"] == pytest.approx(0.65)
    assert report["true_dice"]["oracle_best"] == pytest.approx(0.85)
    perfect, reverse, constant = (report["judges"][name] for name in ("perfect", "reversed", "constant"))

    assert perfect["spearman"] == pytest.approx(1.0) and perfect["kendall"] == pytest.approx(1.0)
    assert perfect["top1_hit_rate"] == 1.0 and perfect["top1_true_dice"] == pytest.approx(0.85)
    # top_bottom pairs: (0.9 vs 0.5) and (0.8 vs 0.4) -> gaps 0.4; top_rest: gaps 0.2, 0.4, 0.2, 0.4
    assert perfect["mining"]["top_bottom"]["chosen_minus_rejected_true_dice"] == pytest.approx(0.4)
    assert perfect["mining"]["top_rest"]["chosen_minus_rejected_true_dice"] == pytest.approx(0.3)
    assert perfect["mining"]["top_rest"]["pairs"] == 4
    assert perfect["mining"]["top_rest"]["wrong_role_fraction"] == 0.0

    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["kendall"] == pytest.approx(-1.0)
    assert reverse["top1_hit_rate"] == 0.0 and reverse["top1_true_dice"] == pytest.approx(0.45)
    assert reverse["mining"]["top_bottom"]["chosen_minus_rejected_true_dice"] == pytest.approx(-0.4)
    assert reverse["mining"]["top_bottom"]["wrong_role_fraction"] == 1.0

    # constant scores: no ranking (both cases skipped), top-1 is the expectation of a random pick
    assert constant["spearman"] is None and constant["cases_skipped_constant"] == 2
    assert constant["top1_hit_rate"] == pytest.approx(1 / 3)
    assert constant["top1_true_dice"] == pytest.approx(0.65)
    assert constant["mining"]["top_bottom"]["pairs"] == 0
    assert constant["mining"]["top_bottom"]["cases_without_pair"] == 2
    assert constant["mining"]["top_bottom"]["chosen_minus_rejected_true_dice"] is None


def test_ties_in_true_dice_count_as_a_hit_and_as_neither_right_nor_wrong():
    case = AuditCase("tie", np.array([0.8, 0.8, 0.3]), {"judge": np.array([0.5, 0.9, 0.1])}, distinct_proposals(3))
    figures = audit_judges([case], strategies=("top_rest",))["judges"]["judge"]
    assert figures["top1_hit_rate"] == 1.0
    mining = figures["mining"]["top_rest"]  # pairs (1, 0): tie in truth; (1, 2): right
    assert mining["wrong_role_fraction"] == 0.0 and mining["tied_truth_fraction"] == 0.5


def test_recommend_reliable_judge_gets_top_rest():
    report = audit_judges(hand_cases(perfect=lambda dice: dice, oracle=lambda dice: dice))
    assert report["judges"]["oracle"]["uses_labels"] and not report["judges"]["perfect"]["uses_labels"]
    advice = recommend(report)
    assert advice["judge"] == "perfect" and advice["mining"] == "top_rest" and advice["reliable"]
    assert "1.00" in advice["reason"] and "0.850" in advice["reason"] and "0.650" in advice["reason"]


def test_recommend_never_picks_a_label_using_judge():
    advice = recommend(audit_judges(hand_cases(oracle=lambda dice: dice)))
    assert advice["judge"] is None and advice["mining"] is None


def test_recommend_advises_against_pairs_from_a_harmful_judge():
    advice = recommend(audit_judges(hand_cases(reversed=lambda dice: -dice)))
    assert advice["judge"] == "reversed" and advice["mining"] is None and not advice["reliable"]
    assert "self-training" in advice["reason"] and "-1.00" in advice["reason"]


def test_recommend_weak_judge_with_clean_margin_pairs_gets_margin_and_a_warning():
    # Spearman: judge ranks (2, 4, 3, 1) vs truth (4, 3, 2, 1): 1 - 6 * 6 / (4 * 15) = 0.4 < 0.6.
    # With margin 0.05 only the pairs against proposal 3 survive, and all have the right roles.
    case = AuditCase(
        "weak", np.array([0.9, 0.8, 0.7, 0.2]), {"weak": np.array([0.50, 0.52, 0.51, 0.10])}, distinct_proposals(4)
    )
    report = audit_judges([case], margin=0.05)
    assert report["judges"]["weak"]["spearman"] == pytest.approx(0.4)
    assert report["judges"]["weak"]["mining"]["margin"]["pairs"] == 3
    advice = recommend(report)
    assert advice["mining"] == "margin" and not advice["reliable"] and "WARNING" in advice["reason"]


def test_recommend_calls_a_judge_that_picks_typical_masks_weak_despite_its_spearman():
    # Judge order: 0.7 first, then 0.9, 0.8, 0.6, 0.5: Spearman 1 - 6 * 6 / (5 * 24) = 0.7, but its pick is the
    # typical (mean) proposal: top-1 lift 0 of a possible 0.2.
    case = AuditCase(
        "typical",
        np.array([0.9, 0.8, 0.7, 0.6, 0.5]),
        {"typical": np.array([0.8, 0.7, 0.9, 0.2, 0.1])},
        distinct_proposals(5),
    )
    report = audit_judges([case], margin=0.05)
    figures = report["judges"]["typical"]
    assert figures["spearman"] == pytest.approx(0.7) and figures["top1_lift"] == pytest.approx(0.0)
    advice = recommend(report)
    assert not advice["reliable"] and advice["mining"] == "margin" and "WARNING" in advice["reason"]
    assert "top-1 lift of +0.000 (< 25% of the oracle's +0.200)" in advice["reason"]


def test_audit_accepts_a_generator_and_checks_consistency():
    report = audit_judges(case for case in hand_cases(perfect=lambda dice: dice))
    assert report["cases"] == 2
    cases = hand_cases(perfect=lambda dice: dice)
    cases[1].judge_scores = {"other": TRUE_DICE["b"]}
    with pytest.raises(ValueError, match="judges"):
        audit_judges(cases)
    with pytest.raises(ValueError, match="at least one case"):
        audit_judges([])


def test_write_audit_writes_json_and_png_without_temporaries(tmp_path):
    report = audit_judges(hand_cases(perfect=lambda dice: dice, reversed=lambda dice: -dice, oracle=lambda d: d))
    report["recommendation"] = recommend(report)  # the caller adds it once (audit/run.py); written as it is
    paths = write_audit(report, tmp_path / "audit")
    names = {"json": AUDIT_JSON_NAME, "png": AUDIT_PNG_NAME}
    names.update(ranks_png=AUDIT_RANKS_PNG_NAME, pairs_png=AUDIT_PAIRS_PNG_NAME)
    assert paths == {key: tmp_path / "audit" / name for key, name in names.items()}
    saved = json.loads(paths["json"].read_text())
    assert saved["judges"]["perfect"]["spearman"] == pytest.approx(1.0)
    assert saved["recommendation"]["judge"] == "perfect"
    for key in ("png", "ranks_png", "pairs_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in (tmp_path / "audit").iterdir()) == sorted(names.values())


def test_format_table_lists_every_judge_and_its_figures():
    table = format_table(audit_judges(hand_cases(perfect=lambda dice: dice, oracle=lambda dice: -dice)))
    assert "perfect" in table and "oracle (uses labels)" in table
    assert "1.00" in table and "-1.00" in table and "0.850" in table and "+0.400" in table


# --- what decides the gain ------------------------------------------------------------------------------


def test_top1_lift_rank_curve_and_pair_dice_by_hand():
    report = audit_judges(
        hand_cases(perfect=lambda dice: dice, reversed=lambda dice: -dice, constant=lambda dice: np.ones(3)),
        strategies=("top_bottom", "top_rest"),
    )
    # oracle ceiling: (0.9 - 0.7 + 0.8 - 0.6) / 2 = 0.2
    assert report["true_dice"]["oracle_top1_lift"] == pytest.approx(0.2)
    assert report["true_dice"]["oracle_rank_curve"] == pytest.approx([0.2, 0.0, -0.2])
    perfect, reverse, constant = (report["judges"][name] for name in ("perfect", "reversed", "constant"))
    assert perfect["top1_lift"] == pytest.approx(0.2) and perfect["oracle_top1_lift"] == pytest.approx(0.2)
    assert reverse["top1_lift"] == pytest.approx(-0.2) and constant["top1_lift"] == pytest.approx(0.0)
    assert perfect["rank_curve"] == pytest.approx([0.2, 0.0, -0.2])
    assert reverse["rank_curve"] == pytest.approx([-0.2, 0.0, 0.2])
    assert constant["rank_curve"] == pytest.approx([0.0, 0.0, 0.0])  # ties share their mean
    # top_bottom pairs: chosen (0.9, 0.8), rejected (0.5, 0.4)
    top_bottom = perfect["mining"]["top_bottom"]
    assert top_bottom["mean_chosen_true_dice"] == pytest.approx(0.85)
    assert top_bottom["mean_rejected_true_dice"] == pytest.approx(0.45)
    assert perfect["chosen_minus_rejected_true_dice"] == pytest.approx({"top_bottom": 0.4, "top_rest": 0.3})
    assert reverse["chosen_minus_rejected_true_dice"]["top_bottom"] == pytest.approx(-0.4)
    assert constant["chosen_minus_rejected_true_dice"] == {"top_bottom": None, "top_rest": None}
    table = format_table(report)
    assert "top-1 lift" in table and "+0.200" in table and "-0.200" in table and "chosen - rejected" in table


def test_disagreement_correctness_counts_where_each_mask_has_the_true_label():
    truth = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    chosen = np.array([[0, 1, 0, 2], [2, 1, 0, 0]])  # disagrees with rejected at 4 voxels
    rejected = np.array([[1, 1, 1, 2], [0, 2, 0, 1]])
    # disagreeing voxels: (0,0) chosen right; (0,2) rejected right; (1,0) chosen right; (1,1) rejected right;
    # (1,3) chosen right: 5 voxels, 3 where chosen is right, 2 where rejected is
    assert disagreement_correctness(chosen, rejected, truth) == (5, 3, 2)
    assert disagreement_correctness(chosen, chosen, truth) == (0, 0, 0)
    with pytest.raises(ValueError, match="one shape"):
        disagreement_correctness(chosen, rejected, truth[:1])


def test_mined_pairs_report_the_share_of_disagreeing_voxels_where_chosen_is_right():
    # proposal k marks the first k + 1 voxels; truth marks the first 2: between proposals 0 (1 voxel) and
    # 2 (3 voxels) the masks disagree at voxels 1 and 2; the truth has voxel 1, not voxel 2
    truth = np.zeros((4, 4), dtype=np.uint8)
    truth.reshape(-1)[:2] = 1
    cases = [
        AuditCase(
            "a",
            np.array([0.9, 0.7, 0.5]),
            {"picks_2": np.array([0.0, 0.5, 1.0]), "picks_0": np.array([1.0, 0.5, 0.0])},
            distinct_proposals(3),
            true_labels=truth,
        )
    ]
    report = audit_judges(cases, strategies=("top_bottom",))
    for name in ("picks_2", "picks_0"):
        mining = report["judges"][name]["mining"]["top_bottom"]
        assert mining["disagreement_voxels_with_truth"] == 2
        assert mining["chosen_right_in_disagreement"] == pytest.approx(0.5)
        assert mining["rejected_right_in_disagreement"] == pytest.approx(0.5)
    assert "/ 50%" in format_table(report)
    without_truth = audit_judges(hand_cases(perfect=lambda dice: dice), strategies=("top_bottom",))
    assert without_truth["judges"]["perfect"]["mining"]["top_bottom"]["chosen_right_in_disagreement"] is None


def test_rank_curve_averages_tied_scores():
    # mean Dice 0.5: relative (0.4, 0.0, -0.4); the judge ties the first two
    assert rank_curve(np.array([1.0, 1.0, 0.0]), np.array([0.9, 0.5, 0.1])) == pytest.approx([0.2, 0.2, -0.4])
    assert rank_curve(np.array([0.0, 2.0, 1.0]), np.array([0.9, 0.5, 0.1])) == pytest.approx([0.0, -0.4, 0.4])


CURVE = {"metric": "spearman", "points": [[1.0, 1.0], [0.0, -0.3], [0.5, 0.2]], "gain_unit": "Dice points"}


def test_expected_gain_interpolates_and_clips_a_hand_made_curve():
    points = load_reliability_curve(CURVE).points
    assert points == ((0.0, -0.3), (0.5, 0.2), (1.0, 1.0))  # sorted by reliability
    assert expected_gain(0.25, points) == pytest.approx(-0.05)
    assert expected_gain(0.75, points) == pytest.approx(0.6)
    assert expected_gain(0.5, points) == pytest.approx(0.2)
    assert expected_gain(-1.0, points) == pytest.approx(-0.3) and expected_gain(3.0, points) == pytest.approx(1.0)
    assert expected_gain(0.7, [[0.2, 0.5]]) == pytest.approx(0.5)  # one point: a constant
    assert expected_gain(0.5, None) is None and expected_gain(None, points) is None


def test_reliability_curve_file_feeds_the_report_and_table(tmp_path):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({**CURVE, "source": "hand-made"}))
    report = audit_judges(hand_cases(perfect=lambda dice: dice, reversed=lambda dice: -dice), reliability_curve=path)
    assert report["judges"]["perfect"]["expected_gain"] == pytest.approx(1.0)
    assert report["judges"]["reversed"]["expected_gain"] == pytest.approx(-0.3)  # Spearman -1, clipped
    assert report["settings"]["reliability_curve"]["source"] == "hand-made"
    table = format_table(report)
    assert "exp. gain" in table and "+1.000" in table and "-0.300" in table and "Dice points" in table
    without = audit_judges(hand_cases(perfect=lambda dice: dice))
    assert without["judges"]["perfect"]["expected_gain"] is None and "exp. gain" not in format_table(without)


@pytest.mark.parametrize(
    "curve, message",
    [
        ({"metric": "dice", "points": [[0, 0]]}, "'metric' must be one of"),
        ({"metric": "spearman", "points": []}, "at least one point"),
        ({"metric": "spearman", "points": [[0.5, 0.1], [0.5, 0.2]]}, "two gains for one reliability"),
        ({"metric": "top1_lift", "points": [[0.5]]}, "number pairs"),
    ],
)
def test_bad_reliability_curves_are_refused_clearly(curve, message):
    with pytest.raises(ValueError, match=message):
        load_reliability_curve(curve)


def test_missing_curve_file_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        audit_judges(hand_cases(perfect=lambda dice: dice), reliability_curve=tmp_path / "missing.json")


def slab_proposals() -> np.ndarray:
    """Two 3D proposals that differ most on slice 2 (axis 0): 6 voxels there, 1 on slice 1."""
    proposals = np.zeros((2, 4, 8, 8), dtype=np.uint8)
    proposals[:, :, 2:6, 2:6] = 1
    proposals[1, 2, 2:4, 2:5] = 0
    proposals[1, 1, 2, 2] = 0
    return proposals


def test_pair_example_picks_the_most_disagreeing_slice_and_crops_it():
    proposals = slab_proposals()
    image = np.arange(4 * 8 * 8, dtype=np.float32).reshape(1, 4, 8, 8)
    example = pair_example("judge", "top_bottom", "c1", 0, 1, np.array([0.9, 0.7]), proposals, image)
    assert example.slice_index == 2 and example.chosen_true_dice == 0.9 and example.rejected_true_dice == 0.7
    # the crop is the masks' box (2..5) grown by 6 and clipped to the 8x8 slice
    assert example.crop_origin == (0, 0) and example.chosen_slice.shape == (8, 8)
    assert np.count_nonzero(example.chosen_slice != example.rejected_slice) == 6
    assert np.array_equal(example.image_slice, image[0, 2])
    assert example.to_json()["disagreeing_voxels_in_slice"] == 6
    without_image = pair_example("judge", "top_bottom", "c1", 0, 1, np.array([0.9, 0.7]), proposals, None)
    assert without_image.image_slice is None
    flat = pair_example("judge", "top_bottom", "c2", 0, 1, np.array([0.9, 0.7]), proposals[:, 2], image[0, 2])
    assert flat.slice_index == 0 and np.count_nonzero(flat.chosen_slice != flat.rejected_slice) == 6
    with pytest.raises(ValueError, match="case 'c1'.*image"):
        pair_example("judge", "top_bottom", "c1", 0, 1, np.array([0.9, 0.7]), proposals, np.zeros((4, 8, 9)))


def test_montage_pairs_are_collected_per_judge_and_written_without_arrays(tmp_path):
    cases = [
        AuditCase(
            f"case_{index}",
            np.array([0.9, 0.7]),
            {"good": np.array([1.0, 0.0]), "bad": np.array([0.0, 1.0])},
            slab_proposals(),
            image=np.ones((1, 4, 8, 8)) * index,
        )
        for index in range(4)
    ]
    report = audit_judges(cases, strategies=("top_rest", "top_bottom"), montage_pairs_per_judge=2)
    examples = report["pair_examples"]
    assert [(e.judge, e.case_id, e.strategy) for e in examples] == [
        ("good", "case_0", "top_bottom"),
        ("good", "case_1", "top_bottom"),
        ("bad", "case_0", "top_bottom"),
        ("bad", "case_1", "top_bottom"),
    ]
    assert all(isinstance(e, PairExample) for e in examples)
    assert (examples[2].chosen, examples[2].rejected) == (1, 0) and examples[2].chosen_true_dice == 0.7
    paths = write_audit(report, tmp_path)
    saved = json.loads(paths["json"].read_text())["pair_examples"]
    assert saved[0]["case_id"] == "case_0" and saved[0]["slice_index"] == 2 and "chosen_slice" not in saved[0]
    assert paths["pairs_png"].stat().st_size > 1000
    assert audit_judges(cases, montage_pairs_per_judge=0)["pair_examples"] == []
