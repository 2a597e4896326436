"""Recipes: the measured set-up (judge, proposals, mining) for the user's situation, chosen at start.

What gained without new labels depends on what the user has (BENCHMARKS.md): other models' members as proposals
(nnU-Net's usual 5-fold cross-validation gives four other folds at no extra cost) with the agreement judge, or, with
one model only, the atlas judge (the labeled cases registered onto each case) on that model's mirror members; the
agreement judge over one model's mirror members brought nothing. `recipe: auto` (the default) picks by what is on
disk; every value a recipe sets stays a setting that the user's own settings override. Pure: no torch, no nnU-Net.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

RECIPE_CHOICES = ("auto", "folds", "single_model", "none")
# Each mirror-TTA set of a 3D network is 8 passes (plain + 7 flips); the ensemble member costs no pass.
MIRROR_MEMBERS_3D = 8


@dataclass(frozen=True)
class Situation:
    """What the start phase finds: the base's other trained folds and whether the pool is the base's own training
    cases (no imagesUnlabeled folder)."""

    other_folds: int
    pool_in_sample: bool


@dataclass(frozen=True)
class Recipe:
    name: str
    settings: dict  # setting values, `proposals` as a dict of proposal settings
    measured: str  # what it gained, and where (BENCHMARKS.md section)
    reason: str = ""  # why this situation gets it

    def describe(self, requested: str) -> str:
        chosen = f"recipe {self.name!r}" + (" (auto)" if requested == "auto" else "")
        values = ", ".join(f"{key}={value}" for key, value in sorted(self.settings.items()))
        return f"{chosen}: {self.reason} {values}. Measured: {self.measured}".replace("  ", " ")


def folds_recipe(other_folds: int) -> Recipe:
    """Every fold model's mirror members and nnU-Net's ensemble of them all as proposals, the agreement judge."""
    return Recipe(
        "folds",
        {
            "judge": "agreement",
            "judge_options": {},
            "mining": "top_bottom",
            "proposals": {
                "sources": ["tta", "checkpoint", "checkpoint_tta", "ensemble"],
                "other_folds": True,
                "num_proposals": MIRROR_MEMBERS_3D * (1 + other_folds) + 1,
            },
        },
        "on Hippocampus with 5 labeled cases, the proposals of three models (each fine-tuned with the other two's "
        "members) and the agreement judge: RN-DPO +0.79 test Dice points over its base, self-training +0.82 (mean of "
        "3 seeds; BENCHMARKS.md, 'Three bases on v3')",
    )


SINGLE_MODEL = Recipe(
    "single_model",
    {"judge": "atlas", "judge_options": {}, "mining": "top_bottom"},
    "on Hippocampus with 5 labeled cases and one model's 8 mirror members: RN-DPO with the atlas judge +0.80 ± 0.18 "
    "test Dice points over its base (3 seeds; the agreement judge on the same members brought nothing; "
    "BENCHMARKS.md, 'The atlas judge at SFT weight 3 on three seeds')",
)


def choose_recipe(requested: str, situation: Optional[Situation]) -> Optional[Recipe]:
    """The recipe for `requested` in `situation` (None: the plain defaults). `auto`: `folds` when the base has other
    trained folds, else `single_model`, unless the pool is the base's own training cases (the atlas learns from
    labeled cases and would score memorised ones there: the plain defaults)."""
    if requested not in RECIPE_CHOICES:
        raise ValueError(f"recipe {requested!r}; valid: {', '.join(RECIPE_CHOICES)}")
    if requested == "none" or situation is None:
        return None
    if requested == "folds" or (requested == "auto" and situation.other_folds > 0):
        recipe = folds_recipe(situation.other_folds)
        return _with_reason(recipe, f"the base has {situation.other_folds} other trained fold(s);")
    if requested == "single_model":
        return _with_reason(SINGLE_MODEL, "asked for;")
    if situation.pool_in_sample:
        return None
    return _with_reason(SINGLE_MODEL, "no other trained fold of the base;")


def recipe_settings(recipe: Recipe, requested: str) -> dict:
    """The recipe's setting values, plus the recipe asked for (so that the written settings say `auto`)."""
    return {**recipe.settings, "recipe": requested}


def _with_reason(recipe: Recipe, reason: str) -> Recipe:
    return Recipe(recipe.name, recipe.settings, recipe.measured, reason)
