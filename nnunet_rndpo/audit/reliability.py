"""Reliability-to-gain curves: the gain of preference training measured against a judge's reliability (an oracle
noise sweep, benchmarks/low_label), and the gain it expects for a judge of a measured reliability."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# A judge's reliability figures that a reliability-to-gain curve may be expressed in.
RELIABILITY_METRICS = ("spearman", "kendall", "top1_hit_rate", "top1_lift")


@dataclass(frozen=True)
class ReliabilityCurve:
    """Expected gain of preference training as a function of a judge's measured reliability.

    metric: one of RELIABILITY_METRICS; points: (reliability, gain) sorted by reliability, distinct
    reliabilities; gain_unit and source: free text for the report."""

    metric: str
    points: tuple[tuple[float, float], ...]
    gain_unit: str = ""
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "points": [list(point) for point in self.points],
            "gain_unit": self.gain_unit,
            "source": self.source,
        }


def expected_gain(reliability: float | None, curve: Sequence[Sequence[float]] | None) -> float | None:
    """The gain a judge of this reliability should bring, read off a curve of (reliability, gain) points:
    linear interpolation between points, the end values beyond them; None without a curve or a reliability."""
    if curve is None or reliability is None:
        return None
    points = _checked_points(curve, "curve")
    reliabilities, gains = (np.array(values, dtype=np.float64) for values in zip(*points))
    return float(np.interp(float(reliability), reliabilities, gains))


def load_reliability_curve(source: str | os.PathLike | dict | ReliabilityCurve) -> ReliabilityCurve:
    """A reliability-to-gain curve from a JSON file (or its parsed dict). Format:

    {"metric": "spearman",                      # one of RELIABILITY_METRICS
     "points": [[0.0, -0.3], [0.6, 0.2], [1.0, 1.0]],   # (reliability, gain), any order
     "gain_unit": "Dice points",                # optional
     "source": "oracle noise sweep, Hippocampus, 2026-12"}   # optional
    """
    if isinstance(source, ReliabilityCurve):
        return source
    where = "reliability curve"
    if not isinstance(source, dict):
        where = f"reliability curve {str(source)!r}"
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{where}: cannot read it as JSON: {error}") from error
    if not isinstance(source, dict):
        raise ValueError(f"{where}: expected a JSON object with 'metric' and 'points'")
    metric = source.get("metric")
    if metric not in RELIABILITY_METRICS:
        raise ValueError(f"{where}: 'metric' must be one of {', '.join(RELIABILITY_METRICS)}, got {metric!r}")
    points = _checked_points(source.get("points"), f"{where}: 'points'")
    return ReliabilityCurve(metric, points, str(source.get("gain_unit", "")), str(source.get("source", "")))


def _checked_points(points: Any, where: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = [(float(reliability), float(gain)) for reliability, gain in points]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} must be a list of [reliability, gain] number pairs, got {points!r}") from error
    if not pairs or not all(np.isfinite(pairs).all(axis=1)):
        raise ValueError(f"{where} must hold at least one point of finite numbers, got {points!r}")
    pairs.sort()
    reliabilities = [reliability for reliability, _ in pairs]
    if len(set(reliabilities)) != len(reliabilities):
        raise ValueError(f"{where} gives two gains for one reliability: {pairs}")
    return tuple(pairs)
