"""Re-export of the IAPL trainer for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.iapl import nnUNetTrainerIAPL

__all__ = ["nnUNetTrainerIAPL"]
