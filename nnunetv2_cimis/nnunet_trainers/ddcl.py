"""Re-export of the DDCL trainer for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.ddcl import nnUNetTrainerDDCL

__all__ = ["nnUNetTrainerDDCL"]
