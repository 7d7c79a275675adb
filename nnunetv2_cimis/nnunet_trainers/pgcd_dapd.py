"""Re-export of the PGCD / DAPD trainers for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.pgcd_dapd import nnUNetTrainerDAPD, nnUNetTrainerPGCD, nnUNetTrainerPGCDDAPD

__all__ = ["nnUNetTrainerPGCD", "nnUNetTrainerDAPD", "nnUNetTrainerPGCDDAPD"]
