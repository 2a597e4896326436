"""nnunet-rndpo: preference fine-tuning (Region-Normalized DPO) for nnU-Net v2.

The library is organised one concept per module (see README.md, "Where things live").
"""

__version__ = "0.1.0"
