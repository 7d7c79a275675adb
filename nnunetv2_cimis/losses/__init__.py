"""Losses of the class-incremental methods, in plain PyTorch (no nnU-Net imports)."""
