"""Pair mining on small hand-made label maps: roles from scores, no self or identical pairs, seeded."""

import inspect

import numpy as np
import pytest

from nnunet_rndpo.mining import (
    MINING_STRATEGIES,
    Pair,
    PairMiner,
    case_rng,
    disagreement_matrix,
    mine_case_outcome,
    mine_pairs,
)


def mine_case_pairs(*args, **kwargs):
    return list(mine_case_outcome(*args, **kwargs).pairs)


def distinct_proposals(count: int, size: int = 8) -> np.ndarray:
    """`count` label maps that differ pairwise: proposal k has its first k+1 voxels set to 1."""
    proposals = np.zeros((count, size, size), dtype=np.uint8)
    for index in range(count):
        proposals[index].reshape(-1)[: index + 1] = 1
    return proposals


def random_cases(case_count: int = 20, proposal_count: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (f"case_{index:02d}", rng.random(proposal_count), distinct_proposals(proposal_count))
        for index in range(case_count)
    ]


def test_disagreement_matrix_counts_differing_voxels():
    proposals = distinct_proposals(3)
    assert np.array_equal(disagreement_matrix(proposals), [[0, 1, 2], [1, 0, 1], [2, 1, 0]])


@pytest.mark.parametrize("strategy", MINING_STRATEGIES)
def test_no_self_pairs_and_no_identical_masks(strategy):
    result = mine_pairs(random_cases(), strategy, margin=0.1, seed=1)
    assert result.pairs
    for pair in result.pairs:
        assert pair.chosen != pair.rejected
        assert pair.disagreement_voxels == abs(pair.chosen - pair.rejected)  # from distinct_proposals


def test_top_bottom_and_top_rest_take_roles_from_scores():
    proposals = distinct_proposals(4)
    scores = np.array([0.2, 0.9, 0.5, 0.1])
    rng = np.random.default_rng(0)
    assert mine_case_pairs("c", scores, proposals, "top_bottom", rng=rng) == [Pair("c", 1, 3, pytest.approx(0.8), 2)]
    top_rest = mine_case_pairs("c", scores, proposals, "top_rest", rng=rng)
    assert [(pair.chosen, pair.rejected) for pair in top_rest] == [(1, 2), (1, 0), (1, 3)]
    # flipping the scores flips the roles
    flipped = mine_case_pairs("c", -scores, proposals, "top_bottom", rng=rng)
    assert [(pair.chosen, pair.rejected) for pair in flipped] == [(3, 1)]


def test_top_plain_pairs_the_judges_pick_with_the_models_own_prediction():
    proposals = distinct_proposals(4)  # index 0: the plain pass, what the model predicts now
    rng = np.random.default_rng(0)
    pairs = mine_case_pairs("c", np.array([0.2, 0.9, 0.5, 0.1]), proposals, "top_plain", rng=rng)
    # not the worst member (3): the pair is the voxels where the pick would change the model's prediction
    assert pairs == [Pair("c", 1, 0, pytest.approx(0.7), 1)]
    # the model's own prediction is already the judge's best: nothing to correct
    assert mine_case_pairs("c", np.array([0.9, 0.2, 0.5, 0.1]), proposals, "top_plain", rng=rng) == []
    # a pick identical to the plain mask is counted, as every strategy counts identical pairs
    same_as_plain = proposals.copy()
    same_as_plain[2] = same_as_plain[0]
    outcome = mine_case_outcome("c", np.array([0.2, 0.1, 0.9, 0.0]), same_as_plain, "top_plain", rng=rng)
    assert outcome.pairs == () and outcome.identical_pairs_skipped == 1


def test_halves_draws_the_chosen_from_the_top_half_and_the_rejected_from_the_bottom_half():
    proposals = distinct_proposals(5)
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3])  # top half {1, 3}, middle 0, bottom half {4, 2}
    drawn = set()
    for seed in range(40):
        (pair,) = mine_case_pairs("c", scores, proposals, "halves", rng=np.random.default_rng(seed))
        assert pair.chosen in (1, 3) and pair.rejected in (2, 4)
        assert pair.score_gap == pytest.approx(scores[pair.chosen] - scores[pair.rejected])
        drawn.add((pair.chosen, pair.rejected))
    assert drawn == {(1, 2), (1, 4), (3, 2), (3, 4)}  # every member of each half is drawn, not only the extremes
    # two proposals: the halves are the top and the bottom one
    (pair,) = mine_case_pairs("c", np.array([0.1, 0.8]), proposals[:2], "halves", rng=np.random.default_rng(0))
    assert (pair.chosen, pair.rejected) == (1, 0)
    # one proposal has no halves
    assert mine_case_pairs("c", np.array([0.4]), proposals[:1], "halves", rng=np.random.default_rng(0)) == []


def test_margin_keeps_only_pairs_with_a_large_enough_gap():
    proposals = distinct_proposals(3)
    scores = np.array([0.90, 0.87, 0.50])
    pairs = mine_case_pairs("c", scores, proposals, "margin", margin=0.05, rng=np.random.default_rng(0))
    assert sorted((pair.chosen, pair.rejected) for pair in pairs) == [(0, 2), (1, 2)]
    assert sorted(pair.score_gap for pair in pairs) == pytest.approx([0.37, 0.40])
    pairs = mine_case_pairs("c", scores, proposals, "margin", margin=0.01, rng=np.random.default_rng(0))
    assert len(pairs) == 3 and all(pair.score_gap > 0 for pair in pairs)


