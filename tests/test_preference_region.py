"""preference_region: a pair pushes only the disagreeing voxels its judge's ranking ("ranked_consensus") or the
proposals' vote ("majority") agrees on. Hand-made arrays; the pairs file, the pair loader, the settings and the
audit each carry it."""

from __future__ import annotations

import numpy as np
import pytest

from nnunet_rndpo import pairs
from nnunet_rndpo.audit import AuditCase, audit_judges
from nnunet_rndpo.preference_region import (
    NO_MAJORITY,
    check_region,
    holds_majority,
    kept_voxels,
    majority_labels,
    preference_rejected,
    ranked_halves,
)
from nnunet_rndpo.training.pair_data import LOCATIONS_KEY, PairDataset, TrainingItem
from nnunet_rndpo.training.settings import PreferenceSettings, SettingsError, validate

# Six proposals of a 1 x 6 image, best-scored first. Proposal 0 (chosen) and 5 (rejected) disagree at voxels 0-3:
# voxel 0: the top half (0, 1, 2) says 1 (3 of 3), the bottom half (3, 4, 5) says 0 (3 of 3): kept;
# voxel 1: chosen 1 but proposals 1 and 2 say 0 (1 of 3 hold the chosen label): dropped;
# voxel 2: rejected 2, but proposals 3 and 4 say 1 (1 of 3 hold the rejected label): dropped;
# voxel 3: chosen 1 held by 2 of 3, rejected 0 held by 2 of 3: kept; voxels 4-5: the pair agrees.
# "majority" (more than 3 of all 6 hold the chosen label) keeps voxel 2 only (5 of 6); voxels 0, 1, 3: 3 of 6.
PROPOSALS = np.array(
    [
        [[1, 1, 1, 1, 0, 2]],  # 0: chosen
        [[1, 0, 1, 1, 0, 2]],
        [[1, 0, 1, 0, 0, 2]],
        [[0, 1, 1, 1, 0, 2]],
        [[0, 1, 1, 0, 0, 2]],
        [[0, 0, 2, 0, 0, 2]],  # 5: rejected
    ],
    dtype=np.uint8,
)
SCORES = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])


def test_ranked_halves_put_chosen_on_top_and_rejected_at_the_bottom():
    assert ranked_halves(SCORES, 0, 5) == ((0, 1, 2), (3, 4, 5))
    # ties: the pair's own masks stay on their sides whatever the order of equal scores
    assert ranked_halves(np.array([0.5, 0.5, 0.5, 0.5]), 3, 0) == ((1, 3), (0, 2))
    # an odd count leaves the middle proposal out; two proposals are their own halves
    assert ranked_halves(np.array([0.1, 0.9, 0.5, 0.7, 0.3]), 1, 0) == ((1, 3), (0, 4))
    assert ranked_halves(np.array([0.2, 0.8]), 1, 0) == ((1,), (0,))
    with pytest.raises(ValueError, match="two different indices"):
        ranked_halves(SCORES, 2, 2)


def test_holds_majority_needs_more_than_half():
    masks = np.array([[0, 1, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]])
    # label 0 at voxel 0: 2 of 4 (not more than half); label 1 at voxel 1: 3 of 4; label 0 at voxel 2: 3 of 4
    assert holds_majority(masks, np.array([0, 1, 0])).tolist() == [False, True, True]


def test_majority_labels_name_the_label_more_than_half_hold():
    masks = np.array([[0, 1, 1, 2], [0, 1, 0, 2], [1, 1, 0, 0], [1, 0, 0, 1]])
    # voxel 0: 0 and 1 twice each (no majority); voxel 1: 1 three times; voxel 2: 0 three times; voxel 3: 2 twice
    assert majority_labels(masks).tolist() == [NO_MAJORITY, 1, 0, NO_MAJORITY]
    assert majority_labels(PROPOSALS)[0].tolist() == [NO_MAJORITY, NO_MAJORITY, 1, NO_MAJORITY, 0, 2]


