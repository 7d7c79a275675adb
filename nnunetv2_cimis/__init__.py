"""nnunetv2-cimis: class-incremental medical image segmentation on nnU-Net v2."""

__version__ = "0.1.0"
