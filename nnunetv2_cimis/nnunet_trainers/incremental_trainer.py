"""Re-export of the trainers of ``training/incremental_trainer.py`` for ``nnUNet_extTrainer`` (absolute imports
only): fine-tuning (the lower bound), the joint upper bound, and the base itself."""
from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerFT, nnUNetTrainerIncremental, nnUNetTrainerJoint

__all__ = ["nnUNetTrainerFT", "nnUNetTrainerJoint", "nnUNetTrainerIncremental"]
