"""The folder that nnU-Net's `nnUNet_extTrainer` points at (installed as `nnunet_rndpo.trainers`).

nnU-Net imports every module here under a bare name; each module only re-exports trainer classes that are
defined in the library, so that they pickle into spawned workers. `nnunet_rndpo env` prints the export line.
"""
