"""Folder named by nnUNet_extTrainer: one module per trainer module of the package, with the same name
(``training/trainers/*.py`` and ``training/incremental_trainer.py``), each only re-exporting that module's
trainer classes. nnU-Net imports every module here by its bare name, so the imports are absolute."""
