"""Judge audit: how well each judge's scores track the true Dice of the proposals on labeled cases.

Modules: figures.py (the figures of each judge over the cases), reliability.py (a reliability-to-gain curve
and the gain it expects), recommendation.py (which judge and mining to use, or none), plots.py (the PNGs),
report.py (the text table and the written report), run.py (the audit of a trained model's proposals on its
validation cases: `nnunet_rndpo audit`).

Input per case: each judge's scores (K,) and the true mean Dice (K,) of the K proposals (plus the proposals,
which mining needs to skip identical masks). Output: a JSON-ready report dict, a recommendation of judge and
mining strategy, a PNG (one panel per judge), and a text table. Users should run it before trusting a judge:
a plausible-looking judge can be useless or harmful (docs/measured-proposals.md).

Conventions:
- rank correlations (Spearman, Kendall tau-b) are computed per case and averaged; a case where the
  judge's scores or the true Dice are constant has no ranking to compare and is skipped (counted);
- when several proposals tie for the judge's top score, top-1 figures are the expectation over a random
  pick among them; a top proposal whose true Dice equals the best true Dice counts as a hit;
- a mined pair has the wrong roles when the chosen proposal's true Dice is strictly lower than the
  rejected one's; equal true Dice counts as neither right nor wrong.

What decides the gain of preference training (figures beyond the rank correlations):
- top-1 lift: true Dice of the judge's pick minus the case's mean proposal's true Dice, averaged over
  cases; the oracle's lift (best minus mean) is the ceiling. A judge with Spearman 0.8 and lift ~0 (the
  agreement judge on mirror members) picks typical masks: it knows nothing the model does not;
- chosen minus rejected true Dice of the mined pairs, per mining strategy
  (`chosen_minus_rejected_true_dice`): what training is told to prefer, measured;
- what it is told voxel by voxel (`mining.<strategy>.chosen_right_in_disagreement`, when the cases carry their
  true label maps): RN-DPO pushes every voxel where the two masks disagree towards the chosen mask's label, so
  the fraction of those voxels where the chosen label is the true one is the share of the push that is right
  (pooled over the pairs' voxels; the rejected mask's share beside it, the rest is neither); the same shares
  on the voxels each other `preference_region` keeps (`mining.<strategy>.preference_regions.<region>`: the
  part of the disagreeing voxels kept, and the shares there; `judge_voxels` only for a judge whose per-voxel
  probabilities the case carries, `AuditCase.judge_voxel_probabilities`, else its figures are None);
- the rank curve: true Dice relative to the case mean at each judge rank (1 = the judge's top; tied
  proposals share their mean), averaged over cases; a perfect ranking is a monotone decreasing curve, the
  oracle's curve is drawn beside it (`judge_audit_ranks.png`);
- a montage of mined pairs (`judge_audit_pairs.png`): per judge, the first few pairs of one strategy, each
  on the axial (first spatial axis) slice with the most disagreeing voxels, cropped around the two masks;
- expected gain: the judge's reliability read off a reliability-to-gain curve measured elsewhere (an oracle
  noise sweep), when one is given (`reliability_curve`, format in `load_reliability_curve`).
"""

from nnunet_rndpo.audit.figures import (
    AuditCase,
    PairExample,
    audit_judges,
    disagreement_correctness,
    mean_rank_curve,
    pair_example,
    rank_curve,
)
from nnunet_rndpo.audit.recommendation import recommend
from nnunet_rndpo.audit.reliability import RELIABILITY_METRICS, ReliabilityCurve, expected_gain, load_reliability_curve
from nnunet_rndpo.audit.report import (
    AUDIT_JSON_NAME,
    AUDIT_PAIRS_PNG_NAME,
    AUDIT_PNG_NAME,
    AUDIT_RANKS_PNG_NAME,
    format_table,
    write_audit,
)

__all__ = [
    "AUDIT_JSON_NAME",
    "AUDIT_PAIRS_PNG_NAME",
    "AUDIT_PNG_NAME",
    "AUDIT_RANKS_PNG_NAME",
    "RELIABILITY_METRICS",
    "AuditCase",
    "PairExample",
    "ReliabilityCurve",
    "audit_judges",
    "disagreement_correctness",
    "expected_gain",
    "format_table",
    "load_reliability_curve",
    "mean_rank_curve",
    "pair_example",
    "rank_curve",
    "recommend",
    "write_audit",
]
