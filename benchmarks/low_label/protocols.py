"""The protocols as data: network, schedule, the split's sizes, the datasets they train on and how the labeled cases
are split into nnU-Net folds. Each protocol has its own --work folder (its split is refused by another protocol)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

CONFIGURATION = "3d_bench"  # a configuration added to the plans: 3d_fullres's patch, the protocol's features


@dataclass(frozen=True)
class Schedule:
    base_epochs: int = 60
    base_iterations: int = 50
    tune_epochs: int = 6
    tune_iterations: int = 50
    val_iterations: int = 5
    base_lr: float = 1e-2
    tune_lr: float = 1e-3


@dataclass(frozen=True)
class Protocol:
    name: str
    features: tuple[int, ...]
    schedule: Schedule
    label_free: tuple[str, ...]  # the label-free judges (catalogue.JUDGES keys) its plan audits and trains with
    # the split's sizes; the test split is the rest of the 180 cases
    labeled: int = 10
    validation: int = 10
    unlabeled: int = 120
    dataset_id: int = 940  # the labeled training and validation cases, the pool, the test cases
    upper_id: Optional[int] = 941  # the upper bound's: every labeled and pool case with its label
    # 1: nnU-Net's fold 0 trains on every labeled case and validates on the validation cases; 5: nnU-Net's 5-fold
    # cross-validation of the labeled cases (each fold holds one out), the validation cases in no fold
    folds: int = 1


PROTOCOL_V2 = Protocol(
    "v2",
    (16, 32, 64, 128),
    Schedule(base_epochs=100, base_iterations=50, tune_epochs=40, tune_iterations=50, val_iterations=20),
    (
        "agreement",
        "anatomy",
        "agreement_anatomy",
        "learned_qc",
        "virtual_annotator",
        "uncertainty",
        "atlas",
        "agreement_atlas",
    ),
)
# v2 with 5 labeled cases instead of 10 and twice the validation cases: on the CPU, v2's upper bound sat only 1.1
# points above its base (the issue asks for 2), and its 10 validation cases put a standard error of about 0.2 points
# on a paired difference (BENCHMARKS.md, "sanity gate").
PROTOCOL_V3 = replace(PROTOCOL_V2, name="v3", labeled=5, validation=20, unlabeled=115)
PROTOCOLS = {
    "v2": PROTOCOL_V2,
    "v3": PROTOCOL_V3,
    # v3's split (same cases, so v3's upper bound stays the bound on the same test cases) with nnU-Net's 5-fold
    # cross-validation of its 5 labeled cases: five fold models (4 cases each), their ensemble, each fold fine-tuned
    # with the other folds' members (BENCHMARKS.md, "five folds"); its own datasets, so a v3 work folder can sit
    # beside it
    "folds": replace(PROTOCOL_V3, name="folds", dataset_id=942, upper_id=None, folds=5),
}
QUICK_SCHEDULE = Schedule(base_epochs=2, base_iterations=5, tune_epochs=2, tune_iterations=5, val_iterations=2)
