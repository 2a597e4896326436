"""Judge audit on a hand-made example whose figures are computed by hand below."""
import json

import numpy as np
import pytest

from nnunet_rndpo.audit import (
    AUDIT_JSON_NAME,
    AUDIT_PNG_NAME,
    AuditCase,
    audit_judges,
    format_table,
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
    assert report["cases"] == 2 and report["true_dice"] == pytest.approx({"mean_proposal": 0.65, "oracle_best": 0.85})
    perfect, reverse, constant = (report["judges"][name] for name in ("perfect", "reversed", "constant"))

    assert perfect["spearman"] == pytest.approx(1.0) and perfect["kendall"] == pytest.approx(1.0)
    assert perfect["top1_hit_rate"] == 1.0 and perfect["top1_true_dice"] == pytest.approx(0.85)
    # top_bottom pairs: (0.9 vs 0.5) and (0.8 vs 0.4) -> gaps 0.4; top_rest: gaps 0.2, 0.4, 0.2, 0.4
    assert perfect["mining"]["top_bottom"]["mean_true_dice_gap"] == pytest.approx(0.4)
    assert perfect["mining"]["top_rest"]["mean_true_dice_gap"] == pytest.approx(0.3)
    assert perfect["mining"]["top_rest"]["pairs"] == 4
    assert perfect["mining"]["top_rest"]["wrong_role_fraction"] == 0.0

    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["kendall"] == pytest.approx(-1.0)
    assert reverse["top1_hit_rate"] == 0.0 and reverse["top1_true_dice"] == pytest.approx(0.45)
    assert reverse["mining"]["top_bottom"]["mean_true_dice_gap"] == pytest.approx(-0.4)
    assert reverse["mining"]["top_bottom"]["wrong_role_fraction"] == 1.0

    # constant scores: no ranking (both cases skipped), top-1 is the expectation of a random pick
    assert constant["spearman"] is None and constant["cases_skipped_constant"] == 2
    assert constant["top1_hit_rate"] == pytest.approx(1 / 3)
    assert constant["top1_true_dice"] == pytest.approx(0.65)
    assert constant["mining"]["top_bottom"]["pairs"] == 0
    assert constant["mining"]["top_bottom"]["cases_without_pair"] == 2
    assert constant["mining"]["top_bottom"]["mean_true_dice_gap"] is None


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
    paths = write_audit(report, tmp_path / "audit")
    assert paths == {"json": tmp_path / "audit" / AUDIT_JSON_NAME, "png": tmp_path / "audit" / AUDIT_PNG_NAME}
    saved = json.loads(paths["json"].read_text())
    assert saved["judges"]["perfect"]["spearman"] == pytest.approx(1.0)
    assert saved["recommendation"]["judge"] == "perfect"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in (tmp_path / "audit").iterdir()) == sorted([AUDIT_JSON_NAME, AUDIT_PNG_NAME])


def test_format_table_lists_every_judge_and_its_figures():
    table = format_table(audit_judges(hand_cases(perfect=lambda dice: dice, oracle=lambda dice: -dice)))
    assert "perfect" in table and "oracle (uses labels)" in table
    assert "1.00" in table and "-1.00" in table and "0.850" in table and "+0.400" in table
