"""Paired differences between arms, case by case (every arm is scored on the same validation and test cases)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def per_case_dice(result: dict, split: str) -> dict[str, float]:
    """Final checkpoint's mean foreground Dice of each case on `split`."""
    cases = result[split]["checkpoint_final"]["per_case"]
    return {case: float(np.mean(list(dice.values()))) for case, dice in cases.items()}


def case_differences(arm: dict, other: dict, split: str) -> np.ndarray:
    """`arm`'s final per-case Dice minus `other`'s on `split`, in Dice points, over `other`'s cases sorted."""
    mine, theirs = per_case_dice(arm, split), per_case_dice(other, split)
    return np.array([mine[case] - theirs[case] for case in sorted(theirs)]) * 100


def difference_figures(differences: np.ndarray) -> dict:
    """Mean and standard error (Dice points) of per-case differences, and how many cases got better."""
    error = differences.std(ddof=1) / np.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    return {
        "mean": float(differences.mean()),
        "standard_error": float(error),
        "better": int(np.sum(differences > 0)),
        "cases": len(differences),
    }


def paired_case_difference(arm: dict, base: dict, split: str) -> Optional[dict]:
    """Final checkpoint minus base, per case (mean foreground Dice of each case), on `split` ("test" or
    "validation"): mean and standard error in Dice points, and how many cases got better. None when either lacks
    the split."""
    if split not in arm or split not in base:
        return None
    return difference_figures(case_differences(arm, base, split))


def paired_seed_difference(runs: dict[int, dict], others: dict[int, dict], split: str) -> Optional[dict]:
    """`runs` minus `others` of the same seed (each by seed), per case, each case's difference averaged over the
    seeds both have: mean and standard error over cases (Dice points), cases better, and the seeds. The error is
    the cases' only (the seeds' own spread is in the summary table). None when no seed has the split on both
    sides."""
    seeds = [seed for seed, run in runs.items() if split in run and seed in others and split in others[seed]]
    if not seeds:
        return None
    differences = np.mean([case_differences(runs[seed], others[seed], split) for seed in seeds], axis=0)
    return {**difference_figures(differences), "seeds": sorted(seeds)}


def difference_cells(figures_of_split: Callable[[str], Optional[dict]]) -> list[str]:
    """One report cell per split a paired difference has (`figures_of_split(split)` is None where it has not)."""
    cells = []
    for split in ("validation", "test"):
        figures = figures_of_split(split)
        if figures is not None:
            over = "".join(
                f"; {key} {', '.join(str(each) for each in figures[key])}"
                for key in ("seeds", "folds")
                if key in figures
            )
            cells.append(
                f"{split} {figures['mean']:+.2f} ± {figures['standard_error']:.2f} pts "
                f"({figures['better']}/{figures['cases']} cases better{over})"
            )
    return cells
