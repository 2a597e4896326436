"""Load a trained nnU-Net checkpoint whole (segmentation head included), with errors that name the file.

nnU-Net's own `-pretrained_weights` re-initialises the segmentation head and its predictor looks the trainer
class up by name; we rebuild the network from the plans stored beside the checkpoint instead, so any
checkpoint of a plain-UNet trainer loads without our package being on nnU-Net's search path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from nnunet_rndpo.nnunet_paths import RunLocation

REQUIRED_CHECKPOINT_KEYS = ("network_weights", "init_args", "trainer_name")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, not nnU-Net's, or made for other data."""


@dataclass
class LoadedModel:
    network: torch.nn.Module  # eval mode, deep supervision off
    plans: dict
    dataset_json: dict
    configuration: str
    fold: object
    trainer_name: str
    checkpoint_path: Path
    checkpoint_sha256: str
    mirror_axes: Optional[tuple]

    @property
    def plans_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans)

    @property
    def configuration_manager(self):
        return self.plans_manager.get_configuration(self.configuration)

    @property
    def label_manager(self):
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def proposal_mirror_axes(self) -> tuple:
        """The axes proposals mirror over: the trainer's, else every axis of the patch (as ProposalEngine)."""
        if self.mirror_axes is not None:
            return tuple(self.mirror_axes)
        return tuple(range(len(self.configuration_manager.patch_size)))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes. A run's start hashes each checkpoint more than once (the proposal store's
    identity, then loading the networks): a file whose size, modification time and inode are unchanged since it
    was last hashed is not read again. Retraining in place or an atomic rename changes at least one of them."""
    resolved = Path(path).resolve()
    status = resolved.stat()
    return _sha256_of_file(str(resolved), status.st_size, status.st_mtime_ns, status.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256_of_file(path: str, size: int, mtime_ns: int, inode: int, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """torch.load on the CPU (a checkpoint saved on a GPU loads anywhere) with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); it may be truncated or corrupt"
        ) from error
    except Exception as error:  # unpickling garbage raises assorted errors
        raise CheckpointError(
            f"checkpoint {path} is not a torch checkpoint ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_CHECKPOINT_KEYS):
        present = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not an nnU-Net checkpoint: expected keys {', '.join(REQUIRED_CHECKPOINT_KEYS)}, found {present}"
        )
    return checkpoint


def check_compatible(
    checkpoint_path: Path, checkpoint: dict, plans: dict, configuration: str, dataset_json: dict
) -> None:
    """Refuse a checkpoint made for another dataset, configuration or label set."""
    init_args = checkpoint["init_args"]
    saved_plans = init_args.get("plans", {})
    problems = []
    if saved_plans.get("dataset_name") != plans.get("dataset_name"):
        problems.append(f"dataset {saved_plans.get('dataset_name')!r} (expected {plans.get('dataset_name')!r})")
    if init_args.get("configuration") != configuration:
        saved = saved_plans.get("configurations", {}).get(init_args.get("configuration"), {})
        wanted = plans.get("configurations", {}).get(configuration, {})
        # A configuration of another name is fine only when its network and patch are identical.
        same_network = saved.get("architecture") == wanted.get("architecture") and saved.get(
            "patch_size"
        ) == wanted.get("patch_size")
        if not same_network:
            problems.append(f"configuration {init_args.get('configuration')!r} (expected {configuration!r})")
    saved_labels = init_args.get("dataset_json", {}).get("labels")
    if saved_labels != dataset_json.get("labels"):
        problems.append(f"labels {json.dumps(saved_labels)} (expected {json.dumps(dataset_json.get('labels'))})")
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint_path} was trained for another setting: " + "; ".join(problems))


def build_network(plans: dict, configuration: str, dataset_json: dict) -> torch.nn.Module:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    return nnUNetTrainer.build_network_architecture(
        plans_manager,
        configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        label_manager.num_segmentation_heads,
        enable_deep_supervision=False,
    )


def load_weights(network: torch.nn.Module, state_dict: dict, checkpoint_path: Path) -> None:
    cleaned = {key[7:] if key.startswith("module.") else key: value for key, value in state_dict.items()}
    cleaned = {key.replace("_orig_mod.", ""): value for key, value in cleaned.items()}
    try:
        network.load_state_dict(cleaned)
    except RuntimeError as error:
        raise CheckpointError(
            f"weights in {checkpoint_path} do not fit the network of these plans: {str(error).splitlines()[0]}"
        ) from error


def load_model(
    checkpoint_path: str | Path,
    device: torch.device | str = "cpu",
    *,
    expected_plans: Optional[dict] = None,
    expected_configuration: Optional[str] = None,
    expected_dataset_json: Optional[dict] = None,
) -> LoadedModel:
    """Load `checkpoint_path`; plans come from the checkpoint (or `expected_*`, which are then checked)."""
    checkpoint_path = Path(checkpoint_path).resolve()
    checkpoint = read_checkpoint(checkpoint_path)
    init_args = checkpoint["init_args"]
    plans = expected_plans or init_args["plans"]
    configuration = expected_configuration or init_args["configuration"]
    dataset_json = expected_dataset_json or init_args["dataset_json"]
    if expected_plans is not None or expected_configuration is not None or expected_dataset_json is not None:
        check_compatible(checkpoint_path, checkpoint, plans, configuration, dataset_json)
    network = build_network(plans, configuration, dataset_json)
    load_weights(network, checkpoint["network_weights"], checkpoint_path)
    network.to(torch.device(device)).eval()
    mirror_axes = checkpoint.get("inference_allowed_mirroring_axes")
    return LoadedModel(
        network=network,
        plans=plans,
        dataset_json=dataset_json,
        configuration=configuration,
        fold=init_args.get("fold"),
        trainer_name=checkpoint["trainer_name"],
        checkpoint_path=checkpoint_path,
        checkpoint_sha256=file_sha256(checkpoint_path),
        mirror_axes=tuple(mirror_axes) if mirror_axes is not None else None,
    )


def load_model_like(
    checkpoint_path: str | Path, like: "LoadedModel | RunLocation", device: torch.device | str = "cpu"
) -> LoadedModel:
    """A checkpoint loaded with `like`'s plans, configuration and dataset.json, refused with CheckpointError where it
    was trained on others. `like`: a loaded model (another fold of it, an ensemble member) or the RunLocation of a
    run (its base, a fold's model)."""
    return load_model(
        checkpoint_path,
        device,
        expected_plans=like.plans,
        expected_configuration=like.configuration,
        expected_dataset_json=like.dataset_json,
    )
