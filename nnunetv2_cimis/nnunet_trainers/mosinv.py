"""Re-export of the MOSInversion trainer for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.mosinv import nnUNetTrainerMOSInv

__all__ = ["nnUNetTrainerMOSInv"]
