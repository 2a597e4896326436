"""Settings of a preference fine-tuning run: one typed definition (types, defaults, help, bounds) from which the
validation, the command-line flags and the README's settings table are generated (nnunet_rndpo/typed_settings.py).

Precedence (later wins): the defaults below < the recipe (nnunet_rndpo/training/recipes.py: the measured set-up for
the user's situation, chosen at start) < the trainer class's `settings_overrides` (how the named trainers and
nnU-Net-style short-schedule subclasses differ) < the JSON file named by the environment variable RNDPO_SETTINGS.
nnUNetv2_train passes nothing else to a trainer, so that file is how a user changes a setting. The effective
settings are written into the output folder. Reading this module imports neither torch nor the judges.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

from nnunet_rndpo.mining import MINING_STRATEGIES
from nnunet_rndpo.preference_region import PREFERENCE_REGIONS
from nnunet_rndpo.proposals.plan import ProposalSettings
from nnunet_rndpo.training.recipes import RECIPE_CHOICES, Situation, choose_recipe, recipe_settings
from nnunet_rndpo.typed_settings import SettingsError, apply_overrides, check_fields, setting

__all__ = ["PreferenceSettings", "SettingsError", "apply_overrides", "resolve_settings", "validate"]

SETTINGS_ENV_VARIABLE = "RNDPO_SETTINGS"
SETTINGS_FILE_NAME = "rndpo_settings.json"
DEEP_SUPERVISION_MODES = ("all_scales", "full_resolution")
FINAL_CHECKPOINTS = ("last", "best")
# Settings that existed once, and what to say to a settings file that still names them.
REMOVED_SETTINGS = {
    "reference": (
        "was removed: the frozen reference always runs on each augmented patch (exact: the margin is 0 at the first "
        "step; BENCHMARKS.md, 'Step cost'). Drop the key"
    ),
}


def objectives() -> tuple[str, ...]:
    """The losses of nnunet_rndpo/objectives.py (pure torch: read when a setting is checked, so that reading the
    settings does not import torch), and self_train: Dice+CE on the judge's top proposal (pseudo-labels)."""
    from nnunet_rndpo.objectives import LOSS_TYPES

    return (*LOSS_TYPES, "self_train")


def normalizations() -> tuple[str, ...]:
    from nnunet_rndpo.objectives import NORMALIZATIONS

    return NORMALIZATIONS


def _registered_judges() -> list[str]:
    # read at validation time: judges registered by a user's own code count too
    from nnunet_rndpo.judges import available_judges

    return available_judges()


