"""Real-data check of the atlas judge's information: how close are fused atlas labels to the expert labels, and how
well do its scores rank imperfect masks, registered on the whole volume or on crops (shrunk or not)?

The first `--atlases` Hippocampus cases (sorted by name) are the atlases; each of the next `--test-cases` cases gets
`--candidates` candidate masks: its expert label map shifted by up to `--max-shift` voxels per axis and then eroded,
dilated or left as it is (seeded by the case). For each variant of the judge (`--variants`):
- full: the whole volumes (crop_margin=None, no shrinking), the computation before crops;
- default: `AtlasJudge`'s default options (on Hippocampus the default crop holds the whole volume);
- crop: `AtlasJudge`'s crop around the candidates' union with `--crop-margin`, at full resolution;
- shrunk: the same crop registered on copies shrunk to at most `--shrunk-voxels` voxels (forcing the shrinking
  that CT-sized crops get);
printed per case and summarised: the fused labels' Dice against the expert labels (the most probable class where
some class has more than half of the atlases' votes), the Spearman correlation of the candidates' scores with their
true Dice, whether the top-scored candidate is the best one (top-1 hit), its true Dice minus the candidates' mean
(top-1 lift, points), and seconds per case; for each variant after the first, its difference to the first paired
by case (mean and standard error). No model is involved: this measures what the labeled cases alone know,
by a route that does not go through the network; the audit on a model's own proposals is the pipeline's job.

Images are read in raw space with SimpleITK and z-scored per case, as nnU-Net's preprocessing does for MRI;
Dataset004_Hippocampus has one spacing (1 mm) for all cases, so registering in voxels is registering in mm.

    python benchmarks/atlas_check.py --data ../shared/data/Dataset004_Hippocampus --atlases 5 --test-cases 20 \\
        --variants full,default,crop,shrunk --crop-margin 4 -o benchmarks/results/atlas_check/atlas_check_crop.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from nnunet_rndpo.judges import AtlasJudge, JudgeInput
from nnunet_rndpo.segmentation_metrics import dice_per_class, proposal_dice

LABELS = (1, 2)
VARIANTS = ("full", "default", "crop", "shrunk")


def read_case(data: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(z-scored image, label map) of one case in raw space."""
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "imagesTr" / f"{case_id}_0000.nii.gz"), sitk.sitkFloat32))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{case_id}.nii.gz")))
    return (image - image.mean()) / max(float(image.std()), 1e-8), labels.astype(np.uint8)


def fused_labels(by_label: np.ndarray) -> np.ndarray:
    """The label map of fused probabilities (channel = label value): the most probable class where it has a majority."""
    probabilities = by_label[list(LABELS)]
    winner = np.asarray(LABELS)[np.argmax(probabilities, axis=0)]
    return np.where(probabilities.max(axis=0) > 0.5, winner, 0).astype(np.uint8)


