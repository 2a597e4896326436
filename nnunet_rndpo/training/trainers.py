"""The preference trainer for nnU-Net, and the named trainers that configure it.

One class holds all the logic (nnUNetTrainerPreference); nnUNetTrainerRNDPO, nnUNetTrainerDPO and
nnUNetTrainerSelfTrain differ only by `settings_overrides`, the way nnU-Net's own variants differ by an
attribute. The reference model is built in `_build_reference` and run in `_reference_terms` only, the objective
by name in nnunet_rndpo.objectives, proposals/judging/mining in nnunet_rndpo.pipeline. A step reads nothing back
from the device: the loss and the statistics stay device tensors until on_train_epoch_end.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import ClassVar, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch.profiler import record_function

from nnunet_rndpo.atomic import save_json
from nnunet_rndpo.objectives import STATISTIC_NAMES, reference_log_likelihoods
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

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
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
        # checkpoint_latest after every epoch (nnU-Net: every 50): with validate_base, checkpoint_best may be the
        # base, and --c must resume from the last epoch, not from there
        self.save_every = 1
        self.reference_network: Optional[torch.nn.Module] = None
        self.dataloader_labeled = None
        self.training_items: list = []
        self._resumed = False
        self.base_pseudo_dice: Optional[float] = None  # set by validate_base
        self._statistic_sums: Optional[torch.Tensor] = None  # this epoch's statistics, summed on the device
        self._statistic_steps = 0
        self._iteration = 0  # steps of this run so far (for the warm-up)
        self._epoch_learning_rate = self.initial_lr

    # ------------------------------------------------------------------ settings
    @property
    def uses_reference(self) -> bool:
        return self.settings.objective != "self_train"

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

        return locate(
            self.plans_manager.dataset_name, self.configuration_name, self.fold, self.plans_manager.plans_name
        )

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
        self.reference_network = self._build_reference(base_model) if self.uses_reference else None
        self.training_items = self._prepare_training_items(base_model)
        del base_model
        self.dataloader_labeled = self.dataloader_train if self.settings.anchor_weight > 0 else None
        if self.dataloader_labeled is None:
            self._shutdown(self.dataloader_train)
        self.dataloader_train = self._build_pair_loader(self.training_items)
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

    def _build_reference(self, base_model) -> torch.nn.Module:
        """The frozen reference: the base weights, eval mode, no gradients, never wrapped in DDP; compiled when
        nnU-Net compiles the policy. Its lower-resolution heads run only where the preference loss uses them."""
        reference = copy.deepcopy(_unwrap(self.network))
        reference.load_state_dict(base_model.network.state_dict())
        reference.decoder.deep_supervision = (
            self.enable_deep_supervision and self.settings.deep_supervision == "all_scales"
        )
        reference.eval()
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        reference = reference.to(self.device)
        if self._do_i_compile():
            reference = torch.compile(reference)
        return reference

    def _reference_terms(self, data: torch.Tensor, target) -> list:
        """The reference's per-voxel term of both masks at each scale the loss uses (None elsewhere), from one
        forward pass under inference_mode (and autocast on a GPU, as the policy): the one place the reference runs."""
        targets = target if isinstance(target, (list, tuple)) else [target]
        weights = self._scale_weights(len(targets))
        with torch.inference_mode(), record_function("rndpo/reference"):
            output = self.reference_network(data)
            outputs = output if isinstance(output, (list, tuple)) else [output]
            return [
                reference_log_likelihoods(
                    outputs[scale],
                    masks[:, :1],
                    masks[:, 1:2],
                    ignore_label=self.label_manager.ignore_label,
                    normalized=scale == 0,
                )
                if weight != 0
                else None
                for scale, (weight, masks) in enumerate(zip(weights, targets))
            ]

    def _validate_base(self) -> None:
        """nnU-Net's validation loop once on the base weights, before the first fine-tuning epoch: its pseudo
        Dice is the best so far and checkpoint_best.pth holds the base, so fine-tuning must beat the base to
        replace it. The values are not kept in the per-epoch log (epoch 0 is the first fine-tuning epoch)."""
        self.print_to_log_file(f"validating the base weights ({self.num_val_iterations_per_epoch} iterations)")
        with torch.no_grad():
            self.on_validation_epoch_start()
            outputs = [
                self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)
            ]
            self.on_validation_epoch_end(outputs)
        logging = self.logger.local_logger.my_fantastic_logging
        base_dice = float(logging["mean_fg_dice"][-1])
        for key in ("mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "val_losses"):
            logging[key].pop()
        self.base_pseudo_dice = base_dice
        self._best_ema = base_dice
        self.print_to_log_file(f"base pseudo Dice: {np.round(base_dice, 4)} (the best until fine-tuning beats it)")
        # nnU-Net stores current_epoch + 1 (the epoch to resume at); the base comes before epoch 0
        self.current_epoch -= 1
        self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        self.current_epoch += 1

    def _prepare_training_items(self, base_model) -> list:
        """Proposals, judge and pairs by nnunet_rndpo.pipeline.prepare_pairs; here only the DDP rank and barrier,
        and the resume rule (--c keeps the pairs of the first start)."""
        from nnunet_rndpo.pipeline import PAIRS_FILE_NAME, prepare_pairs
        from nnunet_rndpo.training.pair_data import TrainingItem

        prepared = prepare_pairs(
            self.run_location(),
            base_model,
            self.settings.pair_settings(overwrite_proposals=self.settings.overwrite_proposals and not self._resumed),
            device=self.device,
            store_folder=Path(self.settings.proposal_store) if self.settings.proposal_store else None,
            pairs_file=Path(self.output_folder) / PAIRS_FILE_NAME,
            reuse_pairs_file=self._resumed,
            rank=self.local_rank,
            world_size=dist.get_world_size() if self.is_ddp else 1,
            barrier=self._barrier,
            log=self.print_to_log_file,
            progress=self.local_rank == 0,
        )
        self._pool, self._store = prepared.pool, prepared.store
        return [TrainingItem.from_record(item) for item in prepared.items]

    def _barrier(self) -> None:
        if self.is_ddp:
            dist.barrier()

    def _build_pair_loader(self, items):
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        from nnunet_rndpo.proposals.pool import PoolReader
        from nnunet_rndpo.training.pair_data import PairDataset, annotated_key, pair_loader

        reader = PoolReader(self._pool, self.plans_manager, self.configuration_manager, self.dataset_json)
        # self-training needs only the chosen mask: one segmentation channel, as nnU-Net's own loader gives
        dataset = PairDataset(
            items,
            self._store,
            reader,
            single_mask=not self.uses_reference,
            annotated_key=annotated_key(self.label_manager),
        )
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        transforms = self.get_training_transforms(
            patch_size,
            rotation,
            self._get_deep_supervision_scales(),
            mirror_axes,
            dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels,
            regions=None,
            ignore_label=self.label_manager.ignore_label,
        )
        loader = pair_loader(
            dataset,
            self.batch_size,
            initial_patch_size,
            patch_size,
            self.label_manager,
            self.settings.disagreement_sampling,
            transforms,
        )
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(
            data_loader=loader,
            transform=None,
            num_processes=processes,
            num_cached=max(6, processes // 2),
            seeds=None,
            pin_memory=self.device.type == "cuda",
            wait_time=0.002,
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

    def compute_preference_loss(self, output, target, reference_terms) -> tuple[torch.Tensor, dict]:
        """The configured objective over every output scale (+ the SFT term); statistics from the full resolution.

        reference_terms: per scale, the reference's term from `_reference_terms` (None where the weight is 0)."""
        settings = self.settings
        with record_function("rndpo/preference_loss"):
            total, statistics = preference_loss_over_scales(
                output,
                None,
                target,
                self._scale_weights(len(output) if isinstance(output, (list, tuple)) else 1),
                loss_type=settings.objective,
                beta=settings.beta,
                label_smoothing=settings.label_smoothing,
                normalization=settings.normalization,
                ignore_label=self.label_manager.ignore_label,
                target_margin=settings.target_margin,
                reference_voxel_ll=reference_terms,
                keep_every_head=self.is_ddp,
            )
        if settings.sft_weight > 0:
            chosen = [t[:, :1] for t in target] if isinstance(target, (list, tuple)) else target[:, :1]
            with record_function("rndpo/sft_loss"):
                total = total + settings.sft_weight * self.loss(output, chosen)
        return total, statistics

    def _warm_up_learning_rate(self) -> None:
        """Linear warm-up over the first `warmup_iterations` steps of the run, on top of nnU-Net's per-epoch
        poly schedule (which on_train_epoch_start sets)."""
        warmup = self.settings.warmup_iterations
        if warmup <= 0 or self._iteration >= warmup:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_learning_rate(self._epoch_learning_rate, self._iteration, warmup)

    def train_step(self, batch: dict) -> dict:
        self._warm_up_learning_rate()
        self._iteration += 1
        if not self.uses_reference and self.dataloader_labeled is None:
            # self-training is nnU-Net's own step on the chosen mask
            return super().train_step(batch)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (
            [t.to(self.device, non_blocking=True) for t in target]
            if isinstance(target, list)
            else target.to(self.device, non_blocking=True)
        )
        self.optimizer.zero_grad(set_to_none=True)
        statistics = {}
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            if self.uses_reference:
                reference_terms = self._reference_terms(data, target)
                with record_function("rndpo/policy_forward"):
                    output = self.network(data)
                loss, statistics = self.compute_preference_loss(output, target, reference_terms)
            else:
                loss = self.loss(self.network(data), target)
            if self.dataloader_labeled is not None:
                labeled = next(self.dataloader_labeled)
                labeled_target = labeled["target"]
                labeled_target = (
                    [t.to(self.device, non_blocking=True) for t in labeled_target]
                    if isinstance(labeled_target, list)
                    else labeled_target.to(self.device)
                )
                anchor = self.loss(self.network(labeled["data"].to(self.device, non_blocking=True)), labeled_target)
                statistics["anchor_loss"] = anchor.detach()
                loss = loss + self.settings.anchor_weight * anchor
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            with record_function("rndpo/backward"):
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        with record_function("rndpo/statistics"):
            self._accumulate_statistics(statistics)
        # a device tensor: read once per epoch in on_train_epoch_end, not once per step
        return {"loss": loss.detach()}

    # ------------------------------------------------------------------ logging
    def _logged_keys(self) -> tuple[str, ...]:
        """The statistics this run produces every epoch (only those are registered with nnU-Net's logger)."""
        keys = LOGGED_KEYS if self.uses_reference else ()
        return keys + (("anchor_loss",) if self.settings.anchor_weight > 0 else ())

    def _register_log_keys(self) -> None:
        logging = self.logger.local_logger.my_fantastic_logging
        for key in self._logged_keys():
            logging.setdefault(key, [])

    def _accumulate_statistics(self, statistics: dict) -> None:
        """Sums the step's statistics on the device (one stack and one add; no host synchronisation)."""
        keys = self._logged_keys()
        if not keys:
            return
        values = torch.stack([statistics[k].float() for k in keys])
        self._statistic_sums = values if self._statistic_sums is None else self._statistic_sums + values
        self._statistic_steps += 1

    def read_preference_statistics(self) -> dict[str, float]:
        """Means over this epoch's steps so far (over all ranks under DDP): one read from the device."""
        keys = self._logged_keys()
        if self._statistic_sums is None:
            return {}
        totals = torch.cat(
            [self._statistic_sums, torch.tensor([float(self._statistic_steps)], device=self._statistic_sums.device)]
        )
        if self.is_ddp:
            dist.all_reduce(totals)
        totals = totals.cpu().tolist()
        return {key: value / max(totals[-1], 1.0) for key, value in zip(keys, totals[:-1])}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._epoch_learning_rate = self.optimizer.param_groups[0]["lr"]
        self._iteration = self.current_epoch * self.num_iterations_per_epoch
        self._statistic_sums, self._statistic_steps = None, 0

    def on_train_epoch_end(self, train_outputs: List[dict]):
        # nnU-Net's progress.png takes the shortest logged list as the epoch count: every key we add is
        # logged every epoch, or never
        losses = [o["loss"] for o in train_outputs]
        if losses and isinstance(losses[0], torch.Tensor):
            losses = torch.stack(losses).float().cpu().numpy()  # one device read per epoch
        super().on_train_epoch_end([{"loss": np.asarray(loss)} for loss in losses])
        means = self.read_preference_statistics()
        for key in self._logged_keys():
            self.logger.log(key, means.get(key, float("nan")), self.current_epoch)

    def on_epoch_end(self):
        if self.local_rank == 0 and any(self.logger.local_logger.my_fantastic_logging.get(k) for k in LOGGED_KEYS):
            self.print_to_log_file(
                "preference: "
                + ", ".join(
                    f"{k}={self.logger.get_value(k, step=-1):.4g}"
                    for k in LOGGED_KEYS
                    if self.logger.local_logger.my_fantastic_logging.get(k)
                )
            )
        super().on_epoch_end()
        if self.local_rank == 0:
            from nnunet_rndpo.training.progress_plot import plot_preference_progress

            plot_preference_progress(
                self.logger.local_logger.my_fantastic_logging, Path(self.output_folder) / PREFERENCE_PNG
            )

    def on_train_end(self):
        if self.settings.final_checkpoint == "best":
            self._load_best_weights()
        super().on_train_end()
        if self.dataloader_labeled is not None:
            self._shutdown(self.dataloader_labeled)

    def _load_best_weights(self) -> None:
        """final_checkpoint "best": checkpoint_final.pth (and nnU-Net's final validation) get the weights of
        checkpoint_best.pth, the base's when validate_base is on and no epoch beat it."""
        best = Path(self.output_folder) / "checkpoint_best.pth"
        if not best.is_file():
            self.print_to_log_file(f"final_checkpoint 'best': no {best.name} yet; the last weights stay final")
            return
        if self.is_ddp:
            dist.barrier()  # rank 0 wrote it
        checkpoint = torch.load(best, map_location=self.device, weights_only=False)
        _unwrap(self.network).load_state_dict(checkpoint["network_weights"])
        self.print_to_log_file(
            f"final_checkpoint 'best': the final weights are those of {best.name} (epoch {checkpoint['current_epoch']})"
        )


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
_TINY = {"num_epochs": 2, "iterations_per_epoch": 4, "val_iterations_per_epoch": 2}  # tests and smoke runs


