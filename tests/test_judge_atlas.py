"""Atlas judge on hand-made images: a bright two-class ellipsoid on a dark background, moved from case to case."""

import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from nnunet_rndpo.judges import (
    AtlasJudge,
    Judge,
    JudgeError,
    JudgeInput,
    get_judge,
    score_case,
    score_case_with_voxels,
)
from nnunet_rndpo.judges.atlas import (
    _as_image,
    foreground_box,
    fused_atlas_probabilities,
    register_atlas,
    set_registration_threads,
    shrink_factors,
    soft_dice_scores,
)
from nnunet_rndpo.segmentation_metrics import mean_dice

SIZE = 24
LABELS = (1, 2)


def ellipsoid_case(
    shift: tuple[float, float, float], scale: float = 1.0, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """(image (1, *spatial), label map): an ellipsoid of semi-axes (4, 7, 4) * scale centred at the middle plus
    `shift`; class 1 on the low side of axis 1, class 2 on the high side; the image is bright inside, with a
    brighter class 2, smoothly edged so that registration has a gradient to follow."""
    grid = np.indices((size, size, size), dtype=np.float64)
    centre = [(size - 1) / 2 + offset for offset in shift]
    radii = (4 * scale, 7 * scale, 4 * scale)
    radius = np.sqrt(sum(((grid[axis] - centre[axis]) / radii[axis]) ** 2 for axis in range(3)))
    label_map = np.zeros((size, size, size), dtype=np.uint8)
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
    assert [atlas[0] for atlas in judge.atlases] == ["atlas_0", "atlas_3"]
    assert "2 atlases (atlas_0, atlas_3)" in judge.describe()
    judge.save(tmp_path / "atlas.pkl")
    reloaded = Judge.load(tmp_path / "atlas.pkl")
    case, _ = target_case()
    assert reloaded.options() == judge.options()
    assert score_case(reloaded, case) == pytest.approx(score_case(judge, case))


def test_needs_images_and_says_what_is_missing():
    judge = AtlasJudge()
    assert judge.learns

    class Examples:  # what a judge asks for in fit_from (nnunet_rndpo's FitExamples)
        asked = []

        def true_label_maps(self, with_images=False):
            self.asked.append(with_images)
            return atlases(2)

    judge.fit_from(Examples())
    assert Examples.asked == [True] and [atlas[0] for atlas in judge.atlases] == ["atlas_0", "atlas_1"]
    judge = AtlasJudge()
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


# ---------------------------------------------------------------- at CT size: crop, shrunk registration, workers
def todays_fused_probabilities(image, references, deformable):
    """The computation before crops (for comparison): whole volumes, each class resampled on its own in float64."""
    import SimpleITK as sitk

    fixed = _as_image(image)
    probabilities = np.zeros((len(LABELS), *image.shape))
    for atlas_image, atlas_labels in references:
        transform = register_atlas(fixed, _as_image(atlas_image), deformable, 50, 1.5)
        for row, label in enumerate(LABELS):
            one_hot = _as_image((atlas_labels == label).astype(np.float32))
            probabilities[row] += sitk.GetArrayFromImage(sitk.Resample(one_hot, fixed, transform, sitk.sitkLinear, 0.0))
    return probabilities / len(references)


@pytest.mark.parametrize("registration", ["affine", "deformable"])
def test_one_resampling_per_atlas_gives_todays_scores(registration):
    """The whole volume (crop_margin=None, no shrinking): one float32 vector resampling of the one-hot labels
    interpolates as one resampling per class in float64 did."""
    case, _ = target_case()
    references = [(atlas.image[0], atlas.true_labels) for atlas in atlases()]
    today = todays_fused_probabilities(case.image[0], references, registration == "deformable")
    judge = AtlasJudge(registration=registration, crop_margin=None, max_registration_voxels=None)
    judge.fit(atlases())
    scores, probabilities = judge.score_with_voxels(case)
    assert probabilities.dtype == np.float32
    assert np.abs(probabilities[list(LABELS)] - today).max() < 1e-5
    assert scores == pytest.approx(soft_dice_scores(case.proposals, today, LABELS), abs=1e-6)


@pytest.mark.parametrize("registration", ["affine", "deformable"])
def test_a_crop_that_holds_the_foreground_keeps_the_scores(registration):
    """With a margin of 8 voxels the crop holds all of today's fused atlas labels: the scores differ only by the
    registration converging on a smaller field of view (at most 0.01 here; the ranking unchanged)."""
    case, names = target_case()
    references = [(atlas.image[0], atlas.true_labels) for atlas in atlases()]
    today = todays_fused_probabilities(case.image[0], references, registration == "deformable")
    box = foreground_box(np.any(case.proposals > 0, axis=0), 8)
    outside = np.ones(case.spatial_shape, bool)
    outside[box] = False
    assert today[:, outside].max() < 1e-3  # the case where the crop holds all foreground
    judge = AtlasJudge(registration=registration, crop_margin=8, max_registration_voxels=None)
    judge.fit(atlases())
    assert all(atlas[1].shape != case.spatial_shape for atlas in judge.atlases)  # atlases are cropped too
    scores = score_case(judge, case)
    expected = soft_dice_scores(case.proposals, today, LABELS)
    assert np.abs(scores - expected).max() < 0.01
    assert [names[i] for i in np.argsort(-scores)] == [names[i] for i in np.argsort(-expected)] == names


def test_outside_the_crop_the_atlas_says_background_and_scores_are_decided_inside():
    case, _ = target_case()
    judge = AtlasJudge(registration="affine", crop_margin=2)
    judge.fit(atlases())
    scores, probabilities = score_case_with_voxels(judge, case)
    box = foreground_box(np.any(case.proposals > 0, axis=0), 2)
    outside = np.ones(case.spatial_shape, bool)
    outside[box] = False
    assert outside.any() and (case.proposals[:, outside] == 0).all()  # every proposal is background there
    assert (probabilities[0, outside] == 1).all() and (probabilities[1:, outside] == 0).all()
    # the scores computed on the crop are those of the whole volume with the fused labels as returned
    assert scores == pytest.approx(soft_dice_scores(case.proposals, probabilities[list(LABELS)], LABELS), abs=1e-9)


def test_the_crop_excludes_nothing_of_the_proposals_union():
    rng = np.random.default_rng(0)
    for margin in (0, 3, 50):
        proposals = np.zeros((4, 30, 20, 25), np.uint8)
        for proposal in proposals:
            corner = rng.integers(0, (25, 15, 20))
            proposal[tuple(slice(c, c + 5) for c in corner)] = rng.integers(1, 3)
        union = np.any(proposals > 0, axis=0)
        box = foreground_box(union, margin)
        inside = np.zeros(union.shape, bool)
        inside[box] = True
        assert union[~inside].sum() == 0
        for axis, part in enumerate(box):  # the margin is kept where the volume allows it
            present = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
            assert part.start == max(present[0] - margin, 0) and part.stop == min(
                present[-1] + 1 + margin, union.shape[axis]
            )
    assert foreground_box(np.zeros((3, 3, 3), bool), 2) is None
    assert foreground_box(np.zeros((3, 4, 5), bool), None) == (slice(0, 3), slice(0, 4), slice(0, 5))


def test_no_foreground_in_any_proposal_is_a_tie_without_registering():
    judge = AtlasJudge()
    judge.fit(atlases(1))
    case, _ = target_case()
    empty = JudgeInput("empty", np.zeros_like(case.proposals), LABELS, image=case.image)
    scores, probabilities = judge.score_with_voxels(empty)
    assert scores.tolist() == [0.0] * 4 and (probabilities[0] == 1).all()


def test_shrink_factors():
    assert shrink_factors((48, 48, 48), None) == (1, 1, 1)
    assert shrink_factors((48, 48, 48), 48**3) == (1, 1, 1)
    assert shrink_factors((48, 48, 48), 24**3) == (2, 2, 2)
    # the axis with the most voxels per factor shrinks first
    assert shrink_factors((100, 20, 20), 10_000) == (4, 1, 1)
    assert shrink_factors((300, 300, 60), 1_000_000) == (3, 2, 1)  # 100 x 150 x 60


@pytest.mark.parametrize("deformable", [False, True])
def test_shrunk_registration_still_finds_a_shift(deformable):
    """A 48^3 atlas moved by (3, -4, 2) voxels, registered on copies shrunk by 2 per axis: the transform, applied
    at full resolution, still carries the case's points onto the atlas's within half a voxel."""
    from nnunet_rndpo.judges.atlas import _shrunk

    shift = (3.0, -4.0, 2.0)
    image, label_map = ellipsoid_case((0.0, 0.0, 0.0), scale=1.6, size=48)
    atlas_image, atlas_labels = ellipsoid_case(shift, scale=1.6, size=48)
    fixed, moving = _as_image(image[0]), _as_image(atlas_image[0])
    fixed_small, moving_small = _shrunk(fixed, (48,) * 3, 24**3), _shrunk(moving, (48,) * 3, 24**3)
    assert fixed_small.GetSize() == (24, 24, 24) and fixed_small.GetSpacing() == (2.0, 2.0, 2.0)
    transform = register_atlas(fixed_small, moving_small, deformable, 50, 1.5)
    for point in [(23.5, 23.5, 23.5), (20.0, 26.0, 23.0)]:  # (x, y, z) inside the ellipsoid
        moved = np.asarray(transform.TransformPoint(point)) - np.asarray(point)
        assert moved == pytest.approx(shift[::-1], abs=0.5)
    probabilities = fused_atlas_probabilities(
        image[0], [(atlas_image[0], atlas_labels)], LABELS, deformable=deformable, max_registration_voxels=24**3
    )
    fused = np.where(probabilities.max(axis=0) > 0.5, np.argmax(probabilities, axis=0) + 1, 0)
    assert mean_dice(fused, label_map, LABELS) > 0.9
    assert mean_dice(atlas_labels, label_map, LABELS) < 0.7  # without registration


def test_crop_and_shrink_options_are_validated_with_clear_errors():
    for bad in (-1, 2.5, "8", True):
        with pytest.raises(JudgeError, match="atlas option 'crop_margin' must be a number of voxels >= 0"):
            AtlasJudge(crop_margin=bad)
    for bad in (100, 0, 1e6, "big"):
        with pytest.raises(JudgeError, match="atlas option 'max_registration_voxels' must be a number of voxels"):
            AtlasJudge(max_registration_voxels=bad)
    judge = AtlasJudge(crop_margin=None, max_registration_voxels=None)
    assert judge.options()["crop_margin"] is None and judge.options()["max_registration_voxels"] is None
    assert get_judge("atlas", crop_margin=0, max_registration_voxels=4096).options()["crop_margin"] == 0
    with pytest.raises(ValueError, match="registration threads"):
        set_registration_threads(0)


def test_a_state_of_uncropped_atlases_loads_cropped():
    """States written before crops hold (case id, image, label map): they load and crop as `fit` would."""
    judge = AtlasJudge(registration="affine", crop_margin=3)
    judge.fit(atlases(2))
    old_state = {"labels": list(LABELS), "atlases": [(c.case_id, c.image[0], c.true_labels) for c in atlases(2)]}
    reloaded = AtlasJudge(registration="affine", crop_margin=3)
    reloaded.load_fitted_state(old_state)
    for kept, loaded in zip(judge.atlases, reloaded.atlases):
        assert kept[0] == loaded[0] and kept[3] == loaded[3]
        assert np.array_equal(kept[1], loaded[1]) and np.array_equal(kept[2], loaded[2])


def _score_in_worker(payload: bytes) -> np.ndarray:
    judge, case = pickle.loads(payload)
    return judge.score(case)


def test_the_judge_is_sent_to_a_worker_process_cheaply_and_scores_there_as_here():
    """Cropped atlases make the pickle small; a spawned worker limited to one SimpleITK thread gives the scores of
    this process at one thread."""
    judge = AtlasJudge(registration="affine", crop_margin=2)
    judge.fit(atlases())
    case, _ = target_case()
    whole = AtlasJudge(registration="affine", crop_margin=None)
    whole.fit(atlases())
    assert len(pickle.dumps(judge)) < 0.5 * len(pickle.dumps(whole))
    previous = set_registration_threads(1)
    try:
        here = judge.score(case)
    finally:
        set_registration_threads(previous)
    with ProcessPoolExecutor(
        1, mp_context=get_context("spawn"), initializer=set_registration_threads, initargs=(1,)
    ) as pool:
        there = pool.submit(_score_in_worker, pickle.dumps((judge, case))).result()
    assert there.tolist() == here.tolist()
