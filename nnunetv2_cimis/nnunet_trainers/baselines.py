"""Re-exports of the baseline trainers (LwF, ILT, MiB, PLOP) for ``nnUNet_extTrainer`` (absolute imports only)."""
from nnunetv2_cimis.training.trainers.ilt import nnUNetTrainerILT
from nnunetv2_cimis.training.trainers.lwf import nnUNetTrainerLwF
from nnunetv2_cimis.training.trainers.mib import nnUNetTrainerMiB
from nnunetv2_cimis.training.trainers.plop import nnUNetTrainerPLOP

__all__ = ["nnUNetTrainerLwF", "nnUNetTrainerILT", "nnUNetTrainerMiB", "nnUNetTrainerPLOP"]
