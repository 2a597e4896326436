"""The end-of-run summary of a preference fine-tuning run: what it did and what it reached, in a few lines for the
log and as `rndpo_summary.json` in the output folder. Pure: the trainer passes what it recorded."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def run_summary(
    *,
    settings_sources: Sequence[str],
    pairs_summary: dict,
    statistics: dict[str, list[float]],
    pseudo_dice: Sequence[float],
    base_pseudo_dice: Optional[float],
    chosen_checkpoint: str,
    phase_seconds: dict[str, float],
    epoch_seconds: Sequence[float],
) -> dict:
    """recipe: the settings' source line that names it; pairs: how many were mined and from how many cases, and the
    share of patches whose pair had no disagreement left after augmentation (skipped); pseudo Dice: nnU-Net's
    validation pseudo Dice of the base (validate_base) and of the last epoch; checkpoint: which weights are final;
    seconds: start phase (proposals, judging), fine-tuning epochs."""
    recipe = next((line for line in settings_sources if line.startswith("recipe")), "")
    skipped = [value for value in statistics.get("pairs/skipped_fraction", []) if not math.isnan(value)]
    final_dice = float(pseudo_dice[-1]) if len(pseudo_dice) else None
    seconds = {**{key: round(float(value), 1) for key, value in phase_seconds.items()}}
    seconds["fine_tuning_s"] = round(float(sum(epoch_seconds)), 1)
    summary = {
        "recipe": recipe,
        "pairs": {
            "strategy": pairs_summary.get("strategy"),
            "pairs": pairs_summary.get("pairs"),
            "cases": pairs_summary.get("cases_total"),
            "cases_without_pair": pairs_summary.get("cases_without_pair"),
            "skipped_fraction_of_patches": float(sum(skipped) / len(skipped)) if skipped else None,
        },
        "pseudo_dice": {"base": base_pseudo_dice, "final_epoch": final_dice, "epochs": len(pseudo_dice)},
        "final_checkpoint": chosen_checkpoint,
        "seconds": seconds,
    }
    summary["lines"] = _lines(summary)
    return summary


def _number(value: Optional[float], pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def _lines(summary: dict) -> list[str]:
    pairs, dice, seconds = summary["pairs"], summary["pseudo_dice"], summary["seconds"]
    change = (
        f" ({(dice['final_epoch'] - dice['base']) * 100:+.2f} points)"
        if dice["base"] is not None and dice["final_epoch"] is not None
        else ""
    )
    return [
        "summary of the run:",
        f"  {summary['recipe'] or 'recipe: -'}",
        f"  pairs: {pairs['pairs']} ({pairs['strategy']}) from {pairs['cases']} cases, "
        f"{pairs['cases_without_pair'] if pairs['cases_without_pair'] is not None else '-'} without a pair; "
        f"patches whose pair had no disagreement left: {_number(pairs['skipped_fraction_of_patches'], '.1%')}",
        f"  pseudo Dice: base {_number(dice['base'], '.4f')}, last epoch {_number(dice['final_epoch'], '.4f')}{change}",
        f"  final weights: {summary['final_checkpoint']}",
        "  seconds: " + ", ".join(f"{key[:-2].replace('_', ' ')} {value:,.0f}" for key, value in seconds.items()),
    ]
