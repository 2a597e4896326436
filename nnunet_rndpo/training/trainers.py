"""The preference trainer for nnU-Net, and the named trainers that configure it.

One class holds the logic (nnUNetTrainerPreference); nnUNetTrainerRNDPO, nnUNetTrainerDPO and nnUNetTrainerSelfTrain
differ only by `settings_overrides`, the way nnU-Net's own variants differ by an attribute. The trainer extends
nnU-Net through its hooks and nothing else:
- `on_train_start`: the start phase (proposals, judge, pairs: nnunet_rndpo.pipeline) before nnU-Net builds its loaders;
- `get_tr_and_val_datasets`: the pairs as the training dataset, so nnU-Net's own loader and augmentation serve them;
- `_build_loss`: the objective (training/losses.PreferenceObjective), which nnU-Net's own `train_step` calls;
- `train_step`: only runs the frozen reference (training/reference.py) on the step's patch, then nnU-Net's step;
- the epoch hooks: the preference statistics (training/epoch_statistics.py), the progress plot, the summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_rndpo.atomic import atomic_path, save_json
from nnunet_rndpo.nnunet_paths import check_label_layout, locate
from nnunet_rndpo.objectives import STATISTIC_NAMES
from nnunet_rndpo.pairs import PAIRS_FILE_NAME, PairSettings
from nnunet_rndpo.pipeline import prepare_pairs, start_ranks
from nnunet_rndpo.proposals.model import load_model
from nnunet_rndpo.proposals.pool import PoolReader
from nnunet_rndpo.training.epoch_statistics import EpochStatistics
from nnunet_rndpo.training.losses import PreferenceObjective
from nnunet_rndpo.training.pair_data import PairDataset, TrainingItem, annotated_key
from nnunet_rndpo.training.progress_plot import plot_preference_progress
from nnunet_rndpo.training.reference import FrozenReference
from nnunet_rndpo.training.run_settings import base_checkpoint_path, run_settings
from nnunet_rndpo.training.settings import SETTINGS_FILE_NAME, PreferenceSettings
from nnunet_rndpo.training.summary import run_summary

PREFERENCE_PNG = "progress_preference.png"
SUMMARY_FILE_NAME = "rndpo_summary.json"


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    return getattr(module, "_orig_mod", module)


class nnUNetTrainerPreference(nnUNetTrainer):
    """Continues a supervised nnU-Net model under a preference objective on judged proposal pairs."""

    settings_overrides: ClassVar[dict] = {}

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # Wrong names, values or label layouts fail here, before any work, with the valid ones listed.
        check_label_layout(dataset_json, self.plans_manager.dataset_name, self.__class__.__name__)
        self.settings, self.settings_sources = run_settings(self.settings_overrides, self.run_location())
        self.num_epochs = self.settings.num_epochs
        self.num_iterations_per_epoch = self.settings.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.settings.val_iterations_per_epoch
        self.initial_lr = self.settings.initial_lr
        # nnU-Net's loader centres this share of the patches on a listed location: here a disagreeing voxel
        self.labeled_oversample_foreground_percent = self.oversample_foreground_percent  # the anchor's batches
        self.oversample_foreground_percent = self.settings.disagreement_sampling
        self.probabilistic_oversampling = True
        # checkpoint_latest after every epoch (nnU-Net: every 50): with validate_base, checkpoint_best may be the
        # base, and --c must resume from the last epoch, not from there
        self.save_every = 1
        self.uses_reference = self.settings.objective != "self_train"
        keys = (STATISTIC_NAMES + ("preference_loss",) if self.uses_reference else ()) + (
            ("anchor_loss",) if self.settings.anchor_weight > 0 else ()
        )
        self.statistics = EpochStatistics(keys)
        self.reference = None  # FrozenReference, built at start
        self.prepared = None  # nnunet_rndpo.pipeline.PreparedPairs, made at start
        self.labeled_batches = None  # the anchor's loader of labeled batches
        self.base_pseudo_dice: Optional[float] = None  # set by validate_base
        self.phase_seconds: dict[str, float] = {}
        self._resumed = False
        self._iteration = 0  # steps of this run so far (for the warm-up)
        self._epoch_learning_rate = self.initial_lr

    # ------------------------------------------------------------------ settings
    def effective_settings(self) -> PreferenceSettings:
        """The settings as run: nnU-Net-style subclasses may have changed the schedule attributes."""
        return replace(
            self.settings,
            num_epochs=self.num_epochs,
            iterations_per_epoch=self.num_iterations_per_epoch,
            val_iterations_per_epoch=self.num_val_iterations_per_epoch,
            initial_lr=self.initial_lr,
        )

    def run_location(self):
        return locate(
            self.plans_manager.dataset_name, self.configuration_name, self.fold, self.plans_manager.plans_name
        )

    def base_checkpoint_path(self) -> Path:
        return base_checkpoint_path(self.run_location(), self.settings)

    # ------------------------------------------------------------------ start
    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._resumed = True  # --c: keep the loaded policy, reuse the pairs of the first start

    def on_train_start(self):
        started = time.perf_counter()
        for line in self.settings_sources:
            self.print_to_log_file(f"settings: {line}")
        base_path = self.base_checkpoint_path()
        # checked before anything else, so a wrong base fails fast
        base_model = load_model(
            base_path,
            self.device,
            expected_plans=self.plans_manager.plans,
            expected_configuration=self.configuration_name,
            expected_dataset_json=self.dataset_json,
        )
        self.prepared = self._prepare_pairs(base_model)
        self.phase_seconds.update(self.prepared.seconds, start_phase_s=time.perf_counter() - started)
        super().on_train_start()  # nnU-Net builds its loaders: the pairs through get_tr_and_val_datasets
        if not self._resumed:
            _unwrap(self.network).load_state_dict(base_model.network.state_dict())
            self.print_to_log_file(f"policy initialised from the base checkpoint {base_path}")
        else:
            self.statistics.load(Path(self.output_folder), self.current_epoch)
        if self.uses_reference:
            self.reference = FrozenReference(
                _unwrap(self.network),
                base_model.network.state_dict(),
                self.loss.scale_weights,
                self.label_manager.ignore_label,
                self.device,
                compile_network=self._do_i_compile(),
            )
        del base_model
        if self.local_rank == 0:
            save_json(
                {
                    "settings": self.effective_settings().to_dict(),
                    "sources": self.settings_sources,
                    "trainer": self.__class__.__name__,
                },
                Path(self.output_folder) / SETTINGS_FILE_NAME,
            )
        if self.settings.validate_base and not self._resumed and self.num_val_iterations_per_epoch > 0:
            self._validate_base()

    def _prepare_pairs(self, base_model):
        """Proposals, judge and pairs (nnunet_rndpo.pipeline.prepare_pairs); here only the ranks and how they wait,
        and the resume rule (--c keeps the pairs of its first start)."""
        overwrite = self.settings.overwrite_proposals and not self._resumed
        return prepare_pairs(
            self.run_location(),
            base_model,
            PairSettings.from_run_settings(self.settings, overwrite_proposals=overwrite),
            device=self.device,
            store_folder=Path(self.settings.proposal_store) if self.settings.proposal_store else None,
            pairs_file=Path(self.output_folder) / PAIRS_FILE_NAME,
            reuse_pairs_file=self._resumed,
            ranks=start_ranks(self.settings.rank_timeout_minutes),
            log=self.print_to_log_file,
            progress=self.local_rank == 0,
        )

    def get_tr_and_val_datasets(self):
        """nnU-Net's hook for the datasets its loaders read: the mined pairs for training (PairDataset), nnU-Net's
        own validation cases for validation; the labeled training dataset is kept for the anchor."""
        labeled, validation = super().get_tr_and_val_datasets()
        self._labeled_dataset = labeled
        prepared = self.prepared
        pairs = PairDataset(
            [TrainingItem.from_record(item) for item in prepared.items],
            prepared.store,
            PoolReader(prepared.pool, self.plans_manager, self.configuration_manager, self.dataset_json),
            single_mask=not self.uses_reference,  # self-training: one channel, exactly nnU-Net's layout
            annotated_key=annotated_key(self.label_manager),
        )
        pairs.prepare()  # unpack every case once here, not in each augmentation worker on first use
        return pairs, validation

    def get_dataloaders(self):
        train, validation = super().get_dataloaders()
        if self.settings.anchor_weight > 0:
            self.labeled_batches = self._labeled_loader()
        return train, validation

    def _labeled_loader(self):
        """Batches of the fold's labeled training cases with nnU-Net's own loader and augmentation, for the anchor
        (augmented in this process: the anchor is an option, its loader needs no worker processes to shut down)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size,
            rotation,
            self._get_deep_supervision_scales(),
            mirror_axes,
            dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=None,
            ignore_label=self.label_manager.ignore_label,
        )
        loader = nnUNetDataLoader(
            self._labeled_dataset,
            self.batch_size,
            initial_patch_size,
            self.configuration_manager.patch_size,
            self.label_manager,
            oversample_foreground_percent=self.labeled_oversample_foreground_percent,
            sampling_probabilities=None,
            pad_sides=None,
            transforms=transforms,
        )
        return SingleThreadedAugmenter(loader, None)

    def _build_loss(self):
        """nnU-Net's loss hook: its own Dice+CE (deep supervision included) wrapped into the preference objective."""
        supervised = super()._build_loss()
        weights = list(getattr(supervised, "weight_factors", None) or [1.0])
        if self.settings.deep_supervision == "full_resolution":
            weights = [1.0] + [0.0] * (len(weights) - 1)
        return PreferenceObjective(
            supervised, self.settings, weights, self.label_manager.ignore_label, self.is_ddp, self.statistics
        )

    def _validate_base(self) -> None:
        """nnU-Net's validation loop once on the base weights, before the first fine-tuning epoch: its pseudo
        Dice is the best so far and checkpoint_best.pth holds the base, so fine-tuning must beat the base to
        replace it. Logged to a scratch logger of nnU-Net's own kind (epoch 0 is the first fine-tuning epoch)."""
        self.print_to_log_file(f"validating the base weights ({self.num_val_iterations_per_epoch} iterations)")
        run_logger, self.logger = self.logger, LocalLogger()
        try:
            with torch.no_grad():
                self.on_validation_epoch_start()
                outputs = [
                    self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)
                ]
                self.on_validation_epoch_end(outputs)
            base_dice = float(self.logger.get_value("mean_fg_dice", step=-1))
        finally:
            self.logger = run_logger
        self.base_pseudo_dice = base_dice
        # nnU-Net's record of the best EMA pseudo Dice so far, which an epoch must beat to become checkpoint_best
        self._best_ema = base_dice
        self.print_to_log_file(f"base pseudo Dice: {np.round(base_dice, 4)} (the best until fine-tuning beats it)")
        # nnU-Net stores current_epoch + 1 (the epoch to resume at); the base comes before epoch 0
        self.current_epoch -= 1
        self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        self.current_epoch += 1

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written under a temporary name and renamed: a run stopped while writing (docker
        stop, a killed job) leaves the previous checkpoint_latest.pth whole, and --c can load it."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)  # nnU-Net writes nothing there
        with atomic_path(filename) as temporary:
            super().save_checkpoint(str(temporary))

    # ------------------------------------------------------------------ steps
    def _warm_up_learning_rate(self) -> None:
        """Linear warm-up over the first `warmup_iterations` steps of the run, on top of nnU-Net's per-epoch
        poly schedule (which on_train_epoch_start sets)."""
        warmup = self.settings.warmup_iterations
        if warmup <= 0 or self._iteration >= warmup:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_learning_rate(self._epoch_learning_rate, self._iteration, warmup)

    def train_step(self, batch: dict) -> dict:
        """The frozen reference on the step's patch, then nnU-Net's own step (whose loss is PreferenceObjective)."""
        self._warm_up_learning_rate()
        self._iteration += 1
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (
            [t.to(self.device, non_blocking=True) for t in target]
            if isinstance(target, list)
            else target.to(self.device, non_blocking=True)
        )
        reference_terms = self.reference.terms(data, target) if self.reference is not None else None
        anchor = self._anchor_loss if self.labeled_batches is not None else None
        with self.loss.step(reference_terms, anchor):
            return super().train_step({**batch, "data": data, "target": target})

    def _anchor_loss(self) -> torch.Tensor:
        """nnU-Net's Dice+CE of the policy on a labeled batch (called inside nnU-Net's autocast region)."""
        labeled = next(self.labeled_batches)
        target = labeled["target"]
        target = (
            [t.to(self.device, non_blocking=True) for t in target]
            if isinstance(target, list)
            else target.to(self.device, non_blocking=True)
        )
        return self.loss.supervised(self.network(labeled["data"].to(self.device, non_blocking=True)), target)

    # ------------------------------------------------------------------ epochs
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._epoch_learning_rate = self.optimizer.param_groups[0]["lr"]
        self._iteration = self.current_epoch * self.num_iterations_per_epoch
        self.statistics.start_epoch()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        means = self.statistics.epoch_means(dist.all_reduce if self.is_ddp else None)
        self.statistics.record(self.current_epoch, means)

    def on_epoch_end(self):
        if self.local_rank == 0:
            if self.statistics.keys:
                last = self.statistics.last()
                self.print_to_log_file("preference: " + ", ".join(f"{key}={value:.4g}" for key, value in last.items()))
            # before nnU-Net writes the epoch's checkpoint_latest: a run killed between the two resumes with both
            # (the file's later epochs are dropped on resume, a missing one would stay missing)
            self.statistics.save(Path(self.output_folder))
        super().on_epoch_end()
        if self.local_rank == 0:
            plot_preference_progress(
                self.statistics.history,
                self.logger.get_value("mean_fg_dice", step=None),
                Path(self.output_folder) / PREFERENCE_PNG,
            )

    def on_train_end(self):
        chosen = self._load_best_weights() if self.settings.final_checkpoint == "best" else "last"
        super().on_train_end()
        if self.local_rank == 0:
            self._write_summary(chosen)

    def _load_best_weights(self) -> str:
        """final_checkpoint "best": checkpoint_final.pth (and nnU-Net's final validation) get the weights of
        checkpoint_best.pth, the base's when validate_base is on and no epoch beat it."""
        best = Path(self.output_folder) / "checkpoint_best.pth"
        if not best.is_file():
            self.print_to_log_file(f"final_checkpoint 'best': no {best.name} yet; the last weights stay final")
            return "last (no checkpoint_best.pth)"
        if self.is_ddp:
            dist.barrier()  # rank 0 wrote it
        checkpoint = torch.load(best, map_location=self.device, weights_only=False)
        _unwrap(self.network).load_state_dict(checkpoint["network_weights"])
        epoch = checkpoint["current_epoch"] - 1  # nnU-Net stores the epoch to resume at
        origin = "the base" if epoch < 0 else f"epoch {epoch}"
        self.print_to_log_file(f"final_checkpoint 'best': the final weights are those of {best.name} ({origin})")
        return f"best ({origin})"

    def _write_summary(self, chosen_checkpoint: str) -> None:
        """The run in a few lines of the log and in rndpo_summary.json: recipe, pairs, pseudo Dice, checkpoint and
        times."""
        summary = run_summary(
            settings_sources=self.settings_sources,
            pairs_summary=self.prepared.record["summary"] if self.prepared and self.prepared.record else {},
            statistics=self.statistics.history,
            pseudo_dice=[float(v) for v in self.logger.get_value("mean_fg_dice", step=None)],
            base_pseudo_dice=self.base_pseudo_dice,
            chosen_checkpoint=chosen_checkpoint,
            phase_seconds=self.phase_seconds,
            epoch_seconds=[
                float(end - start)
                for start, end in zip(
                    self.logger.get_value("epoch_start_timestamps", step=None),
                    self.logger.get_value("epoch_end_timestamps", step=None),
                )
            ],
        )
        save_json(summary, Path(self.output_folder) / SUMMARY_FILE_NAME)
        for line in summary["lines"]:
            self.print_to_log_file(line)


