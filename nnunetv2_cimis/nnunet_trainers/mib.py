"""Re-export of the MiB trainer for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.mib import nnUNetTrainerMiB

__all__ = ["nnUNetTrainerMiB"]
