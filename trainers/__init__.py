"""The folder that nnU-Net's `nnUNet_extTrainer` points at (installed as `nnunet_rndpo.trainers`).

nnU-Net imports every module here under a bare name; each module only re-exports trainer classes that are
defined in the library, so that they pickle into spawned workers. `nnunet_rndpo env` prints the export line.
"""

if __name__ != "nnunet_rndpo.trainers":
    # installed as nnunet_rndpo.trainers (setup.py); nnU-Net imports the modules in this folder by their own names
    raise ImportError(f"import the trainers as nnunet_rndpo.trainers, not as {__name__!r} (the repository's folder)")
