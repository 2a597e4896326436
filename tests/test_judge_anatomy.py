"""Anatomy judge on hand-made two-class label maps: an ellipsoid split into a left (1) and a right (2) half."""

import numpy as np
import pytest

from nnunet_rndpo.judges import AnatomyJudge, Judge, JudgeError, JudgeInput, get_judge, score_case
from nnunet_rndpo.judges.anatomy import (
    anatomy_features,
    cavity_count,
    feature_layout,
    opening_loss,
    surface_contact_fractions,
)

SIZE = 24
LABELS = (1, 2)


def split_ellipsoid(shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Ellipsoid of semi-axes (4, 8, 4) * scale; class 1 on the low side of axis 1, class 2 on the high side."""
    centre = (11.5 + shift, 11.5, 11.5)
    grid = np.indices((SIZE, SIZE, SIZE), dtype=np.float64)
    radii = (4 * scale, 8 * scale, 4 * scale)
    inside = sum(((grid[axis] - centre[axis]) / radii[axis]) ** 2 for axis in range(3)) < 1
    label_map = np.zeros((SIZE, SIZE, SIZE), dtype=np.uint8)
    label_map[inside] = 1
    label_map[inside & (grid[1] >= centre[1])] = 2
    return label_map


def labeled_references(count: int = 10, seed: int = 0) -> list[JudgeInput]:
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        reference = split_ellipsoid(rng.uniform(-1, 1), rng.uniform(0.9, 1.1))
        cases.append(JudgeInput(f"train_{index}", reference[None], LABELS, true_labels=reference))
    return cases


def defective_proposals() -> tuple[np.ndarray, list[str]]:
    """A plausible map (index 0) and four copies with one anatomical defect each."""
    plausible = split_ellipsoid(0.3, 1.0)
    extra_component = plausible.copy()
    extra_component[1:3, 1:3, 1:3] = 1
    cavity = plausible.copy()
    cavity[10:13, 5:8, 10:13] = 0  # enclosed by class 1
    doubled = split_ellipsoid(0.3, 2 ** (1 / 3))
    swapped = np.where(plausible == 1, 2, np.where(plausible == 2, 1, 0)).astype(np.uint8)
    names = ["plausible", "extra_component", "cavity", "doubled_volume", "swapped_classes"]
    return np.stack([plausible, extra_component, cavity, doubled, swapped]), names


def fitted_judge(count: int = 10, **options) -> AnatomyJudge:
    judge = AnatomyJudge(**options)
    judge.fit(labeled_references(count))
    return judge


# --- features -------------------------------------------------------------------------------------------


def test_cavity_count_sees_enclosed_background_only():
    cube = np.zeros((9, 9, 9), dtype=bool)
    cube[1:8, 1:8, 1:8] = True
    assert cavity_count(cube) == 0
    hollow = cube.copy()
    hollow[3:5, 3:5, 3:5] = False
    hollow[6, 6, 6] = False
    assert cavity_count(hollow) == 2
    dent = cube.copy()
    dent[0:4, 4, 4] = False  # a tunnel from the surface: not enclosed
    dent[1:4, 4, 4] = False
    assert cavity_count(dent) == 0
    # A mask touching the array's border: background beyond the border counts as outside
    assert cavity_count(np.ones((4, 4, 4), dtype=bool)) == 0
    assert cavity_count(np.zeros((4, 4, 4), dtype=bool)) == 0


def test_opening_loss_and_surface_contacts_on_hand_values():
    block = np.zeros((9, 9, 9), dtype=bool)
    block[2:7, 2:7, 2:7] = True
    # erosion by the cross keeps the 3^3 core; dilating it back misses the block's 8 corners and 12 edges (3 each)
    assert opening_loss(block) == pytest.approx((8 + 12 * 3) / 125)
    label_map = np.zeros((6, 6, 6), dtype=np.uint8)
    label_map[1:5, 1:5, 1:3] = 1
    label_map[1:5, 1:5, 3:5] = 2
    fractions = surface_contact_fractions(label_map == 1, label_map)
    # class 1 is a 4x4x2 slab: all 32 voxels are on its surface; the 16 of the layer z=2 touch class 2, and
    # all but that layer's 2x2 centre touch background
    assert fractions[2] == pytest.approx(16 / 32)
    assert fractions[0] == pytest.approx(28 / 32)


def test_features_of_a_split_ellipsoid_follow_the_layout():
    label_map = split_ellipsoid()
    names = [name for name, _ in feature_layout(LABELS)]
    features = dict(zip(names, anatomy_features(label_map, LABELS)))
    assert len(names) == len(anatomy_features(label_map, LABELS)) == 15
    assert features["class1_volume"] == pytest.approx(np.log1p((label_map == 1).sum()))
    assert features["class1_components"] == 1 and features["class2_cavities"] == 0
    assert 0.2 < features["class1_touches_class2"] < 0.5
    assert features["centroid_class2_minus_class1_axis1"] > 4
    assert features["centroid_class2_minus_class1_axis0"] == pytest.approx(0.0)


def test_empty_class_gives_zero_features_without_failing():
    label_map = split_ellipsoid()
    label_map[label_map == 2] = 0
    features = dict(zip([n for n, _ in feature_layout(LABELS)], anatomy_features(label_map, LABELS)))
    assert features["class2_volume"] == 0 and features["class2_components"] == 0
    assert features["class1_touches_class2"] == 0


# --- density --------------------------------------------------------------------------------------------


def test_plausible_map_scores_above_each_anatomical_defect():
    proposals, names = defective_proposals()
    scores = score_case(fitted_judge(), JudgeInput("test", proposals, LABELS))
    for name, score in zip(names[1:], scores[1:]):
        assert scores[0] > score + 5, (name, scores)


def test_each_defect_is_caught_even_with_few_cases_and_one_case():
    proposals, names = defective_proposals()
    for count in (3, 1):
        judge = fitted_judge(count)
        assert judge.training_cases == count
        scores = score_case(judge, JudgeInput("test", proposals, LABELS))
        assert np.argmax(scores) == 0, (count, dict(zip(names, scores)))
    assert fitted_judge(1).shrinkage == 1.0  # one case: independent robust z-scores around it


def test_fewer_cases_than_features_keeps_a_positive_definite_covariance():
    judge = fitted_judge(4)  # 4 cases, 15 features
    assert 0.1 <= judge.shrinkage <= 1.0
    assert np.all(np.linalg.eigvalsh(judge.precision) > 0)


def test_refit_is_deterministic_and_save_load_round_trips(tmp_path):
    proposals, _ = defective_proposals()
    case = JudgeInput("test", proposals, LABELS)
    first, second = fitted_judge(), fitted_judge()
    assert np.array_equal(first.score(case), second.score(case))
    first.save(tmp_path / "anatomy.pkl")
    reloaded = Judge.load(tmp_path / "anatomy.pkl")
    assert isinstance(reloaded, AnatomyJudge) and reloaded.training_cases == 10
    assert np.array_equal(reloaded.score(case), first.score(case))
    assert "fitted on 10 reference label maps" in reloaded.describe()


def test_scores_never_read_the_proposals_reference():
    proposals, _ = defective_proposals()
    judge = fitted_judge()
    with_reference = JudgeInput("test", proposals, LABELS, true_labels=proposals[0])
    assert np.array_equal(judge.score(with_reference), judge.score(JudgeInput("test", proposals, LABELS)))


def test_feature_groups_can_be_switched_off():
    judge = fitted_judge(features=["volume", "components"])
    assert judge.feature_names == ["class1_volume", "class1_components", "class2_volume", "class2_components"]
    proposals, _ = defective_proposals()
    scores = judge.score(JudgeInput("test", proposals, LABELS))
    # without centroids, a swap of two equal halves is invisible to volume and components
    assert scores[4] == pytest.approx(scores[0], abs=1.0)


# --- errors ---------------------------------------------------------------------------------------------


def test_clear_errors_for_no_cases_no_fit_no_reference_and_bad_options():
    with pytest.raises(JudgeError, match="at least one labeled case"):
        AnatomyJudge().fit([])
    proposals, _ = defective_proposals()
    with pytest.raises(JudgeError, match="not fitted"):
        score_case(AnatomyJudge(), JudgeInput("test", proposals, LABELS))
    with pytest.raises(JudgeError, match="case 'nolabel' has no true labels"):
        AnatomyJudge().fit([JudgeInput("nolabel", proposals, LABELS)])
    with pytest.raises(JudgeError, match="labels"):
        score_case(fitted_judge(), JudgeInput("test", proposals, (1,)))
    with pytest.raises(JudgeError, match="option 'features'.*colour"):
        get_judge("anatomy", features=["volume", "colour"])
    with pytest.raises(JudgeError, match="option 'min_shrinkage'"):
        get_judge("anatomy", min_shrinkage=2)
