"""Pair mining: turn a judge's scores of K proposals per case into (chosen, rejected) preference pairs.

Pure: no files, no nnU-Net, and no labels — the roles come from the judge's scores only (higher score =
chosen), so whatever the judge believes is what training learns.

Strategies:
- top_bottom: the best-scored proposal against the worst-scored one (one pair per case).
- top_rest: the best-scored proposal against every proposal scored strictly lower (up to K-1 pairs).
- margin: every two proposals whose score gap is at least `margin` (and > 0); the higher one is chosen.
- top_plain: the best-scored proposal against the plain one (index 0: the base model's own prediction, which
  every proposal plan puts first). Its pair covers exactly the voxels where the judge's pick would correct what
  the model predicts now, where `top_bottom` also pushes voxels the model already labels like the pick (an
  outlier member's errors). No pair when the plain proposal is the best-scored one.
- halves: one proposal drawn (seeded per case) from the judge's top half against one drawn from its bottom half
  (the middle one of an odd K in neither). A judge that agrees with the consensus always picks a typical member
  and rejects the most deviant one, so its `top_bottom` pairs train towards what the model predicts already;
  drawing from the halves keeps the judge's direction but spreads the chosen masks over the members, as a noisy
  judge's picks are spread. Measured (BENCHMARKS.md, "Spreading the label-free judge's pairs"): with agreement a
  little above top_bottom, within noise; with a reliable judge half the gain lost, its information being in the
  extremes.
- random: a control that ignores the scores: one pair drawn uniformly from the pairs of distinct masks,
  roles by a fair coin; its score_gap (chosen minus rejected) is negative when the coin disagrees with the
  judge. It measures what preference training does without any judgement.

Rules common to all:
- a proposal is never paired with itself, and two identical masks (disagreement 0) never form a pair: such
  candidate pairs are dropped and counted; a case whose proposals are all the same gives no pair;
- two proposals with equal scores carry no preference and are never paired (except by `random`); the
  skipped candidates are counted. When several proposals tie for the top (or bottom) place, the seeded rng
  picks one of them, so no index is favoured;
- the per-case rng is seeded from (seed, a SHA-256 of the case id), so results do not depend on the order
  of cases or on Python's hash randomisation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

MINING_STRATEGIES = ("top_bottom", "top_rest", "margin", "top_plain", "halves", "random")
PLAIN_PROPOSAL = 0  # nnunet_rndpo.proposals.plan.plan_members: the plain pass first
_MARGIN_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Pair:
    case_id: str
    chosen: int
    rejected: int
    score_gap: float
    disagreement_voxels: int


@dataclass(frozen=True)
class CaseMiningOutcome:
    """What mining one case produced and what it dropped."""

    pairs: tuple[Pair, ...]
    all_identical: bool
    identical_pairs_skipped: int
    tied_pairs_skipped: int


@dataclass(frozen=True)
class MiningResult:
    strategy: str
    margin: float
    seed: int
    pairs: tuple[Pair, ...]
    cases_total: int
    cases_without_pair: int
    cases_all_identical: int
    identical_pairs_skipped: int
    tied_pairs_skipped: int

    def summary(self) -> dict[str, Any]:
        """Counts and disagreement statistics for logs and reports (no per-pair data)."""
        disagreement = np.array([pair.disagreement_voxels for pair in self.pairs], dtype=np.float64)
        return {
            "strategy": self.strategy,
            "margin": self.margin,
            "seed": self.seed,
            "pairs": len(self.pairs),
            "cases_total": self.cases_total,
            "cases_without_pair": self.cases_without_pair,
            "cases_all_identical": self.cases_all_identical,
            "identical_pairs_skipped": self.identical_pairs_skipped,
            "tied_pairs_skipped": self.tied_pairs_skipped,
            "mean_disagreement_voxels": float(disagreement.mean()) if disagreement.size else 0.0,
            "median_disagreement_voxels": float(np.median(disagreement)) if disagreement.size else 0.0,
        }


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """The rng of one case: depends on the seed and the case id only."""
    case_number = int.from_bytes(hashlib.sha256(str(case_id).encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), case_number])


def check_strategy(strategy: str, margin: float) -> None:
    if strategy not in MINING_STRATEGIES:
        raise ValueError(f"unknown mining strategy {strategy!r}; valid: {', '.join(MINING_STRATEGIES)}")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")


def mine_case_outcome(
    case_id: str,
    scores: np.ndarray,
    proposals: np.ndarray,
    strategy: str,
    *,
    margin: float = 0.05,
    rng: np.random.Generator,
    disagreement: np.ndarray | None = None,
) -> CaseMiningOutcome:
    """The pairs of one case (see the module docstring for the strategies and rules), with the counts of what
    was dropped. `disagreement` (K, K), from
    `disagreement_matrix(proposals)`, saves recomputing it when one case is mined several times."""
    check_strategy(strategy, margin)
    scores = np.asarray(scores, dtype=np.float64)
    proposals = np.asarray(proposals)
    count = proposals.shape[0] if proposals.ndim else 0
    if scores.shape != (count,):
        raise ValueError(f"case {case_id!r}: scores of shape {scores.shape} for {count} proposals")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"case {case_id!r}: scores contain NaN or inf: {scores.tolist()}")

    if disagreement is None:
        disagreement = disagreement_matrix(proposals)
    elif disagreement.shape != (count, count):
        raise ValueError(f"case {case_id!r}: disagreement matrix of shape {disagreement.shape} for {count} proposals")
    all_identical = count < 2 or not disagreement.any()
    if strategy == "random":
        candidates = [(i, j) for i in range(count) for j in range(i + 1, count) if disagreement[i, j] > 0]
        if not candidates:
            return CaseMiningOutcome((), all_identical, 0, 0)
        first, second = candidates[int(rng.integers(len(candidates)))]
        chosen, rejected = (first, second) if rng.random() < 0.5 else (second, first)
        gap = float(scores[chosen] - scores[rejected])
        pair = Pair(case_id, chosen, rejected, gap, int(disagreement[chosen, rejected]))
        return CaseMiningOutcome((pair,), all_identical, 0, 0)

    # Random tie-breaking key: a stable order by score where equal scores are shuffled by the case rng.
    order = np.lexsort((rng.permutation(count), -scores))
    if strategy == "top_bottom":
        candidates = [(int(order[0]), int(order[-1]))] if count >= 2 else []
    elif strategy == "top_rest":
        candidates = [(int(order[0]), int(other)) for other in order[1:]]
    elif strategy == "top_plain":
        candidates = [(int(order[0]), PLAIN_PROPOSAL)] if count >= 2 and order[0] != PLAIN_PROPOSAL else []
    elif strategy == "halves":
        half = count // 2
        candidates = [(int(rng.choice(order[:half])), int(rng.choice(order[count - half :])))] if half else []
    else:
        candidates = [(int(order[a]), int(order[b])) for a in range(count) for b in range(a + 1, count)]

    pairs: list[Pair] = []
    identical_skipped = tied_skipped = 0
    for chosen, rejected in candidates:
        gap = float(scores[chosen] - scores[rejected])
        if gap <= 0:
            tied_skipped += 1
            continue
        if strategy == "margin" and gap < margin - _MARGIN_TOLERANCE:  # 0.15 - 0.10 is 0.0499999...
            continue
        if disagreement[chosen, rejected] == 0:
            identical_skipped += 1
            continue
        pairs.append(Pair(case_id, chosen, rejected, gap, int(disagreement[chosen, rejected])))
    return CaseMiningOutcome(tuple(pairs), all_identical, identical_skipped, tied_skipped)


@dataclass
class PairMiner:
    """Mines case after case and keeps the counts, so callers can stream cases without holding them."""

    strategy: str
    margin: float = 0.05
    seed: int = 0
    pairs: list[Pair] = field(default_factory=list)
    cases_total: int = 0
    cases_without_pair: int = 0
    cases_all_identical: int = 0
    identical_pairs_skipped: int = 0
    tied_pairs_skipped: int = 0
    _case_ids: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        check_strategy(self.strategy, self.margin)

    def add_case(
        self, case_id: str, scores: np.ndarray, proposals: np.ndarray, disagreement: np.ndarray | None = None
    ) -> list[Pair]:
        case_id = str(case_id)
        if case_id in self._case_ids:
            raise ValueError(f"case {case_id!r} was mined twice; case ids must be unique")
        self._case_ids.add(case_id)
        outcome = mine_case_outcome(
            case_id,
            scores,
            proposals,
            self.strategy,
            margin=self.margin,
            rng=case_rng(self.seed, case_id),
            disagreement=disagreement,
        )
        self.pairs.extend(outcome.pairs)
        self.cases_total += 1
        self.cases_without_pair += not outcome.pairs
        self.cases_all_identical += outcome.all_identical
        self.identical_pairs_skipped += outcome.identical_pairs_skipped
        self.tied_pairs_skipped += outcome.tied_pairs_skipped
        return list(outcome.pairs)

    def result(self) -> MiningResult:
        return MiningResult(
            strategy=self.strategy,
            margin=self.margin,
            seed=self.seed,
            pairs=tuple(self.pairs),
            cases_total=self.cases_total,
            cases_without_pair=self.cases_without_pair,
            cases_all_identical=self.cases_all_identical,
            identical_pairs_skipped=self.identical_pairs_skipped,
            tied_pairs_skipped=self.tied_pairs_skipped,
        )


def mine_pairs(
    cases: Iterable[tuple[str, np.ndarray, np.ndarray]],
    strategy: str,
    margin: float = 0.05,
    seed: int = 0,
) -> MiningResult:
    """Mine every (case_id, scores (K,), proposals (K, *spatial)) with one strategy."""
    miner = PairMiner(strategy, margin=margin, seed=seed)
    for case_id, scores, proposals in cases:
        miner.add_case(case_id, scores, proposals)
    return miner.result()


def disagreement_matrix(proposals: np.ndarray) -> np.ndarray:
    """(K, K) number of voxels where two proposals differ."""
    count = proposals.shape[0] if proposals.ndim else 0
    flat = proposals.reshape(count, -1) if count else proposals.reshape(0, 0)
    disagreement = np.zeros((count, count), dtype=np.int64)
    for i in range(count):
        for j in range(i + 1, count):
            disagreement[i, j] = disagreement[j, i] = int(np.count_nonzero(flat[i] != flat[j]))
    return disagreement