@dataclass(frozen=True)
class PreferenceSettings:
    # ---- the objective
    objective: str = setting(
        "rn_dpo",
        "the loss: `rn_dpo` (DPO margin averaged over the disagreement region), `dpo` (summed over voxels), `mean` "
        "(averaged over all voxels), `ipo`, or `self_train` (Dice+CE on the judge's top proposal, no reference)",
        choices=objectives,
    )
    normalization: Optional[str] = setting(
        None, "override of the objective's own margin normalisation (null: the objective's)", choices=normalizations
    )
    beta: float = setting(0.1, "DPO temperature", minimum=0.0, minimum_exclusive=True)
    label_smoothing: float = setting(0.0, "conservative DPO epsilon", minimum=0.0, maximum=0.5, maximum_exclusive=True)
    deep_supervision: str = setting(
        "all_scales",
        "preference loss on every nnU-Net output scale (weighted as nnU-Net weights them) or at full resolution only",
        choices=DEEP_SUPERVISION_MODES,
    )
    anchor_weight: float = setting(
        0.0, "+ weight x nnU-Net's Dice+CE on a labeled batch per step (one more forward pass per step)", minimum=0.0
    )
    sft_weight: float = setting(
        3.0,
        "+ weight x nnU-Net's Dice+CE on the chosen mask over the whole patch: the preference term sees only the "
        "disagreement region, and without this anchor the rest of the prediction drifts (BENCHMARKS.md, 'Stability "
        "of the objective'; the value: 'The preference term's settings')",
        minimum=0.0,
    )
    target_margin: Optional[float] = setting(
        None,
        "IPO's target for the normalised margin (nats per disagreement voxel for rn_dpo); a shift for the sigmoid "
        "losses, -log sigmoid(beta (h - target_margin)); null: off",
        minimum=0.0,
    )
    # ---- judge, mining and the pushed voxels
    recipe: str = setting(
        "auto",
        "the measured set-up to start from (judge, proposals, mining; README 'Which judge'): `auto` picks `folds` "
        "when the base's other folds are trained, else `single_model`; `none` keeps the plain defaults. Settings "
        "you give win over the recipe's",
        choices=RECIPE_CHOICES,
    )
    judge: str = setting(
        "agreement",
        "a registered judge or `package.module:Class`; what each one knows: docs/judges.md",
        choices=None,  # checked in `validate` (registered names, or a dotted path checked when it is built)
    )
    judge_options: dict = setting({}, "the judge's constructor options")
    mining: str = setting(
        "top_bottom",
        "how scores become pairs: the judge's best against its worst (`top_bottom`), against each other "
        "(`top_rest`), every pair with a score gap >= mining_margin (`margin`), against the plain prediction "
        "(`top_plain`), a top-half against a bottom-half member (`halves`), or a control (`random`)",
        choices=MINING_STRATEGIES,
    )
    mining_margin: float = setting(0.02, "the score gap of `margin` mining", minimum=0.0)
    preference_region: str = setting(
        "disagreement",
        "which voxels of a pair the preference term pushes: every disagreeing voxel, or only those where the judge's "
        "top and bottom halves agree (`ranked_consensus`), where most proposals hold the chosen label (`majority`), "
        "or where the judge's own voxel probabilities favour the chosen label (`judge_voxels`, atlas only); the rest "
        "of the pair goes to the SFT term",
        choices=PREFERENCE_REGIONS,
    )
    disagreement_sampling: float = setting(
        0.67, "probability that a patch is centred on a disagreeing voxel", minimum=0.0, maximum=1.0
    )
    # ---- proposals and where they are kept
    proposals: dict = setting({}, "proposal settings (the `proposals.*` rows below); unset keys keep their default")
    overwrite_proposals: bool = setting(
        False, "replace a proposal store made with other settings or checkpoints instead of stopping with an error"
    )
    proposal_store: Optional[str] = setting(
        None,
        "folder of the proposal store; null: nnUNet_preprocessed/<D>/rndpo_proposals/<plans>__<config>/fold_<F>/"
        "<base model>, one per base checkpoint",
    )
    # ---- the base model
    base_checkpoint: Optional[str] = setting(
        None,
        "the base checkpoint file; null: nnUNet_results/<D>/<base_trainer>__<plans>__<config>/fold_F/"
        "<base_checkpoint_name>",
    )
    base_trainer: str = setting("nnUNetTrainer", "trainer of the base model (for the default base_checkpoint)")
    base_checkpoint_name: str = setting("checkpoint_final.pth", "checkpoint name of the base (default base_checkpoint)")
    # ---- schedule
    num_epochs: int = setting(50, "fine-tuning epochs", minimum=1)
    iterations_per_epoch: int = setting(250, "training iterations per epoch (nnU-Net's 250)", minimum=1)
    val_iterations_per_epoch: int = setting(50, "validation iterations per epoch (nnU-Net's 50)", minimum=0)
    initial_lr: float = setting(
        1e-3, "learning rate at the first epoch (nnU-Net's poly schedule)", minimum=0.0, minimum_exclusive=True
    )
    warmup_iterations: int = setting(
        0, "linear learning-rate warm-up over the run's first iterations, on top of the poly schedule", minimum=0
    )
    # ---- validation, checkpoints, start phase
    validate_base: bool = setting(
        True,
        "validate the base weights before epoch 0 and save them as checkpoint_best.pth: an epoch must beat the base's "
        "pseudo Dice to replace it (one validation pass)",
    )
    final_checkpoint: str = setting(
        "last",
        "`last`: nnU-Net's behaviour; `best`: checkpoint_final.pth (and the final validation) get checkpoint_best's "
        "weights, so with validate_base the final model is never below the base on the validation patches",
        choices=FINAL_CHECKPOINTS,
    )
    rank_timeout_minutes: float = setting(
        720.0,
        "under DDP: how long a rank waits for the others during the start phase (proposals, judging) before the run "
        "fails with a message",
        minimum=0.0,
        minimum_exclusive=True,
    )
    seed: int = setting(0, "seed of proposals, mining and tie-breaks")

    def proposal_settings(self) -> ProposalSettings:
        return ProposalSettings.from_dict({"seed": self.seed, **self.proposals})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["proposals"] = self.proposal_settings().to_dict()
        return data


