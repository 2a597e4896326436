"""The preference trainer for nnU-Net, and the named trainers that configure it.

One class holds all the logic (nnUNetTrainerPreference); nnUNetTrainerRNDPO, nnUNetTrainerDPO and
nnUNetTrainerSelfTrain differ only by `settings_overrides`, the way nnU-Net's own variants differ by an
attribute. The reference model is handled in one place (`_build_reference`), the objective by name in
nnunet_rndpo.objectives, proposals/judging/mining in nnunet_rndpo.pipeline.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import ClassVar, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_rndpo.atomic import save_json
from nnunet_rndpo.objectives import STATISTIC_NAMES
from nnunet_rndpo.training.losses import preference_loss_over_scales
from nnunet_rndpo.training.settings import SETTINGS_FILE_NAME, PreferenceSettings, resolve_settings

PREFERENCE_PNG = "progress_preference.png"
LOGGED_KEYS = STATISTIC_NAMES + ("preference_loss",)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    return getattr(module, "_orig_mod", module)


class nnUNetTrainerPreference(nnUNetTrainer):
    """Continues a supervised nnU-Net model under a preference objective on judged proposal pairs."""

    settings_overrides: ClassVar[dict] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # Wrong names or values fail here, before any work, with the valid ones listed.
        self.settings, self.settings_sources = resolve_settings(self.settings_overrides)
        if self.label_manager.has_regions:
            raise ValueError(
                f"{self.__class__.__name__}: region-based (sigmoid) datasets are not supported yet; "
                "proposals and pairs are label maps"
            )
        self.num_epochs = self.settings.num_epochs
        self.num_iterations_per_epoch = self.settings.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.settings.val_iterations_per_epoch
        self.initial_lr = self.settings.initial_lr
        self.reference_network: Optional[torch.nn.Module] = None
        self.dataloader_labeled = None
        self.training_items: list = []
        self._resumed = False

    # ------------------------------------------------------------------ settings
    @property
    def uses_reference(self) -> bool:
        return self.settings.objective != "self_train"

    @property
    def precomputed_reference(self) -> bool:
        return self.uses_reference and self.settings.reference == "precomputed"

    def effective_settings(self) -> PreferenceSettings:
        """The settings as run: nnU-Net-style subclasses may have changed the schedule attributes."""
        from dataclasses import replace

        return replace(
            self.settings,
            num_epochs=self.num_epochs,
            iterations_per_epoch=self.num_iterations_per_epoch,
            val_iterations_per_epoch=self.num_val_iterations_per_epoch,
            initial_lr=self.initial_lr,
        )

    def run_location(self):
        from nnunet_rndpo.nnunet_paths import locate

        return locate(self.plans_manager.dataset_name, self.configuration_name, self.fold, self.plans_manager.plans_name)

    def base_checkpoint_path(self) -> Path:
        if self.settings.base_checkpoint:
            return Path(self.settings.base_checkpoint)
        return self.run_location().checkpoint(self.settings.base_trainer, self.settings.base_checkpoint_name)

    # ------------------------------------------------------------------ start
    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._resumed = True  # --c: keep the loaded policy, reuse the pairs of the first start

    def on_train_start(self):
        base_path = self.base_checkpoint_path()
        from nnunet_rndpo.proposals.model import load_model

        # Checked before nnU-Net's start builds data loaders, so a wrong base fails fast.
        base_model = load_model(
            base_path,
            self.device,
            expected_plans=self.plans_manager.plans,
            expected_configuration=self.configuration_name,
            expected_dataset_json=self.dataset_json,
        )
        super().on_train_start()
        self._register_log_keys()
        if not self._resumed:
            _unwrap(self.network).load_state_dict(base_model.network.state_dict())
            self.print_to_log_file(f"policy initialised from the base checkpoint {base_path}")
        online = self.uses_reference and not self.precomputed_reference
        self.reference_network = self._build_reference(base_model) if online else None
        self.training_items = self._prepare_training_items(base_model)
        del base_model
        self.dataloader_labeled = self.dataloader_train if self.settings.anchor_weight > 0 else None
        if self.dataloader_labeled is None:
            self._shutdown(self.dataloader_train)
        self.dataloader_train = self._build_pair_loader(self.training_items)
        if self.local_rank == 0:
            save_json(
                {"settings": self.effective_settings().to_dict(), "sources": self.settings_sources, "trainer": self.__class__.__name__},
                Path(self.output_folder) / SETTINGS_FILE_NAME,
            )

    def _build_reference(self, base_model) -> torch.nn.Module:
        """The frozen reference: the base weights, eval mode, no gradients, never wrapped in DDP."""
        reference = copy.deepcopy(_unwrap(self.network))
        reference.load_state_dict(base_model.network.state_dict())
        reference.decoder.deep_supervision = self.enable_deep_supervision
        reference.eval()
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        return reference.to(self.device)

    def _prepare_training_items(self, base_model) -> list:
        """Proposals, judge and pairs by nnunet_rndpo.pipeline.prepare_pairs; here only the DDP rank and barrier,
        and the resume rule (--c keeps the pairs of the first start)."""
        from nnunet_rndpo.pipeline import PAIRS_FILE_NAME, prepare_pairs
        from nnunet_rndpo.training.pair_data import TrainingItem

        prepared = prepare_pairs(
            self.run_location(), base_model, self.settings.pair_settings(overwrite_proposals=self.settings.overwrite_proposals and not self._resumed),
            device=self.device, pairs_file=Path(self.output_folder) / PAIRS_FILE_NAME, reuse_pairs_file=self._resumed,
            rank=self.local_rank, world_size=dist.get_world_size() if self.is_ddp else 1, barrier=self._barrier,
            log=self.print_to_log_file, progress=self.local_rank == 0,
        )
        self._pool, self._store = prepared.pool, prepared.store
        return [TrainingItem(item["case_id"], item["chosen"], item["rejected"]) for item in prepared.items]

    def _barrier(self) -> None:
        if self.is_ddp:
            dist.barrier()

    def _build_pair_loader(self, items):
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        from nnunet_rndpo.proposals.pool import PoolReader
        from nnunet_rndpo.training.pair_data import PairDataset, ReferenceAsRegressionTarget, annotated_key, pair_loader

        reader = PoolReader(self._pool, self.plans_manager, self.configuration_manager, self.dataset_json)
        dataset = PairDataset(items, self._store, reader, reference_channels=self.precomputed_reference, annotated_key=annotated_key(self.label_manager))
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=self.label_manager.ignore_label,
        )
        if self.precomputed_reference:
            transforms = ReferenceAsRegressionTarget(transforms)
        loader = pair_loader(dataset, self.batch_size, initial_patch_size, patch_size, self.label_manager, self.settings.disagreement_sampling, transforms)
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(
            data_loader=loader, transform=None, num_processes=processes, num_cached=max(6, processes // 2),
            seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002,
        )

    @staticmethod
    def _shutdown(loader) -> None:
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            finish()

    # ------------------------------------------------------------------ steps
    def _scale_weights(self, number_of_outputs: int) -> list[float]:
        if number_of_outputs == 1:
            return [1.0]
        if self.settings.deep_supervision == "full_resolution":
            return [1.0] + [0.0] * (number_of_outputs - 1)
        return list(getattr(self.loss, "weight_factors", [1.0] + [0.0] * (number_of_outputs - 1)))

    def compute_preference_loss(self, output, reference_output, target, reference_ll=None) -> tuple[torch.Tensor, dict]:
        """The configured objective over every output scale; statistics from the full resolution.

        reference_ll: (B, 2, *spatial) precomputed reference log-likelihoods of chosen and rejected, used
        instead of `reference_output` (resampled to each output scale as nnU-Net resamples the masks)."""
        chosen = [t[:, :1] for t in target] if isinstance(target, (list, tuple)) else target[:, :1]
        if self.settings.objective == "self_train":
            return self.loss(output, chosen), {}
        total, statistics = preference_loss_over_scales(
            output, reference_output, target, self._scale_weights(len(output) if isinstance(output, (list, tuple)) else 1),
            loss_type=self.settings.objective, beta=self.settings.beta, label_smoothing=self.settings.label_smoothing,
            normalization=self.settings.normalization, ignore_label=self.label_manager.ignore_label,
            reference_voxel_ll=None if reference_ll is None else _per_scale(reference_ll, target),
        )
        if self.settings.sft_weight > 0:
            total = total + self.settings.sft_weight * self.loss(output, chosen)
        return total, statistics

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        reference_ll = None
        if self.precomputed_reference:
            data, reference_ll = data[:, :-2], data[:, -2:]
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            reference_output = None
            if self.reference_network is not None:
                with torch.no_grad():
                    reference_output = self.reference_network(data)
            loss, statistics = self.compute_preference_loss(output, reference_output, target, reference_ll)
            if self.dataloader_labeled is not None:
                labeled = next(self.dataloader_labeled)
                labeled_target = labeled["target"]
                labeled_target = [t.to(self.device, non_blocking=True) for t in labeled_target] if isinstance(labeled_target, list) else labeled_target.to(self.device)
                anchor = self.loss(self.network(labeled["data"].to(self.device, non_blocking=True)), labeled_target)
                statistics["anchor_loss"] = float(anchor.detach())
                loss = loss + self.settings.anchor_weight * anchor
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy(), **{f"stat::{k}": v for k, v in statistics.items()}}

    # ------------------------------------------------------------------ logging
    def _logged_keys(self) -> tuple[str, ...]:
        """The statistics this run produces every epoch (only those are registered with nnU-Net's logger)."""
        keys = LOGGED_KEYS if self.uses_reference else ()
        return keys + (("anchor_loss",) if self.settings.anchor_weight > 0 else ())

    def _register_log_keys(self) -> None:
        logging = self.logger.local_logger.my_fantastic_logging
        for key in self._logged_keys():
            logging.setdefault(key, [])

    def on_train_epoch_end(self, train_outputs: List[dict]):
        # nnU-Net's progress.png takes the shortest logged list as the epoch count: every key we add is
        # logged every epoch, or never
        super().on_train_epoch_end([{"loss": o["loss"]} for o in train_outputs])
        keys = sorted({k for o in train_outputs for k in o if k.startswith("stat::")})
        means = {k[6:]: float(np.mean([o[k] for o in train_outputs if k in o])) for k in keys}
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = {k: float(np.mean([g[k] for g in gathered if k in g])) for k in means}
        for key in self._logged_keys():
            self.logger.log(key, means.get(key, float("nan")), self.current_epoch)

    def on_epoch_end(self):
        if self.local_rank == 0 and any(self.logger.local_logger.my_fantastic_logging.get(k) for k in LOGGED_KEYS):
            self.print_to_log_file(
                "preference: " + ", ".join(
                    f"{k}={self.logger.get_value(k, step=-1):.4g}" for k in LOGGED_KEYS if self.logger.local_logger.my_fantastic_logging.get(k)
                )
            )
        super().on_epoch_end()
        if self.local_rank == 0:
            from nnunet_rndpo.training.progress_plot import plot_preference_progress

            plot_preference_progress(self.logger.local_logger.my_fantastic_logging, Path(self.output_folder) / PREFERENCE_PNG)

    def on_train_end(self):
        super().on_train_end()
        if self.dataloader_labeled is not None:
            self._shutdown(self.dataloader_labeled)


def _per_scale(reference_ll: torch.Tensor, target) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Precomputed reference log-likelihoods at each target scale (nearest-exact, as nnU-Net downsamples masks)."""
    targets = target if isinstance(target, (list, tuple)) else [target]
    scaled = []
    for masks in targets:
        maps = reference_ll if masks.shape[2:] == reference_ll.shape[2:] else torch.nn.functional.interpolate(reference_ll.float(), size=masks.shape[2:], mode="nearest-exact")
        scaled.append((maps[:, 0], maps[:, 1]))
    return scaled


class nnUNetTrainerRNDPO(nnUNetTrainerPreference):
    """Region-Normalized DPO: the margin averaged over the voxels where chosen and rejected disagree."""

    settings_overrides: ClassVar[dict] = {"objective": "rn_dpo", "beta": 0.1}


class nnUNetTrainerRNDPO_PrecomputedRef(nnUNetTrainerPreference):
    """RN-DPO without a reference pass per step: the base model's stored log-probabilities ride with the patch."""

    settings_overrides: ClassVar[dict] = {"objective": "rn_dpo", "beta": 0.1, "reference": "precomputed"}


class nnUNetTrainerDPO(nnUNetTrainerPreference):
    """Standard DPO: the margin summed over voxels (large disagreements dominate)."""

    settings_overrides: ClassVar[dict] = {"objective": "dpo", "beta": 0.1}


class nnUNetTrainerSelfTrain(nnUNetTrainerPreference):
    """Pseudo-label baseline: nnU-Net's Dice+CE on the judge's top proposal, no reference model."""

    settings_overrides: ClassVar[dict] = {"objective": "self_train"}


# Short schedules in nnU-Net's style, for tests, demos and benchmarks.
def _short(base: type, name: str, epochs: int, iterations: int, val_iterations: int) -> type:
    overrides = {**base.settings_overrides, "num_epochs": epochs, "iterations_per_epoch": iterations, "val_iterations_per_epoch": val_iterations}
    return type(name, (base,), {"settings_overrides": overrides, "__doc__": f"{base.__name__} for {epochs} epochs of {iterations} iterations.", "__module__": __name__})


nnUNetTrainerRNDPO_5epochs = _short(nnUNetTrainerRNDPO, "nnUNetTrainerRNDPO_5epochs", 5, 250, 50)
nnUNetTrainerDPO_5epochs = _short(nnUNetTrainerDPO, "nnUNetTrainerDPO_5epochs", 5, 250, 50)
nnUNetTrainerSelfTrain_5epochs = _short(nnUNetTrainerSelfTrain, "nnUNetTrainerSelfTrain_5epochs", 5, 250, 50)
nnUNetTrainerRNDPO_tiny = _short(nnUNetTrainerRNDPO, "nnUNetTrainerRNDPO_tiny", 2, 4, 2)
nnUNetTrainerRNDPO_PrecomputedRef_tiny = _short(nnUNetTrainerRNDPO_PrecomputedRef, "nnUNetTrainerRNDPO_PrecomputedRef_tiny", 2, 4, 2)
nnUNetTrainerDPO_tiny = _short(nnUNetTrainerDPO, "nnUNetTrainerDPO_tiny", 2, 4, 2)
nnUNetTrainerSelfTrain_tiny = _short(nnUNetTrainerSelfTrain, "nnUNetTrainerSelfTrain_tiny", 2, 4, 2)
