"""Judges: score the K proposals of a case, higher = better (installed as `nnunet_rndpo.judges`).

Built-in judges by registry name: agreement, uncertainty, learned_qc, virtual_annotator, anatomy (a density
of anatomical features fitted on the labeled cases' true labels), atlas (overlap with the labeled cases'
labels registered onto the case's image), combination (a weighted sum of other judges'
within-case ranks), and the research-only oracle (reads the true labels). A user's own judge is a `Judge`
subclass, given to `get_judge` as a dotted path "package.module:ClassName" or registered with `register_judge`.
"""

if __name__ != "nnunet_rndpo.judges":
    # The repository's top-level folder is the installed package nnunet_rndpo.judges (setup.py); imported as a
    # top-level `judges` (the repository root on sys.path) every judge class would exist twice, the registry too.
    raise ImportError(f"import the judges as nnunet_rndpo.judges, not as {__name__!r} (the repository's folder)")

from .agreement import AgreementJudge
from .anatomy import AnatomyJudge
from .atlas import AtlasJudge
from .base import (
    FitExamples,
    Judge,
    JudgeError,
    JudgeInput,
    available_judges,
    get_judge,
    judges_with_voxel_probabilities,
    register_judge,
    score_case,
    score_case_with_voxels,
)
from .combination import CombinationJudge
from .learned_qc import LearnedQCJudge
from .oracle import OracleJudge
from .uncertainty import UncertaintyJudge
from .virtual_annotator import VirtualAnnotatorJudge

for _judge_class in (
    AgreementJudge,
    UncertaintyJudge,
    LearnedQCJudge,
    VirtualAnnotatorJudge,
    AnatomyJudge,
    AtlasJudge,
    CombinationJudge,
    OracleJudge,
):
    register_judge(_judge_class.name, _judge_class)
del _judge_class

__all__ = [
    "AgreementJudge",
    "AnatomyJudge",
    "AtlasJudge",
    "CombinationJudge",
    "FitExamples",
    "Judge",
    "JudgeError",
    "JudgeInput",
    "LearnedQCJudge",
    "OracleJudge",
    "UncertaintyJudge",
    "VirtualAnnotatorJudge",
    "available_judges",
    "get_judge",
    "judges_with_voxel_probabilities",
    "register_judge",
    "score_case",
    "score_case_with_voxels",
]
