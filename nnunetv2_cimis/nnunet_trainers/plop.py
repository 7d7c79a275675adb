"""Re-export of the PLOP trainer for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.plop import nnUNetTrainerPLOP

__all__ = ["nnUNetTrainerPLOP"]
