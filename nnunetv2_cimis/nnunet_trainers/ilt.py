"""Re-export of the ILT trainer for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.ilt import nnUNetTrainerILT

__all__ = ["nnUNetTrainerILT"]
