"""The audit's recommendation: a label-free judge and a mining strategy, or advice against preference pairs."""

from __future__ import annotations

from typing import Any

from nnunet_rndpo.audit.formatting import format_number as _number
from nnunet_rndpo.audit.formatting import format_percent as _percent

RELIABLE_SPEARMAN = 0.6
# A reliable judge's pick must also beat a typical proposal by this fraction of what the oracle's pick gains (a judge
# can rank well overall and still pick typical masks; BENCHMARKS.md, the judge audits).
MIN_TOP1_LIFT_FRACTION = 0.25
MAX_WRONG_ROLE_FRACTION = 0.25
_TIE_TOLERANCE = 1e-12
# Preferred strategies: top_rest first because it keeps pairs between plausible masks (good-vs-broken
# pairs teach little, docs/measured-proposals.md); margin is the only option left for a weak judge.
_RELIABLE_JUDGE_STRATEGIES = ("top_rest", "top_bottom", "margin")
_WEAK_JUDGE_STRATEGIES = ("margin",)


def recommend(report: dict[str, Any]) -> dict[str, Any]:
    """Pick a label-free judge and a mining strategy, or advise against preference fine-tuning.

    Rule: the label-free judge with the highest mean Spearman is "reliable" when Spearman >= 0.6 and its
    top-1 lift (top pick's true Dice minus a typical proposal's) is at least 25% of the oracle pick's. A reliable
    judge gets the first of
    top_rest, top_bottom, margin whose pairs have a positive mean true-Dice gap and at most 25% wrong roles; a
    weak judge only margin under the same test. Without such a strategy: no preference pairs.
    """
    candidates = [
        (name, figures)
        for name, figures in report["judges"].items()
        if not figures["uses_labels"] and figures["spearman"] is not None
    ]
    if not candidates:
        return {
            "judge": None,
            "mining": None,
            "reliable": False,
            "reason": "no label-free judge could be evaluated (none given, or every case had constant scores "
            "or constant true Dice); audit on more or more varied labeled cases before fine-tuning",
        }
    name, figures = max(candidates, key=lambda item: (item[1]["spearman"], item[1]["top1_true_dice"]))
    spearman, top1 = figures["spearman"], figures["top1_true_dice"]
    typical, best = figures["mean_proposal_true_dice"], figures["best_true_dice"]
    # Reports written before the lift existed lack it; it is the same difference.
    lift, ceiling = figures.get("top1_lift", top1 - typical), figures.get("oracle_top1_lift", best - typical)
    lifts = lift >= MIN_TOP1_LIFT_FRACTION * ceiling - _TIE_TOLERANCE
    reliable = spearman >= RELIABLE_SPEARMAN and lifts
    judgement = (
        f"judge {name!r}: mean Spearman {spearman:.2f} with true Dice "
        f"({'>=' if spearman >= RELIABLE_SPEARMAN else '<'} {RELIABLE_SPEARMAN}); its top pick has true Dice "
        f"{top1:.3f} against {typical:.3f} for a typical proposal and {best:.3f} for the best one, a top-1 lift of "
        f"{_number(lift, '+.3f')} ({'>=' if lifts else '<'} {MIN_TOP1_LIFT_FRACTION:.0%} of the oracle's "
        f"{_number(ceiling, '+.3f')})"
    )
    for strategy in _RELIABLE_JUDGE_STRATEGIES if reliable else _WEAK_JUDGE_STRATEGIES:
        mining = figures["mining"].get(strategy)
        if not mining or not mining["pairs"]:
            continue
        if mining["chosen_minus_rejected_true_dice"] > 0 and mining["wrong_role_fraction"] <= MAX_WRONG_ROLE_FRACTION:
            pair_figures = (
                f"{strategy} mining gave {mining['pairs']} pairs with a mean true-Dice gap of "
                f"{mining['chosen_minus_rejected_true_dice']:+.3f} and wrong roles in "
                f"{mining['wrong_role_fraction']:.0%}"
            )
            if reliable:
                reason = f"{judgement}, so it is reliable; {pair_figures}."
            else:
                reason = (
                    f"WARNING: {judgement}, so it is weak; only pairs with a clear score gap are usable: "
                    f"{pair_figures} (margin {report['settings']['margin']}). Compare against self-training "
                    "or no fine-tuning: a weak judge can amplify its own errors."
                )
            return {"judge": name, "mining": strategy, "reliable": reliable, "reason": reason}
    tried = _WEAK_JUDGE_STRATEGIES if not reliable else _RELIABLE_JUDGE_STRATEGIES
    wrong = ", ".join(
        f"{strategy}: {_percent(figures['mining'][strategy]['wrong_role_fraction'])} wrong roles"
        for strategy in tried
        if strategy in figures["mining"]
    )
    return {
        "judge": name,
        "mining": None,
        "reliable": reliable,
        "reason": (
            f"{judgement}; no mining strategy gives pairs with a positive true-Dice gap and at most "
            f"{MAX_WRONG_ROLE_FRACTION:.0%} wrong roles ({wrong or 'none mined'}). Preference pairs would teach "
            "the judge's errors: prefer self-training on the plain prediction, or no fine-tuning."
        ),
    }
