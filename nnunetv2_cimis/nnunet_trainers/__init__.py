"""Folder named by nnUNet_extTrainer: modules here only re-export the package's trainers."""
