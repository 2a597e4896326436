"""Seconds per case of the atlas judge on a synthetic CT-sized case: the whole volume against the crop, and the crop
registered on a shrunk copy, side by side in one run (issue 29, item 3).

The script makes its cases itself: a body (an ellipsoid of soft tissue in noise) holding `--organs` organs
(ellipsoids of their own intensity and label) at places and sizes drawn per case; `--atlases` such cases are the
atlases, one more is judged, with `--candidates` imperfect masks of its true labels (moved by up to 2 voxels per
axis, eroded, dilated). Variants (`AtlasJudge` options): full, the whole volumes (the computation before crops);
crop, the default crop at full resolution; default, the default crop shrunk above the default
max_registration_voxels; shrunk, the default crop shrunk above `--shrunk-voxels`. Rows: seconds to score the case,
the Spearman correlation of the scores with the candidates' true Dice, whether the top-scored candidate is the best
one, and the fused labels' Dice to the truth.

    python -m benchmarks.atlas_scale --size 256 --atlases 3 -o benchmarks/results/atlas_check/atlas_scale_256.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import numpy as np

from benchmarks.atlas_check import candidate_masks, spearman
from benchmarks.bench_loading import cpu_model
from nnunet_rndpo.judges import AtlasJudge, JudgeInput
from nnunet_rndpo.judges.atlas import set_registration_threads
from nnunet_rndpo.segmentation_metrics import mean_dice, proposal_dice


def synthetic_ct(size: int, organs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (1, size^3) float32, label map uint8): organs 1..organs inside a body, placed and sized per seed."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[(slice(0, size),) * 3]
    centre = size / 2

    def inside(middle, radii):
        return sum(((axis - m) / r) ** 2 for axis, m, r in zip(grid, middle, radii)) < 1

    image = rng.normal(0.0, 0.05, (size,) * 3).astype(np.float32) - 1.0
    image[inside((centre,) * 3, (0.45 * size, 0.4 * size, 0.42 * size))] += 1.0
    label_map = np.zeros((size,) * 3, np.uint8)
    for organ in range(1, organs + 1):
        angle = 2 * np.pi * organ / organs
        middle = (
            centre + rng.uniform(-0.03, 0.03) * size,
            centre + 0.2 * size * np.cos(angle) + rng.uniform(-0.02, 0.02) * size,
            centre + 0.2 * size * np.sin(angle) + rng.uniform(-0.02, 0.02) * size,
        )
        radii = tuple(size * rng.uniform(0.07, 0.1) for _ in range(3))
        where = inside(middle, radii)
        label_map[where] = organ
        image[where] += 0.3 * organ
    return image[None], label_map


VARIANTS = {  # AtlasJudge options
    "full": {"crop_margin": None, "max_registration_voxels": None},  # the computation before crops
    "crop": {"max_registration_voxels": None},  # the default crop, never shrunk
    "default": {},  # the default crop, shrunk above the default max_registration_voxels
    "shrunk": {},  # the default crop, shrunk above --shrunk-voxels
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--organs", type=int, default=4)
    parser.add_argument("--atlases", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shrunk-voxels", type=int, default=150_000, help="max_registration_voxels of 'shrunk'")
    parser.add_argument("--threads", type=int, default=1, help="SimpleITK threads")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    set_registration_threads(args.threads)
    labels = tuple(range(1, args.organs + 1))
    atlases = []
    for seed in range(1, args.atlases + 1):
        image, label_map = synthetic_ct(args.size, args.organs, seed)
        atlases.append(JudgeInput(f"atlas_{seed}", label_map[None], labels, image=image, true_labels=label_map))
    image, truth = synthetic_ct(args.size, args.organs, 0)
    candidates = candidate_masks(truth, args.candidates, seed=0, max_shift=2)
    true_dice = proposal_dice(candidates, truth, labels)
    case = JudgeInput("case", candidates, labels, image=image)
    rows = {}
    for variant in args.variants.split(","):
        options = {"max_registration_voxels": args.shrunk_voxels} if variant == "shrunk" else VARIANTS[variant]
        judge = AtlasJudge(**options)
        judge.fit(atlases)
        started = time.perf_counter()
        scores, by_label = judge.score_with_voxels(case)
        seconds = time.perf_counter() - started
        fused = np.where(by_label.max(axis=0) > 0.5, np.argmax(by_label, axis=0), 0)
        rows[variant] = {
            "options": {key: judge.options()[key] for key in ("crop_margin", "max_registration_voxels")},
            "seconds_per_case": seconds,
            "spearman": spearman(scores, true_dice),
            "top1_hit": bool(true_dice[int(np.argmax(scores))] == true_dice.max()),
            "fused_dice": mean_dice(fused, truth, labels),
            "scores": scores.tolist(),
        }
        print(
            f"{args.size}^3 {variant:8s} {seconds:7.1f} s  spearman {rows[variant]['spearman']:+.2f}  "
            f"top-1 hit {int(rows[variant]['top1_hit'])}  fused Dice {rows[variant]['fused_dice']:.3f}",
            flush=True,
        )
    results = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} SimpleITK thread(s)",
        "date": date.today().isoformat(),
        "size": args.size,
        "organs": args.organs,
        "defaults": {key: AtlasJudge().options()[key] for key in ("crop_margin", "max_registration_voxels")},
        "atlases": args.atlases,
        "true_dice": true_dice.tolist(),
        "rows": rows,
    }
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
