"""Real-data check of the atlas judge's information: how close are fused atlas labels to the expert labels?

The first `--atlases` Hippocampus cases (sorted by name) are the atlases; each of the next `--test-cases` cases is
segmented by registering every atlas onto it (`judges.atlas.fused_atlas_probabilities`, affine and, by default,
also deformable) and taking the most probable class where some class is voted by more than half of the atlases.
Printed: mean Dice per class and overall against the expert labels, and seconds per case. No model is involved:
this measures how much the labeled cases alone know about a new case, by a route that does not go through the
network; whether that ranks a model's proposals is the audit's job.

Images are read in raw space with SimpleITK and z-scored per case, as nnU-Net's preprocessing does for MRI;
Dataset004_Hippocampus has one spacing (1 mm) for all cases, so registering in voxels is registering in mm.

    python benchmarks/atlas_check.py --data ../shared/data/Dataset004_Hippocampus --atlases 5 --test-cases 12
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from nnunet_rndpo.judges.atlas import fused_atlas_probabilities
from nnunet_rndpo.segmentation_metrics import dice_per_class

LABELS = (1, 2)


def read_case(data: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(z-scored image, label map) of one case in raw space."""
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "imagesTr" / f"{case_id}_0000.nii.gz"), sitk.sitkFloat32))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{case_id}.nii.gz")))
    return (image - image.mean()) / max(float(image.std()), 1e-8), labels.astype(np.uint8)


def fused_labels(probabilities: np.ndarray) -> np.ndarray:
    """The label map of fused probabilities (rows = LABELS): the most probable class where it has a majority."""
    winner = np.asarray(LABELS)[np.argmax(probabilities, axis=0)]
    return np.where(probabilities.max(axis=0) > 0.5, winner, 0).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/Dataset004_Hippocampus"))
    parser.add_argument("--atlases", type=int, default=5)
    parser.add_argument("--test-cases", type=int, default=12)
    parser.add_argument("--registration", choices=("affine", "deformable"), default="deformable")
    parser.add_argument("-o", "--output", type=Path, default=None, help="JSON with the per-case figures")
    args = parser.parse_args()
    case_ids = sorted(path.name[: -len("_0000.nii.gz")] for path in (args.data / "imagesTr").glob("*_0000.nii.gz"))
    if len(case_ids) < args.atlases + args.test_cases:
        raise SystemExit(f"{args.data}: {len(case_ids)} cases, fewer than --atlases + --test-cases")
    atlases = [read_case(args.data, case_id) for case_id in case_ids[: args.atlases]]
    per_case = {}
    started = time.perf_counter()
    for case_id in case_ids[args.atlases : args.atlases + args.test_cases]:
        image, truth = read_case(args.data, case_id)
        probabilities = fused_atlas_probabilities(image, atlases, LABELS, deformable=args.registration == "deformable")
        per_case[case_id] = dice_per_class(fused_labels(probabilities), truth, LABELS).tolist()
        print(case_id, " ".join(f"{value:.3f}" for value in per_case[case_id]), flush=True)
    seconds_per_case = (time.perf_counter() - started) / len(per_case)
    dice = np.asarray(list(per_case.values()))
    summary = {
        "atlases": case_ids[: args.atlases],
        "registration": args.registration,
        "mean_dice_per_class": dice.mean(axis=0).tolist(),
        "mean_dice": float(dice.mean()),
        "seconds_per_case": seconds_per_case,
    }
    print(json.dumps(summary, indent=1))
    if args.output is not None:
        args.output.write_text(json.dumps({**summary, "per_case": per_case}, indent=1))


if __name__ == "__main__":
    main()
