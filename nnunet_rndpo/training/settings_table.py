"""The settings as the README shows them, generated from their one definition (tests/test_readme.py checks that the
README's table is this one): `nnunet_rndpo settings` prints it, `--example` an RNDPO_SETTINGS file."""

from __future__ import annotations

import json

from nnunet_rndpo.proposals.plan import ProposalSettings
from nnunet_rndpo.training.recipes import SINGLE_MODEL, folds_recipe
from nnunet_rndpo.training.settings import PreferenceSettings
from nnunet_rndpo.typed_settings import markdown_table

README_BEGIN = "<!-- settings table: generated from nnunet_rndpo/training/settings.py by `nnunet_rndpo settings` -->"
README_END = "<!-- end of the generated settings table -->"


def settings_table() -> str:
    """The run's settings, then the proposal settings (the keys of `proposals`), then what each recipe sets."""
    rows = markdown_table(PreferenceSettings)
    rows += markdown_table(ProposalSettings, prefix="proposals.")[2:]
    folds = folds_recipe(other_folds=4)
    recipes = [
        "",
        "What `recipe` sets (your own settings win; `nnunet_rndpo` logs the recipe chosen at start):",
        "",
        "| recipe | chosen by `auto` when | sets |",
        "|---|---|---|",
        f"| `folds` | the base's other folds are trained (nnU-Net's 5-fold cross-validation; K for 4 other folds) "
        f"| {_values(folds.settings)} |",
        f"| `single_model` | no other fold is trained, and imagesUnlabeled exists | {_values(SINGLE_MODEL.settings)} |",
        "| `none` | no imagesUnlabeled (the pool is the base's own training cases) | nothing: the defaults above |",
    ]
    return "\n".join([README_BEGIN, *rows, *recipes, README_END])


def _values(settings: dict) -> str:
    return "; ".join(f"`{key}`: `{json.dumps(value)}`" for key, value in settings.items() if value != {})


def example_settings() -> dict:
    """An RNDPO_SETTINGS file: a short schedule to try first, everything else from the recipe."""
    return {
        "recipe": "auto",
        "num_epochs": 5,
        "iterations_per_epoch": 250,
        "val_iterations_per_epoch": 50,
        "final_checkpoint": "last",
    }