class nnUNetTrainerRNDPO_5epochs(nnUNetTrainerRNDPO):
    """nnUNetTrainerRNDPO for 5 epochs of 250 iterations."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerRNDPO.settings_overrides, **_FIVE_EPOCHS}


class nnUNetTrainerDPO_5epochs(nnUNetTrainerDPO):
    """nnUNetTrainerDPO for 5 epochs of 250 iterations."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerDPO.settings_overrides, **_FIVE_EPOCHS}


class nnUNetTrainerSelfTrain_5epochs(nnUNetTrainerSelfTrain):
    """nnUNetTrainerSelfTrain for 5 epochs of 250 iterations."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerSelfTrain.settings_overrides, **_FIVE_EPOCHS}


class nnUNetTrainerRNDPO_tiny(nnUNetTrainerRNDPO):
    """nnUNetTrainerRNDPO for 2 epochs of 4 iterations (tests, smoke runs)."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerRNDPO.settings_overrides, **_TINY}


class nnUNetTrainerDPO_tiny(nnUNetTrainerDPO):
    """nnUNetTrainerDPO for 2 epochs of 4 iterations (tests, smoke runs)."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerDPO.settings_overrides, **_TINY}


class nnUNetTrainerSelfTrain_tiny(nnUNetTrainerSelfTrain):
    """nnUNetTrainerSelfTrain for 2 epochs of 4 iterations (tests, smoke runs)."""

    settings_overrides: ClassVar[dict] = {**nnUNetTrainerSelfTrain.settings_overrides, **_TINY}
