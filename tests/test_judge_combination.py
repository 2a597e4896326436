"""Combination judge on hand-made scores: user judges with known scores, and the built-ins it fits."""

import sys
import textwrap

import numpy as np
import pytest

from nnunet_rndpo.judges import CombinationJudge, Judge, JudgeError, JudgeInput, get_judge, score_case
from nnunet_rndpo.judges.combination import normalised_ranks

FIXED_SCORES = '''
import numpy as np
from nnunet_rndpo.judges import Judge

class Ascending(Judge):
    """Scores 0, 1, 2, ...: prefers the last proposal."""
    def score(self, case):
        return np.arange(case.proposal_count, dtype=float)

class HugeDescending(Judge):
    """Scores on a wild scale, preferring the first proposal."""
    def score(self, case):
        return -1e6 * np.arange(case.proposal_count, dtype=float) ** 3

class Counting(Judge):
    """Learns: remembers how many labeled cases it was fitted on and scores with it."""
    def __init__(self):
        self.seen = 0
    def fit(self, labeled_cases):
        self.seen = len(list(labeled_cases))
    def fitted_state(self):
        return {"seen": self.seen} if self.seen else {}
    def load_fitted_state(self, fitted):
        self.seen = fitted.get("seen", 0)
    def score(self, case):
        return np.full(case.proposal_count, float(self.seen))
'''


@pytest.fixture
def fixed_judges(tmp_path, monkeypatch):
    (tmp_path / "fixed_score_judges.py").write_text(textwrap.dedent(FIXED_SCORES))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fixed_score_judges"
    sys.modules.pop("fixed_score_judges", None)


def four_proposals(case_id="c") -> JudgeInput:
    proposals = np.zeros((4, 3, 3, 3), dtype=np.uint8)
    for index in range(4):
        proposals[index].reshape(-1)[: index + 1] = 1
    return JudgeInput(case_id, proposals, (1,), true_labels=proposals[0])


def test_normalised_ranks_hand_values():
    assert np.allclose(normalised_ranks(np.array([10.0, -5.0, 3.0])), [1.0, 0.0, 0.5])
    assert np.allclose(normalised_ranks(np.array([1.0, 1.0, 0.0, 2.0])), [0.5, 0.5, 0.0, 1.0])
    assert np.array_equal(normalised_ranks(np.array([7.0])), [0.5])


def test_weighted_sum_of_ranks_ignores_the_judges_scales(fixed_judges):
    up, down = f"{fixed_judges}:Ascending", f"{fixed_judges}:HugeDescending"
    ranks_up = np.array([0, 1, 2, 3]) / 3
    for weights in ([0.5, 0.5], [0.75, 0.25], [1.0, 0.0]):
        judge = get_judge("combination", judges=[up, down], weights=weights)
        expected = weights[0] * ranks_up + weights[1] * ranks_up[::-1]
        assert np.allclose(score_case(judge, four_proposals()), expected), weights
    equal = CombinationJudge(judges=[up, down])
    assert equal.weights == [0.5, 0.5] and np.allclose(score_case(equal, four_proposals()), 0.5)


def test_fit_reaches_learning_sub_judges_and_round_trips(fixed_judges, tmp_path):
    counting = f"{fixed_judges}:Counting"
    judge = CombinationJudge(judges=["agreement", counting], weights=[1.0, 1.0])
    judge.fit([four_proposals("a"), four_proposals("b"), four_proposals("c")])
    assert judge.judges[1].seen == 3
    judge.save(tmp_path / "combination.pkl")
    reloaded = Judge.load(tmp_path / "combination.pkl")
    assert isinstance(reloaded, CombinationJudge) and reloaded.judges[1].seen == 3
    assert reloaded.options() == judge.options()
    case = four_proposals("test")
    assert np.array_equal(reloaded.score(case), judge.score(case))


def test_builtin_agreement_plus_anatomy_fits_and_ranks():
    from test_judge_anatomy import LABELS, defective_proposals, labeled_references

    judge = get_judge("combination", judges=["agreement", "anatomy"], weights=[0.2, 0.8])
    judge.fit(labeled_references(6))
    proposals, names = defective_proposals()
    scores = score_case(judge, JudgeInput("test", proposals, LABELS))
    assert np.argmax(scores) == 0, dict(zip(names, scores))
    assert "anatomy" in judge.describe() and "fitted on 6" in judge.describe()


class RecordingExamples:
    """FitExamples that records what each judge asks for (the data a judge learns from is its own request)."""

    def __init__(self):
        self.asked: list[str] = []

    def true_label_maps(self, with_images=False):
        self.asked.append("label maps with images" if with_images else "label maps")
        return [four_proposals(f"labeled_{i}") for i in range(3)]

    def held_out_predictions(self):
        self.asked.append("held-out predictions")
        return [four_proposals(f"held_out_{i}") for i in range(3)]


def asked_by(spec: str, **options) -> list[str]:
    examples = RecordingExamples()
    get_judge(spec, **options).fit_from(examples)
    return examples.asked


def test_combination_learns_only_when_a_sub_judge_learns(fixed_judges):
    assert not get_judge("combination", judges=["agreement", "uncertainty"]).learns
    assert get_judge("combination", judges=["agreement", "anatomy"]).learns
    assert get_judge("anatomy").learns and not get_judge("agreement").learns
    # each judge asks for its own kind of examples: anatomy and the virtual annotator the references alone, a judge
    # that learns from proposals (learned_qc, a user's own) the held-out predictions; one that learns nothing, nothing
    assert asked_by("anatomy") == ["label maps"] and asked_by("virtual_annotator") == ["label maps"]
    assert asked_by("agreement") == [] and asked_by("combination", judges=["agreement", "uncertainty"]) == []
    assert asked_by(f"{fixed_judges}:Counting") == ["held-out predictions"]
    assert asked_by("combination", judges=["agreement", "anatomy"]) == ["label maps"]
    assert asked_by("combination", judges=["anatomy", f"{fixed_judges}:Counting"]) == [
        "label maps",
        "held-out predictions",
    ]


def test_label_reading_sub_judge_makes_the_combination_read_labels():
    assert not get_judge("combination", judges=["agreement", "uncertainty"]).needs_labels
    with_oracle = get_judge("combination", judges=["agreement", "oracle"], judge_options={"oracle": {"noise_std": 0.1}})
    assert with_oracle.needs_labels and with_oracle.judges[1].noise_std == 0.1


@pytest.mark.parametrize(
    "options, message",
    [
        ({"judges": []}, "non-empty list"),
        ({"judges": "agreement"}, "non-empty list"),
        ({"judges": ["agreement", "agreement"]}, "twice"),
        ({"judges": ["agreement", "anatomy"], "weights": [1.0]}, "1 values for 2 judges"),
        ({"judges": ["agreement"], "weights": [-1.0]}, ">= 0"),
        ({"judges": ["agreement"], "weights": [0.0]}, "not all 0"),
        ({"judges": ["agreement"], "judge_options": {"oracle": {}}}, "judge_options.*oracle"),
        ({"judges": ["agreemnet"]}, "unknown judge 'agreemnet'"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(JudgeError, match=message):
        get_judge("combination", **options)
