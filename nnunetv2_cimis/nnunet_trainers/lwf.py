"""Re-export of the LwF trainer for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.lwf import nnUNetTrainerLwF

__all__ = ["nnUNetTrainerLwF"]
