"""Judges on hand-made 16^3 masks with a known order: truth > slightly dilated > fragmented > empty."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import ndimage

from nnunet_rndpo.judges import (
    AgreementJudge,
    Judge,
    JudgeError,
    JudgeInput,
    LearnedQCJudge,
    OracleJudge,
    UncertaintyJudge,
    VirtualAnnotatorJudge,
    available_judges,
    get_judge,
    register_judge,
    score_case,
)
from nnunet_rndpo.segmentation_metrics import (
    dice_per_class,
    mean_dice,
    pairwise_dice_per_class,
    proposal_dice,
    soft_dice,
)

SIZE = 16


def ball(radius: float, centre=(7.5, 7.5, 7.5)) -> np.ndarray:
    grid = np.indices((SIZE, SIZE, SIZE), dtype=np.float64)
    distance = np.sqrt(sum((grid[axis] - centre[axis]) ** 2 for axis in range(3)))
    return (distance < radius).astype(np.uint8)


def fragmented(mask: np.ndarray) -> np.ndarray:
    """Every other slice removed: a dozen separate discs with most of the volume gone."""
    broken = mask.copy()
    broken[::2] = 0
    return broken


def smoothed_probabilities(truth: np.ndarray, labels=(1,)) -> np.ndarray:
    """(C, *spatial) softmax-like probabilities: each class's one-hot blurred, background = the rest."""
    foreground = [ndimage.gaussian_filter((truth == label).astype(np.float64), sigma=1.0) for label in labels]
    background = 1.0 - np.sum(foreground, axis=0)
    return np.stack([background, *foreground]).astype(np.float32)


def ordered_case(case_id="case_a", centre=(7.5, 7.5, 7.5), with_true_labels=True) -> JudgeInput:
    """Proposals 0..3 in true order: truth, dilated, fragmented, empty."""
    truth = ball(5, centre)
    proposals = np.stack([truth, ball(6, centre), fragmented(truth), np.zeros_like(truth)])
    rng = np.random.default_rng(0)
    image = (truth * 2.0 + rng.normal(0, 0.3, truth.shape))[None].astype(np.float32)
    return JudgeInput(
        case_id=case_id,
        proposals=proposals,
        labels=(1,),
        image=image,
        mean_probabilities=smoothed_probabilities(truth),
        true_labels=truth if with_true_labels else None,
    )


def assert_strictly_decreasing(scores):
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


# --- segmentation metrics -------------------------------------------------------------------------------


def test_dice_per_class_hand_values_and_empty_convention():
    a = np.array([[1, 1, 0, 2]])
    b = np.array([[1, 0, 0, 0]])
    # class 1: overlap 1, sizes 2 + 1 -> 2/3; class 2: sizes 1 + 0 -> 0; class 3 empty in both -> 1
    assert np.allclose(dice_per_class(a, b, (1, 2, 3)), [2 / 3, 0.0, 1.0])
    assert mean_dice(a, b, (1, 2, 3)) == pytest.approx((2 / 3 + 1) / 3)
    assert np.allclose(proposal_dice(np.stack([a, b]), b, (1,)), [2 / 3, 1.0])


def test_pairwise_dice_matches_direct_dice():
    case = ordered_case()
    pairwise = pairwise_dice_per_class(case.proposals, (1,))
    for i in range(4):
        for j in range(4):
            assert pairwise[i, j, 0] == pytest.approx(dice_per_class(case.proposals[i], case.proposals[j], (1,))[0])


def test_soft_dice_hand_values():
    mask = np.array([1, 1, 0, 0], dtype=bool)
    probability = np.array([1.0, 0.5, 0.5, 0.0])
    assert soft_dice(mask, probability) == pytest.approx(2 * 1.5 / (2 + 2))
    assert soft_dice(np.zeros(3, bool), np.zeros(3)) == 1.0


# --- interface and registry -----------------------------------------------------------------------------


