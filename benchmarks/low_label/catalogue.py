"""The experiment catalogue: the judges the arms use (a package judge with options, under a benchmark name), the
preference term's settings the sweeps try, the settings every arm was measured with, and the proposal recipe of
the cross-model arms. Data only; the plans (plans.py) draw their arms from it."""

from __future__ import annotations

JUDGES = {
    "oracle_reliable": ("oracle", {"noise_std": 0.005, "seed": 0}),
    "oracle_weak": ("oracle", {"flip_probability": 0.7, "seed": 0}),
    "agreement": ("agreement", {}),
    "uncertainty": ("uncertainty", {}),
    "learned_qc": ("learned_qc", {}),
    "virtual_annotator": ("virtual_annotator", {}),
    "anatomy": ("anatomy", {}),
    "agreement_anatomy": ("combination", {"judges": ["agreement", "anatomy"]}),
    # the labeled cases registered onto each case: information by a route outside the network
    "atlas": ("atlas", {}),
    "agreement_atlas": ("combination", {"judges": ["agreement", "atlas"]}),
    # cross-model proposals only: each proposal against the vote of every other model
    "agreement_other_models": ("agreement", {"to": "other_models"}),
    "agreement_other_models_atlas": (
        "combination",
        {"judges": ["agreement", "atlas"], "judge_options": {"agreement": {"to": "other_models"}}},
    ),
    **{f"oracle_noise_{noise}": ("oracle", {"noise_std": noise, "seed": 0}) for noise in (0.01, 0.03, 0.1, 0.3)},
}
# the oracle at decreasing reliability: the reliable one, then the noise sweep (reliability curve)
ORACLE_SWEEP = ("oracle_reliable", *(f"oracle_noise_{noise}" for noise in (0.01, 0.03, 0.1, 0.3)))
# judges that need several models' proposals (cross-seed or cross-fold)
CROSS_MODEL_JUDGES = ("agreement_other_models", "agreement_other_models_atlas")

# The preference term's own settings (`--preference_sweep`), each as RN-DPO from the seed's base, chosen on
# validation only against the defaults (sigmoid loss, beta 0.1, SFT weight 1). The per-voxel log-ratio gap of two
# labels is a logit difference whose gradient never shrinks: at beta 0.1 the push is still 40% of its start at 4
# nats per voxel. A smaller beta pushes less; a larger one fades sooner; IPO stops at its target margin; a larger
# SFT weight holds the rest of the prediction.
PREFERENCE_VARIANTS = {
    "beta0.03": {"beta": 0.03},
    "beta1": {"beta": 1.0},
    "ipo0.5": {"objective": "ipo", "target_margin": 0.5},
    "sft3": {"sft_weight": 3.0},
    # push only some of a pair's disagreeing voxels (nnunet_rndpo/preference_region.py): those the judge's top and
    # bottom halves agree on, or those where most of the case's proposals hold the chosen label
    "consensus": {"preference_region": "ranked_consensus"},
    "majority": {"preference_region": "majority"},
    # only where the judge's own voxel probabilities side with the chosen label (judges that have them: atlas),
    # at the package's SFT weight
    "sft3_voxels": {"sft_weight": 3.0, "preference_region": "judge_voxels"},
}

# The preference settings every arm of these protocols was measured with, where a default has moved since: an arm's
# result stays what its name and BENCHMARKS.md say it is (the SFT weight default became 3 on these measurements; the
# recipe default became `auto`, which would change an arm's judge and proposals: every arm names its own).
MEASURED_WITH = {"sft_weight": 1.0, "recipe": "none"}

# Cross-model proposals: a model's plain pass and mirror members, one plain pass and the mirror members of each
# other model, and nnU-Net's ensemble of every pass (3 models: 1 + 7 + 2 + 14 + 1). Disagreement between models
# trained from different starts (or on different folds) is information that one model's mirror flips lack.
CROSS_MODEL_SOURCES = ("tta", "checkpoint", "checkpoint_tta", "ensemble")
MEMBERS_PER_NETWORK = 8  # the plain pass and 7 mirror flips over 3 axes
# RN-DPO's pairs on cross-model proposals: the judge's best against its worst, or against the base's own
# prediction (only the voxels the pick would change); seed 0's (fold 0's) validation chooses for the others
CROSS_MODEL_MININGS = ("top_bottom", "top_plain")
# tried last, under the preference setting validation chose: pairs drawn from the judge's halves, which spread a
# consensus judge's picks over the members as a noisy judge's are spread
SPREAD_MININGS = ("halves",)


def variant_applies(judge: str, settings: dict) -> bool:
    """Whether a PREFERENCE_VARIANTS setting can run with `judge` (a JUDGES key): the judge_voxels region needs a
    judge with per-voxel probabilities of its own."""
    from nnunet_rndpo.judges import judges_with_voxel_probabilities

    return settings.get("preference_region") != "judge_voxels" or JUDGES[judge][0] in judges_with_voxel_probabilities()


def sft_weight_of(variant: str | None) -> float:
    """The SFT weight an RN-DPO arm under `variant` (a PREFERENCE_VARIANTS key, or None) runs with."""
    return (PREFERENCE_VARIANTS[variant] if variant else {}).get("sft_weight", MEASURED_WITH["sft_weight"])


def cross_model_proposals(extra_checkpoints: list[str]) -> dict:
    """The `proposals` setting of an arm whose proposals come from its base and `extra_checkpoints` (other models)."""
    return {
        "sources": list(CROSS_MODEL_SOURCES),
        "extra_checkpoints": list(extra_checkpoints),
        "num_proposals": MEMBERS_PER_NETWORK * (1 + len(extra_checkpoints)) + 1,
    }
