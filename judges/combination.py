"""Combination judge: a weighted sum of several judges' within-case ranks.

Where its information comes from: its sub-judges'. Judges that know different things (the model's own
agreement, the labeled anatomy, the model's probabilities) make different mistakes, so their combined
ranking can be more reliable than each; the audit says whether it is. Ranks, not raw scores, are summed
because the judges' scales are unrelated (a Dice in [0, 1], a log-density that can reach -500): within a
case each judge's scores become average ranks mapped to [0, 1] (worst 0, best 1; ties share their mean rank;
a single proposal gets 0.5), then score = sum_j weight_j * normalised_rank_j.

Cost: the sum of the sub-judges' costs. `fit` fits the sub-judges that learn, on the same labeled cases.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import stats

from .base import Judge, JudgeError, JudgeInput, get_judge, score_case


class CombinationJudge(Judge):
    """Score = sum_j weights[j] * within-case normalised rank of judges[j]'s scores (module docstring).

    judges: registered names or dotted paths; weights: one non-negative number per judge, not all zero
    (default: equal weights summing to 1); judge_options: {judge spec: constructor options} for sub-judges.
    A combination that contains a label-reading judge (the oracle) reads the labels too (`needs_labels`).
    """

    name = "combination"

    def __init__(
        self,
        judges: Sequence[str] = ("agreement", "anatomy"),
        weights: Sequence[float] | None = None,
        judge_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if isinstance(judges, str) or not judges:
            raise JudgeError(f"combination option 'judges' must be a non-empty list of judge names, got {judges!r}")
        judges = [str(spec) for spec in judges]
        if len(set(judges)) != len(judges):
            raise JudgeError(f"combination option 'judges' lists a judge twice: {judges}")
        weights = [1.0 / len(judges)] * len(judges) if weights is None else [float(w) for w in weights]
        if len(weights) != len(judges):
            raise JudgeError(
                f"combination option 'weights' has {len(weights)} values for {len(judges)} judges {judges}"
            )
        if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
            raise JudgeError(f"combination option 'weights' must be finite, >= 0 and not all 0, got {weights}")
        judge_options = {str(spec): dict(options) for spec, options in (judge_options or {}).items()}
        unknown = sorted(set(judge_options) - set(judges))
        if unknown:
            raise JudgeError(f"combination option 'judge_options' names judges {unknown} that are not in {judges}")
        self.judge_specs = judges
        self.weights = weights
        self.judge_options = judge_options
        self.judges = [get_judge(spec, **judge_options.get(spec, {})) for spec in judges]
        # An instance attribute on purpose: whether labels are read depends on the sub-judges.
        self.needs_labels = any(judge.needs_labels for judge in self.judges)  # type: ignore[misc]

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"judges": list(self.judge_specs), "weights": list(self.weights)}
        if self.judge_options:
            options["judge_options"] = {spec: dict(values) for spec, values in self.judge_options.items()}
        return options

    def fitted_state(self) -> dict[str, Any]:
        states = {spec: judge.fitted_state() for spec, judge in zip(self.judge_specs, self.judges)}
        return {"judges": states} if any(states.values()) else {}

    def load_fitted_state(self, fitted: dict[str, Any]) -> None:
        for spec, state in fitted.get("judges", {}).items():
            if spec not in self.judge_specs:
                raise JudgeError(f"combination: fitted state of judge {spec!r}, which is not in {self.judge_specs}")
            self.judges[self.judge_specs.index(spec)].load_fitted_state(state)

    def describe(self) -> str:
        parts = "; ".join(f"{weight:g} x {judge.describe()}" for weight, judge in zip(self.weights, self.judges))
        return f"{super().describe()}: {parts}"

    @property
    def learns(self) -> bool:
        return any(judge.learns for judge in self.judges)

    def fit_from(self, examples) -> None:
        """Each learning sub-judge asks for its own kind of examples (labels for anatomy, held-out predictions for
        learned_qc), each made once by `examples`."""
        for judge in self.judges:
            if judge.learns:
                judge.fit_from(examples)

    def fit(self, labeled_cases: Sequence[JudgeInput]) -> None:
        labeled_cases = list(labeled_cases)
        for judge in self.judges:
            if judge.learns:
                judge.fit(labeled_cases)

    def score(self, case: JudgeInput) -> np.ndarray:
        total = np.zeros(case.proposal_count)
        for weight, judge in zip(self.weights, self.judges):
            if weight > 0:
                total += weight * normalised_ranks(score_case(judge, case))
        return total


def normalised_ranks(scores: np.ndarray) -> np.ndarray:
    """Average ranks of `scores` mapped to [0, 1]: lowest 0, highest 1, ties share; one score -> 0.5."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 1:
        return np.full(1, 0.5)
    return (stats.rankdata(scores, method="average") - 1.0) / (scores.size - 1)