def warmup_learning_rate(learning_rate: float, iteration: int, warmup_iterations: int) -> float:
    """Linear warm-up: learning_rate * (iteration + 1) / warmup_iterations for the first warmup_iterations
    iterations (0-based), then learning_rate."""
    if iteration >= warmup_iterations:
        return learning_rate
    return learning_rate * (iteration + 1) / warmup_iterations


class nnUNetTrainerRNDPO(nnUNetTrainerPreference):
    """Region-Normalized DPO: the margin averaged over the voxels where chosen and rejected disagree."""

    settings_overrides: ClassVar[dict] = {"objective": "rn_dpo", "beta": 0.1}


class nnUNetTrainerDPO(nnUNetTrainerPreference):
    """Standard DPO: the margin summed over voxels (large disagreements dominate)."""

    settings_overrides: ClassVar[dict] = {"objective": "dpo", "beta": 0.1}


class nnUNetTrainerSelfTrain(nnUNetTrainerPreference):
    """Pseudo-label baseline: nnU-Net's Dice+CE on the judge's top proposal, no reference model."""

    settings_overrides: ClassVar[dict] = {"objective": "self_train"}


# Short schedules in nnU-Net's style (as its nnUNetTrainer_5epochs): a subclass whose overrides add a schedule.
_FIVE_EPOCHS = {"num_epochs": 5, "iterations_per_epoch": 250, "val_iterations_per_epoch": 50}


class nnUNetTrainerRNDPO_5epochs(nnUNetTrainerRNDPO):
    """nnUNetTrainerRNDPO for 5 epochs of 250 iterations."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerRNDPO.settings_overrides, **_FIVE_EPOCHS}


class nnUNetTrainerDPO_5epochs(nnUNetTrainerDPO):
    """nnUNetTrainerDPO for 5 epochs of 250 iterations."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerDPO.settings_overrides, **_FIVE_EPOCHS}


class nnUNetTrainerSelfTrain_5epochs(nnUNetTrainerSelfTrain):
    """nnUNetTrainerSelfTrain for 5 epochs of 250 iterations."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerSelfTrain.settings_overrides, **_FIVE_EPOCHS}
