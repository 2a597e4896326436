"""Real-data check of the anatomy judge: does its score order perturbed true label maps by their true Dice?

Fit the judge (and, for comparison, the virtual annotator) on the TRUE label maps of the first `--fit-cases`
Hippocampus cases; for each of the next `--test-cases` cases, make perturbed copies of its true label map
(erosion, dilation, a spurious blob, a cavity, a class swap, a lost class, combinations) and compute, per case,
the Spearman correlation between each judge's scores and the copies' true mean Dice, over all copies and
over the mild ones only (`MILD`: one voxel of erosion or dilation, a small blob, a small cavity), and over a
separate set of plausible copies (the truth and eight smooth random boundary shifts of 0.5-2 voxels, no gross
defect: the kind of differences a model's proposals have). No model is involved:
this checks that the judge's features and density see real anatomical defects, not that it ranks a model's
proposals (that is the audit's job).

Label maps are read in raw space with SimpleITK; Dataset004_Hippocampus has one spacing (1 mm) for all
cases, so voxel features are comparable, as they are in nnU-Net's preprocessed space.

    python benchmarks/anatomy_check.py --data /work/shared/data/Dataset004_Hippocampus --fit-cases 10 --test-cases 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from nnunet_rndpo.judges import JudgeInput, get_judge, score_case
from nnunet_rndpo.segmentation_metrics import proposal_dice

LABELS = (1, 2)
# Defects of the size a good model's proposals differ by (one voxel of boundary, a small blob, a small cavity):
# the ranking among these is the harder, more telling part of the check.
MILD = ("truth", "eroded_1", "dilated_1", "blob_r2", "cavity")


def read_label_map(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int16)


def per_class(label_map: np.ndarray, operation) -> np.ndarray:
    """Apply a binary operation to each class; a voxel claimed by two classes keeps the lower label."""
    result = np.zeros_like(label_map)
    for label in sorted(LABELS, reverse=True):
        result[operation(label_map == label)] = label
    return result


def dilate_into_background(label_map: np.ndarray, iterations: int) -> np.ndarray:
    grown = label_map.copy()
    for _ in range(iterations):
        for label in LABELS:
            grown[(grown == 0) & ndimage.binary_dilation(grown == label)] = label
    return grown


def add_blob(label_map: np.ndarray, label: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A ball of `label` in the background, at least 4 voxels away from the foreground."""
    far = ndimage.distance_transform_edt(label_map == 0) > radius + 4
    candidates = np.argwhere(far)
    centre = candidates[rng.integers(len(candidates))]
    grid = np.indices(label_map.shape)
    ball = sum((grid[axis] - centre[axis]) ** 2 for axis in range(3)) <= radius**2
    blobbed = label_map.copy()
    blobbed[ball & (label_map == 0)] = label
    return blobbed


def carve_cavity(label_map: np.ndarray, label: int) -> np.ndarray:
    """Remove a 3x3x3 cube deep inside the class (enclosed by it), when the class is thick enough."""
    depth = ndimage.distance_transform_edt(label_map == label)
    centre = np.unravel_index(np.argmax(depth), depth.shape)
    carved = label_map.copy()
    carved[tuple(slice(max(c - 1, 0), c + 2) for c in centre)] = 0
    return carved


def boundary_noise(label_map: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Each class's boundary moved by a smooth random field (sigma 2 voxels, about `amplitude` voxels): a
    plausible mask of the kind a model's proposals differ by, with no gross defect."""
    result = np.zeros_like(label_map)
    field = ndimage.gaussian_filter(rng.normal(size=label_map.shape), sigma=2.0)
    field *= amplitude / (field.std() or 1.0)
    for label in LABELS:
        mask = label_map == label
        signed_distance = ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)
        result[(signed_distance + field < 0) & (result == 0)] = label
    return result


