"""Re-exports for nnU-Net's trainer look-up (nnUNet_extTrainer). The classes live in the library so that
they pickle into nnU-Net's spawned workers. Only trainers for users: tests set short schedules through
RNDPO_SETTINGS."""

from nnunet_rndpo.training.trainers import (  # noqa: F401
    nnUNetTrainerDPO,
    nnUNetTrainerDPO_5epochs,
    nnUNetTrainerPreference,
    nnUNetTrainerRNDPO,
    nnUNetTrainerRNDPO_5epochs,
    nnUNetTrainerSelfTrain,
    nnUNetTrainerSelfTrain_5epochs,
)
