"""From an incremental model to a challenge submission: label values and file names restored.

:mod:`~nnunetv2_cimis.submission.conventions` holds the challenges' conventions (a small table),
:mod:`~nnunetv2_cimis.submission.labels` the mapping from the scenario's global label values back to the
source dataset's or a challenge's values, :mod:`~nnunetv2_cimis.submission.predict` the command
``nnUNetv2_cimis_predict`` and :mod:`~nnunetv2_cimis.submission.export` the command ``nnUNetv2_cimis_export``.
"""
