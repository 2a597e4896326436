"""Atlas judge on hand-made images: a bright two-class ellipsoid on a dark background, moved from case to case."""

import numpy as np
import pytest

from nnunet_rndpo.judges import (
    AtlasJudge,
    JudgeError,
    JudgeInput,
    get_judge,
    load_judge,
    score_case,
    score_case_with_voxels,
)
from nnunet_rndpo.judges.atlas import fused_atlas_probabilities, soft_dice_scores
from nnunet_rndpo.segmentation_metrics import mean_dice

SIZE = 24
LABELS = (1, 2)


def ellipsoid_case(shift: tuple[float, float, float], scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(image (1, *spatial), label map): an ellipsoid of semi-axes (4, 7, 4) * scale centred at the middle plus
    `shift`; class 1 on the low side of axis 1, class 2 on the high side; the image is bright inside, with a
    brighter class 2, smoothly edged so that registration has a gradient to follow."""
    grid = np.indices((SIZE, SIZE, SIZE), dtype=np.float64)
    centre = [11.5 + offset for offset in shift]
    radii = (4 * scale, 7 * scale, 4 * scale)
    radius = np.sqrt(sum(((grid[axis] - centre[axis]) / radii[axis]) ** 2 for axis in range(3)))
    label_map = np.zeros((SIZE, SIZE, SIZE), dtype=np.uint8)
    label_map[radius < 1] = 1
    label_map[(radius < 1) & (grid[1] >= centre[1])] = 2
    image = 1 / (1 + np.exp((radius - 1) * 8)) * (1 + 0.5 * (grid[1] >= centre[1]))
    return image[None].astype(np.float32), label_map


def atlases(count: int = 3) -> list[JudgeInput]:
    cases = []
    for index, shift in enumerate([(-1.5, 1.0, 0.5), (1.0, -1.5, -1.0), (0.5, 1.5, 1.5), (-1.0, -0.5, 1.0)][:count]):
        image, label_map = ellipsoid_case(shift, scale=1.0 + 0.05 * index)
        cases.append(JudgeInput(f"atlas_{index}", label_map[None], LABELS, image=image, true_labels=label_map))
    return cases


def target_case() -> tuple[JudgeInput, list[str]]:
    """The truth (index 0) among a copy moved 2 voxels, one with the classes swapped, and an empty map."""
    image, truth = ellipsoid_case((2.0, 2.0, -1.5))
    _, moved = ellipsoid_case((2.0, 4.0, 0.5))
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0)).astype(np.uint8)
    proposals = np.stack([truth, moved, swapped, np.zeros_like(truth)])
    return JudgeInput("target", proposals, LABELS, image=image), ["truth", "moved", "swapped", "empty"]


def test_fused_atlases_find_a_moved_structure():
    image, truth = ellipsoid_case((2.0, 2.0, -1.5))
    references = [(case.image[0], case.true_labels) for case in atlases()]
    for deformable in (False, True):
        probabilities = fused_atlas_probabilities(image[0], references, LABELS, deformable=deformable)
        assert probabilities.shape == (2, SIZE, SIZE, SIZE)
        assert probabilities.min() >= 0 and probabilities.sum(axis=0).max() <= 1 + 1e-6
        fused = np.where(probabilities.max(axis=0) > 0.5, np.argmax(probabilities, axis=0) + 1, 0)
        # unregistered, the atlases' labels overlap the target's by about 0.5
        assert mean_dice(fused, truth, LABELS) > 0.85
        assert mean_dice(references[0][1], truth, LABELS) < 0.6


def test_judge_ranks_the_truth_first_and_nonsense_last():
    judge = AtlasJudge()
    judge.fit(atlases())
    case, names = target_case()
    scores = score_case(judge, case)
    assert [names[i] for i in np.argsort(-scores)] == names
    assert scores[-1] == 0.0


def test_soft_dice_scores_by_hand():
    proposals = np.array([[1, 1, 2, 0], [0, 1, 2, 2]], dtype=np.uint8)
    probabilities = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.5]])
    # proposal 0: class 1 2*1.5/(2+1.5), class 2 2*1/(1+1.5); proposal 1: class 1 2*0.5/(1+1.5), class 2 2*1.5/(2+1.5)
    expected = [(3 / 3.5 + 2 / 2.5) / 2, (1 / 2.5 + 3 / 3.5) / 2]
    assert soft_dice_scores(proposals, probabilities, LABELS) == pytest.approx(expected)


def test_keeps_at_most_max_atlases_spread_over_the_cases_and_round_trips(tmp_path):
    judge = get_judge("atlas", max_atlases=2, registration="affine")
    judge.fit(list(reversed(atlases(4))))
    assert [case_id for case_id, _, _ in judge.atlases] == ["atlas_0", "atlas_3"]
    assert "2 atlases (atlas_0, atlas_3)" in judge.describe()
    judge.save(tmp_path / "atlas.pkl")
    reloaded = load_judge(tmp_path / "atlas.pkl")
    case, _ = target_case()
    assert reloaded.options() == judge.options()
    assert score_case(reloaded, case) == pytest.approx(score_case(judge, case))


def test_needs_images_and_says_what_is_missing():
    judge = AtlasJudge()
    assert judge.learns and judge.fit_reads_images and not judge.fit_reads_proposals
    case, _ = target_case()
    with pytest.raises(JudgeError, match="not fitted"):
        judge.score(case)
    no_image = JudgeInput("atlas_x", case.proposals[:1], LABELS, true_labels=case.proposals[0])
    with pytest.raises(JudgeError, match="'atlas_x' needs its image and true labels; it has no image"):
        judge.fit([no_image])
    judge.fit(atlases(1))
    with pytest.raises(JudgeError, match="image channel 0 of case 'target'"):
        judge.score(JudgeInput("target", case.proposals, LABELS))
    with pytest.raises(JudgeError, match="registration"):
        get_judge("atlas", registration="rigid")
    with pytest.raises(JudgeError, match="max_atlases"):
        get_judge("atlas", max_atlases=0)


def test_voxel_probabilities_are_the_fused_labels_by_label_value():
    judge = AtlasJudge(registration="affine")
    judge.fit(atlases())
    case, _ = target_case()
    scores, probabilities = score_case_with_voxels(judge, case)
    assert judge.gives_voxel_probabilities and probabilities.shape == (3, SIZE, SIZE, SIZE)
    assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-5) and probabilities.min() >= 0
    assert scores == pytest.approx(score_case(judge, case))
    # the fused labels of the target sit on its truth: class-by-class argmax against the true map
    assert mean_dice(np.argmax(probabilities, axis=0), case.proposals[0], LABELS) > 0.85