def test_identical_masks_give_no_pair_and_are_counted():
    same = np.ones((4, 3, 3), dtype=np.uint8)
    result = mine_pairs([("all_same", np.array([0.1, 0.4, 0.3, 0.9]), same)], "top_rest")
    assert result.pairs == ()
    assert result.cases_without_pair == 1 and result.cases_all_identical == 1
    assert result.identical_pairs_skipped == 3

    # top and bottom identical, the middle one different: top_bottom's only candidate is dropped
    proposals = np.stack([np.zeros((3, 3)), np.ones((3, 3)), np.zeros((3, 3))]).astype(np.uint8)
    result = mine_pairs([("two_same", np.array([0.9, 0.5, 0.1]), proposals)], "top_bottom")
    assert result.pairs == () and result.identical_pairs_skipped == 1 and result.cases_all_identical == 0
    result = mine_pairs([("two_same", np.array([0.9, 0.5, 0.1]), proposals)], "top_rest")
    assert [(pair.chosen, pair.rejected) for pair in result.pairs] == [(0, 1)]
    assert mine_pairs([("all_same", np.zeros(4), same)], "random").cases_all_identical == 1


def test_tied_scores_never_form_a_pair():
    proposals = distinct_proposals(3)
    result = mine_pairs([("tied", np.full(3, 0.5), proposals)], "top_bottom")
    assert result.pairs == () and result.tied_pairs_skipped == 1 and result.cases_without_pair == 1
    result = mine_pairs([("top_tie", np.array([0.8, 0.8, 0.1]), proposals)], "top_rest")
    assert len(result.pairs) == 1 and result.pairs[0].rejected == 2 and result.tied_pairs_skipped == 1


def test_top_ties_are_broken_by_the_seeded_rng_not_by_index():
    proposals = distinct_proposals(3)
    cases = [(f"case_{index}", np.array([0.8, 0.8, 0.1]), proposals) for index in range(40)]
    chosen = {pair.chosen for pair in mine_pairs(cases, "top_bottom").pairs}
    assert chosen == {0, 1}


def test_mining_has_no_access_to_labels_and_follows_a_wrong_judge():
    for function in (mine_case_pairs, mine_pairs):
        parameters = set(inspect.signature(function).parameters)
        assert not parameters & {"labels", "reference", "true_dice"}
    # a judge that prefers the empty proposal: mining obeys the judge
    proposals = np.stack([np.ones((3, 3)), np.zeros((3, 3))]).astype(np.uint8)
    pairs = mine_case_pairs("c", np.array([0.1, 0.9]), proposals, "top_bottom", rng=np.random.default_rng(0))
    assert (pairs[0].chosen, pairs[0].rejected) == (1, 0)


@pytest.mark.parametrize("strategy", MINING_STRATEGIES)
def test_deterministic_per_seed_and_independent_of_case_order(strategy):
    cases = random_cases()
    first = mine_pairs(cases, strategy, seed=7)
    assert mine_pairs(cases, strategy, seed=7) == first
    assert set(mine_pairs(list(reversed(cases)), strategy, seed=7).pairs) == set(first.pairs)


def test_random_control_ignores_scores_and_changes_with_the_seed():
    cases = random_cases(case_count=40)
    result = mine_pairs(cases, "random", seed=0)
    assert len(result.pairs) == 40
    gaps = np.array([pair.score_gap for pair in result.pairs])
    assert (gaps > 0).any() and (gaps < 0).any()  # roles by coin, not by judge
    assert mine_pairs(cases, "random", seed=1).pairs != result.pairs


def test_case_rng_depends_on_seed_and_case_id_only():
    assert case_rng(3, "a").random() == case_rng(3, "a").random()
    assert case_rng(3, "a").random() != case_rng(3, "b").random()
    assert case_rng(3, "a").random() != case_rng(4, "a").random()


def test_invalid_input_is_rejected():
    proposals = distinct_proposals(3)
    with pytest.raises(ValueError) as error:
        mine_pairs([], "best_worst")
    assert all(strategy in str(error.value) for strategy in MINING_STRATEGIES)
    with pytest.raises(ValueError, match="margin"):
        PairMiner("margin", margin=-0.1)
    with pytest.raises(ValueError, match="NaN"):
        mine_pairs([("c", np.array([0.1, np.nan, 0.2]), proposals)], "top_bottom")
    with pytest.raises(ValueError, match="scores of shape"):
        mine_pairs([("c", np.array([0.1, 0.2]), proposals)], "top_bottom")
    with pytest.raises(ValueError, match="twice"):
        mine_pairs([("c", np.arange(3.0), proposals), ("c", np.arange(3.0), proposals)], "top_bottom")


def test_summary_counts_cases_and_pairs():
    proposals = distinct_proposals(3)
    cases = [("a", np.array([0.3, 0.2, 0.1]), proposals), ("b", np.full(3, 0.5), proposals)]
    summary = mine_pairs(cases, "top_bottom").summary()
    assert summary["pairs"] == 1 and summary["cases_total"] == 2 and summary["cases_without_pair"] == 1
    assert summary["mean_disagreement_voxels"] == 2.0