def test_majority_labels_answer_holds_majority_for_every_label_map():
    # many labels, odd and even counts, long runs where a candidate is replaced: against the direct count
    generator = np.random.default_rng(0)
    for count in (1, 2, 5, 8, 41):
        masks = (generator.random((count, 300)) ** 3 * 7).astype(np.uint8)
        majority = majority_labels(masks)
        for label_map in masks:
            assert np.array_equal(label_map == majority, holds_majority(masks, label_map))
        for label in range(7):
            expected = 2 * np.count_nonzero(masks == label, axis=0) > count
            assert np.array_equal(majority == label, expected)
        if count > 1:  # a pair's kept voxels with the case's vote given once, and without it
            given = kept_voxels(masks, 0, count - 1, "majority", majority=majority)
            assert np.array_equal(given, kept_voxels(masks, 0, count - 1, "majority"))


def test_consensus_keeps_the_voxels_both_halves_agree_on():
    top, bottom = ranked_halves(SCORES, 0, 5)
    kept = kept_voxels(PROPOSALS, 0, 5, "ranked_consensus", top, bottom)
    assert kept[0].tolist() == [True, False, False, True, False, False]
    narrowed = preference_rejected(PROPOSALS, 0, 5, "ranked_consensus", top, bottom)
    # the rejected label where kept, the chosen label elsewhere
    assert narrowed[0].tolist() == [0, 1, 1, 0, 0, 2]
    assert np.array_equal(preference_rejected(PROPOSALS, 0, 5), PROPOSALS[5])  # "disagreement": as it is
    # two proposals: nothing is dropped
    assert np.array_equal(preference_rejected(PROPOSALS[[0, 5]], 0, 1, "ranked_consensus", (0,), (1,)), PROPOSALS[5])
    with pytest.raises(ValueError, match="halves"):
        kept_voxels(PROPOSALS, 0, 5, "ranked_consensus")
    check_region("ranked_consensus")
    with pytest.raises(ValueError, match="ranked_consensus"):
        check_region("consensus")


def test_majority_keeps_the_voxels_where_most_proposals_hold_the_chosen_label():
    assert kept_voxels(PROPOSALS, 0, 5, "majority")[0].tolist() == [False, False, True, False, False, False]
    assert preference_rejected(PROPOSALS, 0, 5, "majority")[0].tolist() == [1, 1, 2, 1, 0, 2]


class OneCaseStore:
    def load_case(self, case_id):
        assert case_id == "case"
        return {"proposals": PROPOSALS}

    def load_proposals(self, case_id):
        return self.load_case(case_id)["proposals"]


def test_pairs_file_names_the_halves_and_counts_the_kept_voxels():
    scores = {"case": SCORES.tolist()}
    plain = pairs.pairs_record(OneCaseStore(), scores, "top_bottom", 0.0, 0)
    assert "top_half" not in plain["items"][0] and plain["summary"]["preference_region"] == "disagreement"
    record = pairs.pairs_record(OneCaseStore(), scores, "top_bottom", 0.0, 0, "ranked_consensus")
    (item,) = record["items"]
    assert (item["chosen"], item["rejected"], item["disagreement_voxels"]) == (0, 5, 4)
    assert (item["top_half"], item["bottom_half"], item["preference_voxels"]) == ([0, 1, 2], [3, 4, 5], 2)
    assert item["preference_region"] == "ranked_consensus" and record["summary"]["mean_preference_voxels"] == 2.0
    (majority,) = pairs.pairs_record(OneCaseStore(), scores, "top_bottom", 0.0, 0, "majority")["items"]
    assert majority["preference_voxels"] == 1 and "top_half" not in majority
    with pytest.raises(ValueError, match="preference_region"):
        pairs.PairSettings.from_run_settings(PreferenceSettings(), preference_region="everywhere")