def candidate_masks(truth: np.ndarray, count: int, seed: int, max_shift: int = 1) -> np.ndarray:
    """(count, *spatial) distinct imperfect masks: the expert labels shifted by up to `max_shift` voxels per axis
    (edges filled with background), then eroded or dilated by one voxel or kept (a grown voxel: the larger label)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    candidates: list[np.ndarray] = []
    for _ in range(50 * count):
        if len(candidates) == count:
            break
        shift = rng.integers(-max_shift, max_shift + 1, size=3)
        moved = ndimage.shift(truth, shift, order=0, mode="constant", cval=0)
        operation = rng.choice(["keep", "erode", "dilate"])
        if operation == "erode":
            moved = np.where(ndimage.binary_erosion(moved > 0), moved, 0).astype(np.uint8)
        elif operation == "dilate":
            moved = ndimage.grey_dilation(moved, size=(3, 3, 3)).astype(np.uint8)
        if not any(np.array_equal(moved, kept) for kept in candidates):
            candidates.append(moved)
    return np.stack(candidates)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return float(value) if np.isfinite(value) else 0.0


def judge_of(variant: str, args: argparse.Namespace) -> AtlasJudge:
    if variant == "full":
        return AtlasJudge(args.registration, crop_margin=None, max_registration_voxels=None)
    if variant == "default":
        return AtlasJudge(args.registration)
    if variant == "crop":
        return AtlasJudge(args.registration, crop_margin=args.crop_margin, max_registration_voxels=None)
    return AtlasJudge(args.registration, crop_margin=args.crop_margin, max_registration_voxels=args.shrunk_voxels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/Dataset004_Hippocampus"))
    parser.add_argument("--atlases", type=int, default=5)
    parser.add_argument("--test-cases", type=int, default=12)
    parser.add_argument("--registration", choices=("affine", "deformable"), default="deformable")
    parser.add_argument("--variants", default="full", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--candidates", type=int, default=8, help="imperfect masks per case")
    parser.add_argument("--max-shift", type=int, default=1, help="voxels a candidate is moved by, at most, per axis")
    parser.add_argument("--crop-margin", type=int, default=AtlasJudge().crop_margin)
    parser.add_argument("--shrunk-voxels", type=int, default=10_000, help="max_registration_voxels of 'shrunk'")
    parser.add_argument("--threads", type=int, default=1, help="SimpleITK threads")
    parser.add_argument("-o", "--output", type=Path, default=None, help="JSON with the per-case figures")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    from nnunet_rndpo.judges.atlas import set_registration_threads

    set_registration_threads(args.threads)
    case_ids = sorted(path.name[: -len("_0000.nii.gz")] for path in (args.data / "imagesTr").glob("*_0000.nii.gz"))
    if len(case_ids) < args.atlases + args.test_cases:
        raise SystemExit(f"{args.data}: {len(case_ids)} cases, fewer than --atlases + --test-cases")
    references = []
    for case_id in case_ids[: args.atlases]:
        image, labels = read_case(args.data, case_id)
        references.append(JudgeInput(case_id, labels[None], LABELS, image=image[None], true_labels=labels))
    judges = {variant: judge_of(variant, args) for variant in variants}
    for judge in judges.values():
        judge.fit(references)
    per_case: dict[str, dict] = {variant: {} for variant in variants}
    for index, case_id in enumerate(case_ids[args.atlases : args.atlases + args.test_cases]):
        image, truth = read_case(args.data, case_id)
        candidates = candidate_masks(truth, args.candidates, seed=index, max_shift=args.max_shift)
        true_dice = proposal_dice(candidates, truth, LABELS)
        case = JudgeInput(case_id, candidates, LABELS, image=image[None])
        for variant, judge in judges.items():
            started = time.perf_counter()
            scores, by_label = judge.score_with_voxels(case)
            seconds = time.perf_counter() - started
            top = int(np.argmax(scores))
            per_case[variant][case_id] = {
                "fused_dice_per_class": dice_per_class(fused_labels(by_label), truth, LABELS).tolist(),
                "spearman": spearman(scores, true_dice),
                "top1_hit": bool(true_dice[top] == true_dice.max()),
                "top1_lift_points": float(100 * (true_dice[top] - true_dice.mean())),
                "seconds": seconds,
                "scores": scores.tolist(),
                "true_dice": true_dice.tolist(),
            }
            row = per_case[variant][case_id]
            print(
                f"{case_id} {variant:6s} fused Dice {np.mean(row['fused_dice_per_class']):.3f} "
                f"spearman {row['spearman']:+.2f} top-1 hit {int(row['top1_hit'])} "
                f"lift {row['top1_lift_points']:+.2f} {seconds:.1f} s",
                flush=True,
            )
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} SimpleITK thread(s)",
        "date": date.today().isoformat(),
        "atlases": case_ids[: args.atlases],
        "registration": args.registration,
        "candidates_per_case": args.candidates,
        "max_shift": args.max_shift,
        "crop_margin": args.crop_margin,
        "shrunk_voxels": args.shrunk_voxels,
        "variants": {variant: summarise(per_case[variant]) for variant in variants},
        "minus_first_variant": {
            variant: paired_difference(per_case[variant], per_case[variants[0]]) for variant in variants[1:]
        },
    }
    print(json.dumps(summary, indent=1))
    if args.output is not None:
        args.output.write_text(json.dumps({**summary, "per_case": per_case}, indent=1))


def summarise(rows: dict) -> dict:
    dice = np.asarray([row["fused_dice_per_class"] for row in rows.values()])
    lifts = np.asarray([row["top1_lift_points"] for row in rows.values()])
    return {
        "mean_dice_per_class": dice.mean(axis=0).tolist(),
        "mean_dice": float(dice.mean()),
        "spearman": float(np.mean([row["spearman"] for row in rows.values()])),
        "top1_hit": float(np.mean([row["top1_hit"] for row in rows.values()])),
        "top1_lift_points": float(lifts.mean()),
        "top1_lift_points_sem": float(lifts.std(ddof=1) / np.sqrt(len(lifts))) if len(lifts) > 1 else 0.0,
        "seconds_per_case": float(np.mean([row["seconds"] for row in rows.values()])),
    }


def paired_difference(rows: dict, baseline: dict) -> dict:
    """Per-case differences to the baseline variant: mean and standard error of each figure."""

    def mean_and_error(values: list[float]) -> list[float]:
        values = np.asarray(values, dtype=np.float64)
        error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
        return [float(values.mean()), float(error)]

    cases = sorted(rows)
    return {
        "fused_dice": mean_and_error(
            [np.mean(rows[c]["fused_dice_per_class"]) - np.mean(baseline[c]["fused_dice_per_class"]) for c in cases]
        ),
        "spearman": mean_and_error([rows[c]["spearman"] - baseline[c]["spearman"] for c in cases]),
        "top1_hit": mean_and_error([float(rows[c]["top1_hit"]) - float(baseline[c]["top1_hit"]) for c in cases]),
        "top1_lift_points": mean_and_error(
            [rows[c]["top1_lift_points"] - baseline[c]["top1_lift_points"] for c in cases]
        ),
        "max_abs_score_difference": float(
            max(np.max(np.abs(np.subtract(rows[c]["scores"], baseline[c]["scores"]))) for c in cases)
        ),
        "seconds_ratio": float(
            np.mean([rows[c]["seconds"] for c in cases]) / np.mean([baseline[c]["seconds"] for c in cases])
        ),
    }


if __name__ == "__main__":
    main()
