"""Re-exports for nnU-Net's trainer look-up (nnUNet_extTrainer). The classes live in the library so that
they pickle into nnU-Net's spawned workers."""

from nnunet_rndpo.training.trainers import (  # noqa: F401
    nnUNetTrainerDPO,
    nnUNetTrainerDPO_5epochs,
    nnUNetTrainerDPO_tiny,
    nnUNetTrainerPreference,
    nnUNetTrainerRNDPO,
    nnUNetTrainerRNDPO_5epochs,
    nnUNetTrainerRNDPO_tiny,
    nnUNetTrainerSelfTrain,
    nnUNetTrainerSelfTrain_5epochs,
    nnUNetTrainerSelfTrain_tiny,
)