class ImageReader:
    def load(self, case_id):
        return np.ones((1, *PROPOSALS.shape[1:]), np.float32), np.zeros((1, *PROPOSALS.shape[1:]), np.int8), {}


def test_pair_loader_trains_on_the_narrowed_rejected_mask_and_samples_only_kept_voxels():
    record = pairs.pairs_record(OneCaseStore(), {"case": SCORES.tolist()}, "top_bottom", 0.0, 0, "ranked_consensus")
    item = TrainingItem.from_record(record["items"][0])
    assert (item.region, item.top_half, item.bottom_half) == ("ranked_consensus", (0, 1, 2), (3, 4, 5))
    dataset = PairDataset([item], OneCaseStore(), ImageReader())
    _, seg, _, properties = dataset.load_case(item.key)
    assert seg[0].tolist() == PROPOSALS[0].tolist()
    assert seg[1].tolist() == [[0, 1, 1, 0, 0, 2]]
    assert sorted(properties["class_locations"][LOCATIONS_KEY][:, 2].tolist()) == [0, 3]
    # an item of an older pairs file (no halves) trains on the rejected proposal as it is
    plain = TrainingItem.from_record({"case_id": "case", "chosen": 0, "rejected": 5})
    _, seg, _, _ = PairDataset([plain], OneCaseStore(), ImageReader()).load_case(plain.key)
    assert seg[1].tolist() == PROPOSALS[5].tolist()


def test_settings_carry_the_region_to_pair_preparation():
    settings = validate(PreferenceSettings(preference_region="ranked_consensus"))
    assert pairs.PairSettings.from_run_settings(settings).preference_region == "ranked_consensus"
    with pytest.raises(SettingsError, match="preference_region='voxels' is not valid; valid: disagreement"):
        validate(PreferenceSettings(preference_region="voxels"))


def test_audit_reports_the_right_share_on_the_kept_voxels():
    # truth agrees with the chosen mask at voxels 0 and 3 (the consensus keeps both), with the rejected one at 1, 2
    truth = np.array([[1, 0, 2, 1, 0, 2]], dtype=np.uint8)
    true_dice = np.linspace(0.9, 0.4, 6)  # only the judge's scores decide the pair and the halves
    case = AuditCase("case", true_dice, {"judge": SCORES}, PROPOSALS, true_labels=truth)
    mining = audit_judges([case], strategies=("top_bottom",))["judges"]["judge"]["mining"]["top_bottom"]
    assert mining["chosen_right_in_disagreement"] == pytest.approx(0.5)
    assert mining["rejected_right_in_disagreement"] == pytest.approx(0.5)
    consensus, majority = (mining["preference_regions"][r] for r in ("ranked_consensus", "majority"))
    assert (consensus["kept_fraction"], consensus["chosen_right"], consensus["rejected_right"]) == (0.5, 1.0, 0.0)
    # majority keeps voxel 2 only, where the truth is the rejected label
    assert (majority["kept_fraction"], majority["chosen_right"], majority["rejected_right"]) == (0.25, 0.0, 1.0)


# The judge's own voxel probabilities for PROPOSALS (channel index = label value): at voxels 0-3, where the pair
# disagrees, they favour the chosen label at voxels 0 and 2 (1 over 0, 1 over 2) and the rejected one at 1 and 3.
JUDGE_PROBABILITIES = np.array(
    [
        [[0.2, 0.6, 0.1, 0.5, 0.9, 0.0]],  # background
        [[0.8, 0.4, 0.6, 0.4, 0.1, 0.0]],  # label 1
        [[0.0, 0.0, 0.3, 0.1, 0.0, 1.0]],  # label 2
    ],
    dtype=np.float32,
)