def plausible_copies(label_map: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The truth and eight smooth boundary perturbations of growing amplitude."""
    copies = {"truth": label_map}
    for amplitude in (0.5, 1.0, 1.5, 2.0):
        for repeat in range(2):
            copies[f"noise_{amplitude}_{repeat}"] = boundary_noise(label_map, amplitude, rng)
    return copies


def perturbations(label_map: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    erode = lambda mask: ndimage.binary_erosion(mask)  # noqa: E731
    swapped = np.where(label_map == 1, 2, np.where(label_map == 2, 1, 0)).astype(label_map.dtype)
    return {
        "truth": label_map,
        "eroded_1": per_class(label_map, erode),
        "eroded_2": per_class(per_class(label_map, erode), erode),
        "dilated_1": dilate_into_background(label_map, 1),
        "dilated_2": dilate_into_background(label_map, 2),
        "blob_r2": add_blob(label_map, 1, 2, rng),
        "blob_r4": add_blob(label_map, 2, 4, rng),
        "cavity": carve_cavity(label_map, 1),
        "swapped": swapped,
        "class2_lost": np.where(label_map == 2, 0, label_map).astype(label_map.dtype),
        "dilated_1_blob": add_blob(dilate_into_background(label_map, 1), 1, 3, rng),
        "eroded_1_cavity": carve_cavity(per_class(label_map, erode), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/Dataset004_Hippocampus"))
    parser.add_argument("--fit-cases", type=int, default=10)
    parser.add_argument("--test-cases", type=int, default=20)
    parser.add_argument("--judges", nargs="+", default=["anatomy", "virtual_annotator"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=None, help="JSON with the per-case figures")
    args = parser.parse_args()

    files = sorted((args.data / "labelsTr").glob("*.nii.gz"))
    if len(files) < args.fit_cases + args.test_cases:
        raise SystemExit(f"{args.data} has {len(files)} label maps, fewer than {args.fit_cases} + {args.test_cases}")
    fit_files, test_files = files[: args.fit_cases], files[args.fit_cases : args.fit_cases + args.test_cases]
    started = time.perf_counter()
    labeled = []
    for path in fit_files:
        reference = read_label_map(path)
        labeled.append(JudgeInput(path.name, reference[None], LABELS, true_labels=reference))
    judges = {name: get_judge(name) for name in args.judges}
    for judge in judges.values():
        judge.fit(labeled)
    fit_seconds = time.perf_counter() - started

    rng = np.random.default_rng(args.seed)
    rows = []
    started = time.perf_counter()
    for path in test_files:
        truth = read_label_map(path)
        copies = perturbations(truth, rng)
        proposals = np.stack(list(copies.values()))
        case = JudgeInput(path.name, proposals, LABELS)
        true_dice = proposal_dice(proposals, truth, LABELS)
        plausible = np.stack(list(plausible_copies(truth, rng).values()))
        plausible_case = JudgeInput(path.name, plausible, LABELS)
        plausible_dice = proposal_dice(plausible, truth, LABELS)
        row = {"case": path.name, "true_dice": dict(zip(copies, true_dice.round(4).tolist()))}
        row["plausible_true_dice"] = plausible_dice.round(4).tolist()
        for name, judge in judges.items():
            scores = score_case(judge, case)
            mild = [index for index, copy_name in enumerate(copies) if copy_name in MILD]
            plausible_scores = score_case(judge, plausible_case)
            row[name] = {
                "spearman": float(stats.spearmanr(scores, true_dice).statistic),
                "spearman_mild": float(stats.spearmanr(scores[mild], true_dice[mild]).statistic),
                "spearman_plausible": float(stats.spearmanr(plausible_scores, plausible_dice).statistic),
                "top_is_truth": bool(np.argmax(scores) == 0),
                "scores": dict(zip(copies, np.round(scores, 3).tolist())),
            }
        rows.append(row)
    score_seconds = time.perf_counter() - started

    summary = {
        "fit_cases": args.fit_cases,
        "test_cases": args.test_cases,
        "perturbations": list(copies),
        "fit_seconds": round(fit_seconds, 2),
        "score_seconds_per_case": round(score_seconds / len(test_files), 3),
        "plausible_true_dice_mean": float(np.mean([row["plausible_true_dice"][1:] for row in rows])),
        "judges": {
            name: {
                "mean_spearman": float(np.mean([row[name]["spearman"] for row in rows])),
                "min_spearman": float(np.min([row[name]["spearman"] for row in rows])),
                "mean_spearman_mild": float(np.mean([row[name]["spearman_mild"] for row in rows])),
                "mean_spearman_plausible": float(np.mean([row[name]["spearman_plausible"] for row in rows])),
                "truth_ranked_first": float(np.mean([row[name]["top_is_truth"] for row in rows])),
                "mean_rank_of_each_perturbation": _mean_ranks(rows, name, list(copies)),
            }
            for name in judges
        },
        "describe": {name: judge.describe() for name, judge in judges.items()},
    }
    print(json.dumps(summary, indent=2))
    if args.output:
        args.output.write_text(json.dumps({"summary": summary, "cases": rows}, indent=2) + "\n")


def _mean_ranks(rows: list[dict], judge: str, names: list[str]) -> dict[str, float]:
    """Mean rank (1 = judged best) of each perturbation over the test cases."""
    ranks = []
    for row in rows:
        scores = np.array([row[judge]["scores"][name] for name in names])
        ranks.append(stats.rankdata(-scores))
    return dict(zip(names, np.round(np.mean(ranks, axis=0), 2).tolist()))


if __name__ == "__main__":
    main()
