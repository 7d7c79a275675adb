#!/usr/bin/env python
"""Challenge inference entry point: ``python inference.py -i INPUT -o OUTPUT``.

Predicts every image in INPUT with the model baked into the container and writes one segmentation per case into
OUTPUT, in the challenge's label values and file names: a thin wrapper around ``nnUNetv2_cimis_predict`` (nnU-Net's
predictor; see docs/usage.md, "Submissions"). Settings come from the environment, so the same script serves every
challenge (the Dockerfile sets them):

* ``CIMIS_MODEL``      model folder ``<trainer>__<plans>__<configuration>`` (default ``/opt/cimis/model``)
* ``CIMIS_FOLDS``      folds to ensemble, space-separated (default ``0``)
* ``CIMIS_CHALLENGE``  ``flare22``, ``kits23``, ``kits19``, ``btcv``, ``amos``, ``word``; empty: nnU-Net naming
                       (``CASE_0000.nii.gz`` in, ``CASE.nii.gz`` out) with the source dataset's label values
* ``CIMIS_DEVICE``     ``cuda`` / ``cpu`` (default: cuda when a GPU is visible)
* ``CIMIS_DISABLE_TTA`` ``1`` to switch test-time mirroring off (faster)
* ``CIMIS_NPP``, ``CIMIS_NPS`` preprocessing / export workers (default 2 / 2; ``0``: all in this process)
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", required=True, help="folder with the input images")
    p.add_argument("-o", "--output", required=True, help="folder for the segmentations (created)")
    a = p.parse_args(argv)
    from nnunetv2_cimis.submission.predict import main as predict_main
    args = ["-i", a.input, "-o", a.output, "-m", os.environ.get("CIMIS_MODEL", "/opt/cimis/model"),
            "-f", *os.environ.get("CIMIS_FOLDS", "0").split(),
            "-npp", os.environ.get("CIMIS_NPP", "2"), "-nps", os.environ.get("CIMIS_NPS", "2")]
    if os.environ.get("CIMIS_CHALLENGE"):
        args += ["--challenge", os.environ["CIMIS_CHALLENGE"]]
    if os.environ.get("CIMIS_DEVICE"):
        args += ["-device", os.environ["CIMIS_DEVICE"]]
    if os.environ.get("CIMIS_DISABLE_TTA", "") in ("1", "true", "yes"):
        args.append("--disable_tta")
    predict_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
