"""Wall seconds of a fine-tuning arm's phases (proposals, judging, fine-tuning), read from nnU-Net's training log."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Optional

_PROPOSALS_LINE = re.compile(r"proposals: (\d+) cases \((\d+) generated.*?, ([\d.]+) s \(")


def _stamp(line: str) -> Optional[float]:
    """Seconds since the epoch of an nnU-Net log line ('2026-11-23 19:24:36.844298: ...'), None if it has none."""
    try:
        return datetime.strptime(line[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None


def phase_seconds(folder: Path) -> dict:
    """Wall seconds of a fine-tuning arm's phases, from the timestamps of its last nnU-Net training log.

    proposals_generated / proposals_s: cases generated in this run and the seconds it took (an arm that finds
    its seed's store filled pays 0); judging_s: scoring and mining (a judge's scores are cached in the store,
    so the second arm with the same judge pays about 1 s); fine_tuning_s: first epoch to 'Training done'."""
    for log in sorted(Path(folder).glob("training_log_*.txt"), reverse=True):
        lines = log.read_text().splitlines()
        marks = {}
        for line in lines:
            if ": proposals: " in line and "proposals" not in marks:
                match = _PROPOSALS_LINE.search(line)
                marks["proposals"] = (_stamp(line), match)
            elif ": training items: " in line:
                marks["items"] = (_stamp(line), None)
            elif line[28:].startswith("Training done"):
                marks["done"] = (_stamp(line), None)
        if {"proposals", "items", "done"} <= set(marks):
            match = marks["proposals"][1]
            return {
                "proposals_generated": int(match.group(2)) if match else None,
                "proposals_s": float(match.group(3)) if match else None,
                "judging_s": marks["items"][0] - marks["proposals"][0],
                "fine_tuning_s": marks["done"][0] - marks["items"][0],
            }
    return {}


def arm_phases(result: dict) -> dict:
    """Phase seconds of a finished fine-tuning arm: from its JSON, else from its log when that log is this
    arm's (arms sharing an output folder overwrite each other's logs: the phases must add up to the total)."""
    if "fine_tuning_s" in result.get("log_timings", {}):
        return result["log_timings"]
    phases = phase_seconds(Path(result["folder"]))
    total = result["seconds"].get("total_s")
    if (
        phases
        and total
        and abs(phases["fine_tuning_s"] + phases["judging_s"] + (phases["proposals_s"] or 0) - total) <= 0.1 * total
    ):
        return phases
    return {}
