"""Finished arms' results as the report and the plans read them: each result JSON of <work>/arms/ with its Arm."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.low_label.arms import Arm, ArmRecordError, arm_from_record

GATE_EPOCHS = 5  # the late validation pseudo Dice is the mean of the last this many epochs

Results = dict  # Arm -> its result JSON (a dict), in the order of the arms' names


def result_files(work: Path) -> list[Path]:
    return sorted((Path(work) / "arms").glob("*.json"))


def load_result(path: Path) -> Optional[tuple[Arm, dict]]:
    """One result file and its Arm (`arm_from_record`; a record that does not match its file is an error naming
    the file). None for a JSON that holds no arm (an arm's settings file kept beside its result)."""
    result = json.loads(Path(path).read_text())
    if "arm" not in result:
        return None
    try:
        arm = arm_from_record(result["arm"], result.get("schedule", {}).get("tune_lr"), Path(path).stem)
    except (ArmRecordError, KeyError) as error:
        raise ArmRecordError(f"{path}: {error}") from error
    return arm, result


def load_results(work: Path) -> Results:
    """Every finished arm under <work>/arms/ by Arm, in name order. A JSON there that holds no arm (an arm's
    settings file kept beside its result) is not a result: skipped, with a note on stderr."""
    results: Results = {}
    for path in result_files(work):
        loaded = load_result(path)
        if loaded is None:
            print(f"note: {path} holds no arm: not a result, left out", file=sys.stderr)
            continue
        arm, result = loaded
        if arm in results:
            raise ArmRecordError(f"{path}: a second result of arm {arm.name}")
        results[arm] = result
    return results


def by_name(results: Results) -> dict[str, dict]:
    return {arm.name: result for arm, result in results.items()}


def validation_dice(result: dict) -> float:
    """An arm's final checkpoint's mean foreground Dice on the whole validation cases (`score_validation`)."""
    return result["validation"]["checkpoint_final"]["foreground_mean"]


def dice_on_test(result: dict, checkpoint: str = "checkpoint_final") -> float:
    return result["test"][checkpoint]["foreground_mean"]


def late_validation(curve: list[float]) -> float:
    """The mean validation pseudo Dice of the last GATE_EPOCHS epochs (shown beside the whole-case figure)."""
    return float(np.mean(curve[-GATE_EPOCHS:]))
