"""learned_qc fitted on held-out predictions of fold models: honest examples only."""

import numpy as np
import pytest
from test_judges import ordered_case

from nnunet_rndpo.judges import Judge, JudgeError, LearnedQCJudge, score_case
from nnunet_rndpo.judges.learned_qc import HeldOutPrediction, fit_on_held_out_predictions
from nnunet_rndpo.segmentation_metrics import proposal_dice


def held_out_examples():
    """Fold 0 held out cases a, b; fold 1 held out c, d (ordered cases: truth, dilated, fragmented, empty)."""
    shifts = {"a": -1.5, "b": -0.5, "c": 0.5, "d": 1.5}
    return [
        HeldOutPrediction(ordered_case(case_id, centre=(7.5 + shift, 7.5 - shift, 7.5)), fold=int(case_id in "cd"))
        for case_id, shift in shifts.items()
    ]


FOLD_TRAINING = {0: {"c", "d"}, 1: {"a", "b"}}


def test_fits_on_held_out_examples_and_ranks(tmp_path):
    judge = fit_on_held_out_predictions(held_out_examples(), fold_training_cases=FOLD_TRAINING)
    assert isinstance(judge, LearnedQCJudge) and judge.training_samples == 16
    assert "held-out predictions of folds 0, 1" in judge.describe()
    test_case = ordered_case("test", with_true_labels=False)
    scores = score_case(judge, test_case)
    assert scores[0] > scores[2] > scores[3]
    judge.save(tmp_path / "qc.pkl")
    reloaded = Judge.load(tmp_path / "qc.pkl")
    assert reloaded.training_source == judge.training_source
    assert np.array_equal(score_case(reloaded, test_case), scores)


def test_given_true_dice_are_the_targets():
    # Reversed targets: the regressor must learn that the empty mask is the best one.
    examples = []
    for example in held_out_examples():
        true_dice = proposal_dice(example.case.proposals, example.case.true_labels, (1,))
        examples.append(HeldOutPrediction(example.case, example.fold, true_dice=1.0 - true_dice))
    scores = score_case(fit_on_held_out_predictions(examples), ordered_case("test"))
    assert scores[3] > scores[0]


def test_same_examples_give_the_same_judge_as_fit_on_the_cases():
    examples = held_out_examples()
    honest = fit_on_held_out_predictions(examples)
    plain = LearnedQCJudge()
    plain.fit([example.case for example in examples])
    case = ordered_case("test")
    assert np.array_equal(honest.score(case), plain.score(case))


def test_in_sample_examples_are_refused_naming_case_and_fold():
    examples = held_out_examples()
    examples[2] = HeldOutPrediction(examples[2].case, fold=1, in_sample=True)
    with pytest.raises(JudgeError, match="case 'c' of fold 1 is marked in-sample"):
        fit_on_held_out_predictions(examples)
    with pytest.raises(JudgeError, match="case 'a' of fold 0: the case is in that fold's training cases"):
        fit_on_held_out_predictions(held_out_examples(), fold_training_cases={0: {"a"}, 1: set()})
    with pytest.raises(JudgeError, match="fold 1 is not in fold_training_cases"):
        fit_on_held_out_predictions(held_out_examples(), fold_training_cases={0: set()})


def test_bad_examples_are_refused_clearly():
    with pytest.raises(JudgeError, match="at least one held-out example"):
        fit_on_held_out_predictions([])
    unlabeled = HeldOutPrediction(ordered_case("u", with_true_labels=False), fold=0)
    with pytest.raises(JudgeError, match="case 'u' of fold 0: neither true_dice nor"):
        fit_on_held_out_predictions([unlabeled])
    wrong = HeldOutPrediction(ordered_case("w"), fold=2, true_dice=np.ones(3))
    with pytest.raises(JudgeError, match="case 'w' of fold 2: true_dice must be 4 finite numbers"):
        fit_on_held_out_predictions([wrong])