def test_judge_input_rejects_inconsistent_shapes():
    proposals = np.zeros((2, 4, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="case 'c'.*true_labels"):
        JudgeInput("c", proposals, (1,), true_labels=np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="mean_probabilities"):
        JudgeInput("c", proposals, (1, 2), mean_probabilities=np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="labels"):
        JudgeInput("c", proposals, (0, 1))


def test_registry_lists_builtins_and_passes_options():
    assert set(available_judges()) >= {
        "agreement",
        "uncertainty",
        "learned_qc",
        "virtual_annotator",
        "anatomy",
        "combination",
        "oracle",
    }
    assert get_judge("agreement", to="consensus").to == "consensus"
    with pytest.raises(JudgeError) as error:
        get_judge("agreemnet")
    assert "agreement" in str(error.value) and "virtual_annotator" in str(error.value)
    with pytest.raises(JudgeError, match="does not accept options"):
        get_judge("agreement", nonsense=1)


USER_MODULE = '''
import numpy as np
from nnunet_rndpo.judges import Judge

class VolumeJudge(Judge):
    """Prefers larger foregrounds."""
    name = "volume"
    def __init__(self, scale=1.0):
        self.scale = scale
    def options(self):
        return {"scale": self.scale}
    def score(self, case):
        return self.scale * np.isin(case.proposals, case.labels).reshape(case.proposal_count, -1).sum(axis=1)

class NaNJudge(Judge):
    name = "nan_judge"
    def score(self, case):
        scores = np.zeros(case.proposal_count)
        scores[1] = np.nan
        return scores

class RaisingJudge(Judge):
    name = "raising_judge"
    def score(self, case):
        raise KeyError("missing feature")

class WrongShapeJudge(Judge):
    name = "wrong_shape"
    def score(self, case):
        return np.zeros(case.proposal_count + 1)

class NotAJudge:
    pass
'''


@pytest.fixture
def user_judges(tmp_path, monkeypatch):
    (tmp_path / "my_user_judges.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_user_judges"
    sys.modules.pop("my_user_judges", None)


def test_user_judge_by_dotted_path_scores_and_round_trips(user_judges, tmp_path):
    judge = get_judge(f"{user_judges}:VolumeJudge", scale=2.0)
    case = ordered_case()
    volumes = case.proposals.reshape(4, -1).sum(axis=1)
    assert np.array_equal(score_case(judge, case), 2.0 * volumes)
    judge.save(tmp_path / "judge.pkl")
    reloaded = Judge.load(tmp_path / "judge.pkl")
    assert type(reloaded).__name__ == "VolumeJudge" and reloaded.scale == 2.0


def test_dotted_path_errors_name_the_problem(user_judges):
    with pytest.raises(JudgeError, match="not a nnunet_rndpo Judge"):
        get_judge(f"{user_judges}:NotAJudge")
    with pytest.raises(JudgeError, match="no attribute"):
        get_judge(f"{user_judges}:Missing")
    with pytest.raises(JudgeError, match="cannot import"):
        get_judge("no_such_module_xyz:Judge")


def test_non_finite_scores_raise_judge_error_naming_judge_and_case(user_judges):
    with pytest.raises(JudgeError) as error:
        score_case(get_judge(f"{user_judges}:NaNJudge"), ordered_case("case_nan"))
    message = str(error.value)
    assert "nan_judge" in message and "case_nan" in message and "[1]" in message


def test_raising_judge_is_wrapped_with_judge_and_case(user_judges):
    with pytest.raises(JudgeError) as error:
        score_case(get_judge(f"{user_judges}:RaisingJudge"), ordered_case("case_raise"))
    assert "raising_judge" in str(error.value) and "case_raise" in str(error.value)
    assert isinstance(error.value.__cause__, KeyError)


def test_wrong_score_shape_is_rejected(user_judges):
    with pytest.raises(JudgeError, match="shape"):
        score_case(get_judge(f"{user_judges}:WrongShapeJudge"), ordered_case())


def test_register_judge_refuses_a_second_class_under_a_taken_name(user_judges):
    import my_user_judges

    with pytest.raises(JudgeError, match="already registered"):
        register_judge("agreement", my_user_judges.VolumeJudge)
    with pytest.raises(JudgeError, match="not a Judge"):
        register_judge("bad", my_user_judges.NotAJudge)


def test_judges_package_imports_without_torch():
    code = "import sys, nnunet_rndpo.judges; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- oracle -----------------------------------------------------------------------------------------------


def test_oracle_without_noise_gives_exact_dice():
    case = ordered_case()
    scores = score_case(OracleJudge(), case)
    assert np.array_equal(scores, proposal_dice(case.proposals, case.true_labels, (1,)))
    assert scores[0] == 1.0 and scores[3] == 0.0
    assert_strictly_decreasing(scores)


def test_oracle_refuses_without_reference_and_names_the_case():
    with pytest.raises(JudgeError) as error:
        score_case(OracleJudge(), ordered_case("unlabeled_7", with_true_labels=False))
    assert "unlabeled_7" in str(error.value) and "oracle" in str(error.value)


def test_oracle_says_it_is_research_only_and_uses_labels():
    judge = OracleJudge(noise_std=0.1)
    assert judge.needs_labels
    for text in (judge.describe(), repr(judge)):
        assert "research-only" in text and "labels" in text


def test_oracle_noise_is_seeded_per_case():
    case = ordered_case()
    exact = score_case(OracleJudge(), case)
    noisy = score_case(OracleJudge(noise_std=0.05, seed=3), case)
    assert not np.allclose(noisy, exact)
    assert np.abs(noisy - exact).max() < 0.5
    assert np.array_equal(noisy, score_case(OracleJudge(noise_std=0.05, seed=3), case))
    assert not np.array_equal(noisy, score_case(OracleJudge(noise_std=0.05, seed=4), case))


def test_oracle_flips_change_the_ranking_but_keep_the_values():
    truth = ball(5)
    # Eight proposals with distinct true Dice: balls of growing radius.
    proposals = np.stack([ball(radius) for radius in (5, 5.5, 6, 6.5, 7, 7.5, 4, 3)])
    case = JudgeInput("flip_case", proposals, (1,), true_labels=truth)
    exact = score_case(OracleJudge(), case)
    assert np.array_equal(score_case(OracleJudge(flip_probability=0.0, seed=1), case), exact)
    flipped = score_case(OracleJudge(flip_probability=1.0, seed=1), case)
    assert np.allclose(np.sort(flipped), np.sort(exact))
    assert not np.array_equal(np.argsort(flipped), np.argsort(exact))
    assert np.array_equal(flipped, score_case(OracleJudge(flip_probability=1.0, seed=1), case))


# --- agreement --------------------------------------------------------------------------------------------


def test_agreement_two_proposals_score_their_mutual_dice():
    a, b = ball(5), ball(6)
    case = JudgeInput("pair", np.stack([a, b]), (1,))
    expected = dice_per_class(a, b, (1,))[0]
    assert np.allclose(score_case(AgreementJudge(), case), [expected, expected])
    assert np.array_equal(score_case(AgreementJudge(), JudgeInput("one", a[None], (1,))), [1.0])


def test_agreement_ranks_the_consensus_mask_above_outliers():
    truth = ball(5)
    # Three near-copies of the truth agree with each other; the fragmented and empty ones agree with nobody.
    proposals = np.stack([truth, ball(5.3), ball(4.8), fragmented(truth), np.zeros_like(truth)])
    case = JudgeInput("agree", proposals, (1,))
    for target in ("others", "consensus"):
        scores = score_case(AgreementJudge(to=target), case)
        assert scores[:3].min() > scores[3] > scores[4], (target, scores)


def test_agreement_to_other_models_lets_no_model_vote_for_itself():
    wrong, right = np.zeros((1, 1, 10), np.uint8), np.zeros((1, 1, 10), np.uint8)
    wrong[..., 5:], right[..., :5] = 1, 1
    # model 0: four identical (mirror-like) wrong members; models 1 and 2: one right member each
    proposals = np.stack([wrong] * 4 + [right, right])
    case = JudgeInput("models", proposals, (1,), proposal_models=(0, 0, 0, 0, 1, 2))
    # counted member by member, model 0's copies outvote the rest: 3 of 5 others agree with each of them
    assert np.allclose(score_case(AgreementJudge(to="others"), case), [0.6] * 4 + [0.2, 0.2])
    # each model's members vote once, never for their own model: model 0's masks agree with no other model
    assert np.allclose(score_case(AgreementJudge(to="other_models"), case), [0.0] * 4 + [0.5, 0.5])


def test_agreement_to_other_models_scores_the_ensemble_against_every_model_and_needs_two_models():
    wrong, right = np.zeros((1, 1, 10), np.uint8), np.zeros((1, 1, 10), np.uint8)
    wrong[..., 5:], right[..., :5] = 1, 1
    case = JudgeInput("ensemble", np.stack([wrong, right, right]), (1,), proposal_models=(0, 1, "ensemble"))
    assert np.allclose(score_case(AgreementJudge(to="other_models"), case), [0.0, 0.0, 0.5])
    for models in (None, (0, 0, "ensemble")):
        one_model = JudgeInput("one", np.stack([wrong, right, right]), (1,), proposal_models=models)
        with pytest.raises(JudgeError, match="case 'one': agreement to other_models needs proposals of at least two"):
            score_case(AgreementJudge(to="other_models"), one_model)
    with pytest.raises(ValueError, match="proposal_models names 2 models for 3 proposals"):
        JudgeInput("bad", np.stack([wrong, right, right]), (1,), proposal_models=(0, 1))


def test_agreement_averages_over_classes():
    two_class = ball(5) + (ball(3) * 1).astype(np.uint8)  # label 2 inside, label 1 as a shell
    other = two_class.copy()
    other[other == 2] = 1  # class 2 missing, class 1 grown
    case = JudgeInput("multi", np.stack([two_class, other]), (1, 2))
    per_class = dice_per_class(two_class, other, (1, 2))
    assert np.allclose(score_case(AgreementJudge(), case), per_class.mean())


# --- uncertainty ------------------------------------------------------------------------------------------


def test_uncertainty_orders_masks_by_fit_to_the_probabilities():
    scores = score_case(UncertaintyJudge(), ordered_case())
    assert_strictly_decreasing(scores)
    assert scores[3] < 1e-6  # the model sees a structure: an empty mask is not rewarded


def test_uncertainty_does_not_reward_a_confident_small_mask():
    # A confident core (p = 0.99) inside a less certain rim (p = 0.7): the core alone is the "most confident"
    # mask but leaves most of the probability mass out.
    core, full = ball(2.5), ball(5)
    probability = np.where(core == 1, 0.99, np.where(full == 1, 0.7, 0.01))
    probabilities = np.stack([1 - probability, probability])
    case = JudgeInput("confident", np.stack([full, core]), (1,), mean_probabilities=probabilities)
    scores = score_case(UncertaintyJudge(), case)
    assert scores[0] > scores[1] + 0.3


def test_uncertainty_empty_mask_of_an_absent_class_scores_high():
    probabilities = np.stack([np.ones((4, 4, 4)) - 1e-5, np.full((4, 4, 4), 1e-5)])
    proposals = np.zeros((2, 4, 4, 4), dtype=np.uint8)
    proposals[1, 0, 0, 0] = 1
    scores = score_case(UncertaintyJudge(), JudgeInput("absent", proposals, (1,), mean_probabilities=probabilities))
    assert scores[0] == pytest.approx(np.exp(-64e-5)) and scores[1] < 0.01


def test_uncertainty_needs_probabilities():
    case = ordered_case()
    case.mean_probabilities = None
    with pytest.raises(JudgeError, match="mean_probabilities"):
        score_case(UncertaintyJudge(), case)


def test_uncertainty_entropy_weight_penalises_uncertain_foreground():
    case = ordered_case()
    plain = score_case(UncertaintyJudge(), case)
    weighted = score_case(UncertaintyJudge(entropy_weight=0.5), case)
    assert np.all(weighted[:3] < plain[:3]) and weighted[3] == plain[3]


# --- virtual annotator ------------------------------------------------------------------------------------


def test_virtual_annotator_without_fit_penalises_fragments_and_empty():
    scores = score_case(VirtualAnnotatorJudge(), ordered_case())
    assert scores[0] > scores[2] and scores[1] > scores[2] and scores[3] == 0.0


def test_virtual_annotator_fitted_on_references_prefers_the_plausible_volume(tmp_path):
    judge = VirtualAnnotatorJudge()
    judge.fit([ordered_case(f"train_{shift}", centre=(7.5 + shift, 7.5, 7.5)) for shift in (-1, 0, 1)])
    stats = judge.class_statistics[1]
    assert stats.presence_rate == 1.0 and stats.expected_components == 1
    assert np.exp(stats.log_volume_mean) == pytest.approx(ball(5).sum(), rel=0.01)
    scores = score_case(judge, ordered_case("test"))
    assert_strictly_decreasing(scores)
    judge.save(tmp_path / "annotator.pkl")
    reloaded = Judge.load(tmp_path / "annotator.pkl")
    assert reloaded.class_statistics == judge.class_statistics
    assert np.array_equal(score_case(reloaded, ordered_case("test")), scores)


def test_virtual_annotator_accepts_an_empty_mask_for_a_class_the_references_lack():
    judge = VirtualAnnotatorJudge()
    judge.fit([JudgeInput("train", np.zeros((1, 8, 8, 8), np.uint8), (1,), true_labels=np.zeros((8, 8, 8), np.uint8))])
    speck = np.zeros((8, 8, 8), np.uint8)
    speck[2, 2, 2] = 1
    scores = score_case(judge, JudgeInput("test", np.stack([np.zeros_like(speck), speck]), (1,)))
    assert scores[0] == 1.0


def test_virtual_annotator_fit_requires_references():
    with pytest.raises(ValueError, match="no true labels"):
        VirtualAnnotatorJudge().fit([ordered_case(with_true_labels=False)])


# --- learned QC -------------------------------------------------------------------------------------------


def training_cases():
    return [ordered_case(f"train_{shift}", centre=(7.5 + shift, 7.5 - shift, 7.5)) for shift in (-1.5, -0.5, 0.5, 1.5)]


def test_learned_qc_refuses_to_score_before_fit():
    with pytest.raises(JudgeError, match="not fitted"):
        score_case(LearnedQCJudge(), ordered_case())


def test_learned_qc_fit_score_save_load_round_trip(tmp_path):
    judge = LearnedQCJudge()
    judge.fit(training_cases())
    assert judge.training_samples == 16
    assert len(judge.feature_names) == 14  # 8 shape + 4 probability features for one class, 2 image features
    test_case = ordered_case("test", centre=(8.0, 7.0, 7.5))
    scores = score_case(judge, test_case)
    assert scores[0] > scores[2] and scores[0] > scores[3] and scores[1] > scores[3]

    # score never reads the reference
    unlabeled = ordered_case("test", centre=(8.0, 7.0, 7.5), with_true_labels=False)
    assert np.array_equal(score_case(judge, unlabeled), scores)

    judge.save(tmp_path / "qc.pkl")
    reloaded = Judge.load(tmp_path / "qc.pkl")
    assert isinstance(reloaded, LearnedQCJudge) and reloaded.training_samples == 16
    assert np.array_equal(score_case(reloaded, test_case), scores)


def test_learned_qc_is_deterministic_and_checks_inputs():
    first, second = LearnedQCJudge(), LearnedQCJudge()
    first.fit(training_cases())
    second.fit(training_cases())
    case = ordered_case("test")
    assert np.array_equal(first.score(case), second.score(case))
    case.mean_probabilities = None
    with pytest.raises(JudgeError, match="mean_probabilities"):
        score_case(first, case)
    with pytest.raises(ValueError, match="no true labels"):
        LearnedQCJudge().fit([ordered_case(with_true_labels=False)])


def test_learned_qc_random_forest_also_ranks():
    judge = LearnedQCJudge(model="random_forest")
    judge.fit(training_cases())
    scores = score_case(judge, ordered_case("test"))
    assert scores[0] > scores[2] > scores[3]


# --- every built-in judge, one shared sanity check --------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["agreement", "uncertainty", "learned_qc", "virtual_annotator", "anatomy", "combination", "oracle"]
)
def test_each_builtin_ranks_truth_above_fragmented_and_empty(name):
    judge = get_judge(name)
    judge.fit(training_cases())
    scores = score_case(judge, ordered_case("test"))
    assert scores[0] > scores[2] and scores[0] > scores[3]
    assert isinstance(judge, Judge) and judge.describe()


@pytest.mark.parametrize("name", ["agreement", "uncertainty", "virtual_annotator"])
def test_label_free_judges_score_each_class(name):
    # Two classes: label 1 a shell, label 2 the core. Proposal 1 misses class 2 entirely.
    truth = ball(5) + ball(3)
    missing_core = np.where(truth == 2, 1, truth).astype(np.uint8)
    proposals = np.stack([truth, truth, missing_core])
    case = JudgeInput("two_class", proposals, (1, 2), mean_probabilities=smoothed_probabilities(truth, (1, 2)))
    scores = score_case(get_judge(name), case)
    assert scores[0] == scores[1] > scores[2]


def test_voxel_probabilities_are_checked_and_absent_for_judges_of_whole_masks():
    from nnunet_rndpo.judges import judges_with_voxel_probabilities, score_case_with_voxels

    case = ordered_case("case_v")
    scores, probabilities = score_case_with_voxels(AgreementJudge(), case)
    assert probabilities is None and np.array_equal(scores, score_case(AgreementJudge(), case))
    assert judges_with_voxel_probabilities() == ["atlas"]

    class FlatVoxels(AgreementJudge):
        gives_voxel_probabilities = True

        def score_with_voxels(self, case):
            return self.score(case), self.voxels

    judge = FlatVoxels()
    judge.voxels = np.full((2, SIZE, SIZE, SIZE), 0.5)
    assert score_case_with_voxels(judge, case)[1].dtype == np.float32
    judge.voxels = np.full((1, SIZE, SIZE, SIZE), 0.5)  # no channel for label 1
    with pytest.raises(JudgeError, match=r"case 'case_v' returned voxel probabilities of shape \(1, 16, 16, 16\)"):
        score_case_with_voxels(judge, case)
    judge.voxels = np.full((2, SIZE, SIZE, SIZE), np.nan)
    with pytest.raises(JudgeError, match="non-finite voxel probabilities"):
        score_case_with_voxels(judge, case)
    judge.voxels = None  # the flag set, the method not giving them: said, not saved as None later
    with pytest.raises(JudgeError, match="says it gives voxel probabilities .* returned none"):
        score_case_with_voxels(judge, case)