def test_judge_voxels_keeps_the_voxels_where_the_judge_favours_the_chosen_label():
    kept = kept_voxels(PROPOSALS, 0, 5, "judge_voxels", judge_probabilities=JUDGE_PROBABILITIES)
    assert kept[0].tolist() == [True, False, True, False, False, False]
    narrowed = preference_rejected(PROPOSALS, 0, 5, "judge_voxels", judge_probabilities=JUDGE_PROBABILITIES)
    assert narrowed[0].tolist() == [0, 1, 2, 1, 0, 2]
    # a tie (0.5 against 0.5) is no preference: dropped
    tied = JUDGE_PROBABILITIES.copy()
    tied[:2, 0, 0] = 0.5
    assert not kept_voxels(PROPOSALS, 0, 5, "judge_voxels", judge_probabilities=tied)[0, 0]
    with pytest.raises(ValueError, match="per-voxel class probabilities"):
        kept_voxels(PROPOSALS, 0, 5, "judge_voxels")
    with pytest.raises(ValueError, match=r"labels up to 2"):
        kept_voxels(PROPOSALS, 0, 5, "judge_voxels", judge_probabilities=JUDGE_PROBABILITIES[:2])


class VoxelStore(OneCaseStore):
    """OneCaseStore with a judge's voxel probabilities saved under key 'atlas'."""

    def load_voxel_probabilities(self, judge_key, case_id):
        assert (judge_key, case_id) == ("atlas", "case")
        return JUDGE_PROBABILITIES


def test_pairs_file_and_pair_loader_read_the_judges_voxels():
    scores = {"case": SCORES.tolist()}
    with pytest.raises(ValueError, match="key of the judge's per-voxel probabilities"):
        pairs.pairs_record(VoxelStore(), scores, "top_bottom", 0.0, 0, "judge_voxels")
    record = pairs.pairs_record(VoxelStore(), scores, "top_bottom", 0.0, 0, "judge_voxels", "atlas")
    (entry,) = record["items"]
    assert (entry["preference_region"], entry["voxel_judge_key"], entry["preference_voxels"]) == (
        "judge_voxels",
        "atlas",
        2,
    )
    assert "top_half" not in entry
    item = TrainingItem.from_record(entry)
    _, seg, _, properties = PairDataset([item], VoxelStore(), ImageReader()).load_case(item.key)
    assert seg[1].tolist() == [[0, 1, 2, 1, 0, 2]]
    assert sorted(properties["class_locations"][LOCATIONS_KEY][:, 2].tolist()) == [0, 2]


def test_settings_refuse_judge_voxels_with_a_judge_without_voxel_probabilities():
    settings = validate(PreferenceSettings(judge="atlas", preference_region="judge_voxels"))
    assert pairs.PairSettings.from_run_settings(settings).preference_region == "judge_voxels"
    with pytest.raises(
        SettingsError, match=r"judge \(for preference_region 'judge_voxels'\)='agreement'.*valid: atlas"
    ):
        validate(PreferenceSettings(judge="agreement", preference_region="judge_voxels"))


def test_audit_reports_judge_voxels_only_for_a_judge_that_has_them():
    truth = np.array([[1, 0, 2, 1, 0, 2]], dtype=np.uint8)  # chosen right at voxels 0 and 3, rejected at 1 and 2
    true_dice = np.linspace(0.9, 0.4, 6)
    case = AuditCase(
        "case",
        true_dice,
        {"atlas": SCORES, "other": SCORES},
        PROPOSALS,
        true_labels=truth,
        judge_voxel_probabilities={"atlas": JUDGE_PROBABILITIES},
    )
    judges = audit_judges([case], strategies=("top_bottom",))["judges"]
    voxels = judges["atlas"]["mining"]["top_bottom"]["preference_regions"]["judge_voxels"]
    # kept: voxels 0 (chosen right) and 2 (rejected right)
    assert (voxels["kept_fraction"], voxels["chosen_right"], voxels["rejected_right"]) == (0.5, 0.5, 0.5)
    other = judges["other"]["mining"]["top_bottom"]["preference_regions"]["judge_voxels"]
    assert other == {"kept_fraction": None, "chosen_right": None, "rejected_right": None}
