"""The settings of a fine-tuning run as its trainer resolves them, for the trainer and for `nnunet_rndpo prepare`
(which makes the run's proposals and pairs beforehand, so they must agree to the value): the base checkpoint the
settings name, and the situation `recipe: auto` reads (the base's other trained folds, the pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nnunet_rndpo.nnunet_paths import RunLocation, sibling_fold_checkpoints
from nnunet_rndpo.proposals.pool import unlabeled_pool
from nnunet_rndpo.training.recipes import Situation
from nnunet_rndpo.training.settings import PreferenceSettings, resolve_settings


def base_checkpoint_path(location: RunLocation, settings: PreferenceSettings) -> Path:
    """`base_checkpoint`, else nnUNet_results/<D>/<base_trainer>__<plans>__<config>/fold_F/<base_checkpoint_name>."""
    if settings.base_checkpoint:
        return Path(settings.base_checkpoint)
    return location.checkpoint(settings.base_trainer, settings.base_checkpoint_name)


def situation(location: RunLocation, settings: PreferenceSettings) -> Situation:
    return Situation(
        other_folds=len(sibling_fold_checkpoints(base_checkpoint_path(location, settings))),
        pool_in_sample=unlabeled_pool(location).in_sample,
    )


def run_settings(
    trainer_overrides: dict, location: RunLocation, environ: Optional[dict] = None
) -> tuple[PreferenceSettings, list[str]]:
    """Defaults < recipe < the trainer class's overrides < RNDPO_SETTINGS, for the run at `location`."""
    return resolve_settings(trainer_overrides, environ, situation=lambda given: situation(location, given))
