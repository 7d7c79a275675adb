"""Converters of public datasets into nnU-Net raw datasets (one module per dataset, shared code in common.py).

Each module has ``convert(input_folder, output_id, ...) -> Path`` and a ``main`` (console script
``nnUNetv2_cimis_convert_<dataset>``). Label maps are data: ``label_maps/<dataset>.json``. See docs/datasets.md.
"""