def validate(settings: PreferenceSettings) -> PreferenceSettings:
    """Every field against its definition, then the rules between fields; SettingsError names the setting."""
    check_fields(settings)
    if ":" not in settings.judge:  # a dotted path is checked when the judge is built
        judges = _registered_judges()
        if settings.judge not in judges:
            raise SettingsError(f"setting judge={settings.judge!r} is not valid; valid: {', '.join(judges)}")
        if settings.preference_region == "judge_voxels":
            from nnunet_rndpo.judges import judges_with_voxel_probabilities

            # the region reads the judge's own voxel probabilities: say so before the base model is loaded
            having = judges_with_voxel_probabilities()
            if settings.judge not in having:
                raise SettingsError(
                    f"setting judge (for preference_region 'judge_voxels')={settings.judge!r} is not valid; "
                    f"valid: {', '.join(having)}"
                )
    try:
        settings.proposal_settings()
    except SettingsError as error:
        raise SettingsError(f"setting proposals: {error}") from error
    return settings


def read_settings_file(environ: Optional[dict] = None) -> tuple[dict, Optional[str]]:
    """The overrides in the JSON file named by RNDPO_SETTINGS ({} and None when it is unset)."""
    environ = os.environ if environ is None else environ
    path = environ.get(SETTINGS_ENV_VARIABLE)
    if not path:
        return {}, None
    file = Path(path)
    if not file.is_file():
        raise SettingsError(f"{SETTINGS_ENV_VARIABLE}={path}: no such settings file")
    try:
        overrides = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise SettingsError(f"settings file {file} is not valid JSON: {error}") from error
    if not isinstance(overrides, dict):
        raise SettingsError(f"settings file {file} must hold a JSON object of settings")
    return overrides, str(file)


def resolve_settings(
    class_overrides: dict,
    environ: Optional[dict] = None,
    situation: Optional[Callable[[PreferenceSettings], Situation]] = None,
) -> tuple[PreferenceSettings, list[str]]:
    """Defaults < recipe < class overrides < the RNDPO_SETTINGS file; validated. Returns the settings and where they
    came from (one line each, for the log). `situation(settings)` tells what the start phase finds (the base's other
    folds, the pool) from the settings given so far; without it the recipe is not applied."""
    file_overrides, file_name = read_settings_file(environ)
    given = PreferenceSettings()
    given = apply_overrides(given, class_overrides, "the trainer class", REMOVED_SETTINGS)
    if file_name is not None:
        given = apply_overrides(given, file_overrides, file_name, REMOVED_SETTINGS)
    check_fields(given)
    # the situation is read only for a recipe that depends on it (it looks at the base's folds and the pool)
    found = situation(given) if situation is not None and given.recipe != "none" else None
    recipe = choose_recipe(given.recipe, found)
    if recipe is None:
        recipe_overrides, recipe_line = {}, f"recipe {given.recipe!r}: the plain defaults"
    else:
        recipe_overrides, recipe_line = recipe_settings(recipe, given.recipe), recipe.describe(given.recipe)
    explicit = {**class_overrides, **file_overrides}
    settings = apply_overrides(PreferenceSettings(), recipe_overrides, "the recipe")
    if "proposals" in explicit and "proposals" in recipe_overrides:
        # proposal keys the user sets win one by one over the recipe's
        explicit = {**explicit, "proposals": {**recipe_overrides["proposals"], **explicit["proposals"]}}
    settings = apply_overrides(settings, {**class_overrides, **explicit}, "the trainer class and settings file")
    sources = ["defaults", recipe_line, "trainer class"] + ([file_name] if file_name else [])
    return validate(settings), sources


def setting_names() -> list[str]:
    return [f.name for f in fields(PreferenceSettings)]
