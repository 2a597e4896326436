"""The settings of a fine-tuning run as its trainer resolves them, for the trainer and for `nnunet_rndpo prepare`
(which makes the run's proposals and pairs beforehand, so they must agree to the value): the base checkpoint the
settings name, and the situation `recipe: auto` reads (the base's other trained folds, the pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from nnunet_rndpo.nnunet_paths import RunLocation, sibling_fold_checkpoints
from nnunet_rndpo.pairs import PairSettings
from nnunet_rndpo.pipeline import PreparedPairs, prepare_pairs
from nnunet_rndpo.proposals.model import load_model_like
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


def prepare_start_phase(
    trainer_overrides: dict,
    location: RunLocation,
    device: str,
    environ: Optional[dict] = None,
    log: Callable[[str], None] = print,
    **prepare_options,
) -> PreparedPairs:
    """A run's start phase before its training (`nnunet_rndpo prepare`, a benchmark part with nothing else to do):
    the settings resolved as the trainer resolves them, its base loaded, then the proposals, the judge's scores and
    the pairs in the run's store (pipeline.prepare_pairs, with `prepare_options`: ranks, progress); the trainer then
    reads them instead of making them."""
    settings, sources = run_settings(trainer_overrides, location, environ)
    for line in sources:
        log(f"settings: {line}")
    return prepare_pairs(
        location,
        load_model_like(base_checkpoint_path(location, settings), location, device),
        PairSettings.from_run_settings(settings),
        device=device,
        store_folder=Path(settings.proposal_store) if settings.proposal_store else None,
        log=log,
        **prepare_options,
    )
