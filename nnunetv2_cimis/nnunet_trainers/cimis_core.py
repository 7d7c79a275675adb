"""Re-exports for nnU-Net's trainer search (``nnUNet_extTrainer`` points to this folder). Absolute imports
only: nnU-Net imports each module of this folder by its bare name."""
from nnunetv2_cimis.training.incremental_trainer import (nnUNetTrainerFT, nnUNetTrainerIncremental,  # noqa: F401
                                                         nnUNetTrainerJoint)
