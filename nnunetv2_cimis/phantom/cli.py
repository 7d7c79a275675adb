"""``nnUNetv2_cimis_phantom``: write a synthetic dataset into ``$nnUNet_raw``.

Examples::

    nnUNetv2_cimis_phantom -d 900 -n 16                       # 16 abdominal CT cases of 32^3, 1.5 mm
    nnUNetv2_cimis_phantom -d 900 -n 8 --shape 64 64 64 --spacing 3 1.5 1.5 --seed 1
    nnUNetv2_cimis_phantom -d 910 -n 20 --kind laparoscopic2d
"""
from __future__ import annotations

import argparse
import importlib
import os
from typing import List, Optional

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError, cli_entry

KINDS = ("abdominal3d", "laparoscopic2d")


def _raw_folder() -> str:
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise CIMISError("the environment variable nnUNet_raw is not set; set it to your nnU-Net raw data "
                         "folder (export nnUNet_raw=/path/to/nnUNet_raw)")
    return raw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_cimis_phantom",
                                description="Write a synthetic phantom dataset as an nnU-Net raw dataset "
                                            "into $nnUNet_raw.")
    add_version_argument(p)
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="dataset id (1..999), must be free")
    p.add_argument("-n", "--num-cases", type=int, required=True, help="number of training cases")
    p.add_argument("--kind", choices=KINDS, default="abdominal3d",
                   help="abdominal3d: 3D CT phantom (default); laparoscopic2d: 2D RGB laparoscopic phantom")
    p.add_argument("--shape", type=int, nargs="+", default=None,
                   help="array shape; 3D: z y x (default 32 32 32); 2D: passed to the 2D generator")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5),
                   help="3D voxel spacing in mm, same order as --shape (default 1.5 1.5 1.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--name", default=None,
                   help="dataset name after DatasetXXX_ (default AbdominalPhantom / LaparoscopicPhantom)")
    p.add_argument("--organs", nargs="+", default=None,
                   help="abdominal3d only: subset of organs to label (default all eight)")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    raw = _raw_folder()
    if not 1 <= args.dataset_id <= 999:
        raise CIMISError(f"-d must be in 1..999, got {args.dataset_id}")
    if args.num_cases < 1:
        raise CIMISError(f"-n must be >= 1, got {args.num_cases}")
    from nnunetv2_cimis.nnunet_folders import claim_dataset_id
    claim_dataset_id(args.dataset_id, raw=raw, option="id with -d")

    if args.kind == "abdominal3d":
        from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
        shape = tuple(args.shape) if args.shape is not None else (32, 32, 32)
        if len(shape) != 3:
            raise CIMISError(f"--shape needs three numbers (z y x) for abdominal3d, got {list(shape)}")
        out = write_abdominal_phantom(raw, args.dataset_id, args.num_cases, shape=shape,
                                      spacing=tuple(args.spacing), seed=args.seed,
                                      dataset_name=args.name or "AbdominalPhantom", organs=args.organs)
    else:
        if args.organs is not None:
            raise CIMISError("--organs applies to --kind abdominal3d only")
        try:
            module = importlib.import_module("nnunetv2_cimis.phantom.laparoscopic2d")
        except ModuleNotFoundError as e:
            if e.name != "nnunetv2_cimis.phantom.laparoscopic2d":
                raise
            raise CIMISError("--kind laparoscopic2d needs the module nnunetv2_cimis.phantom.laparoscopic2d, "
                             "which is not installed in this version of nnunetv2-cimis") from None
        kwargs = {}
        if args.name:
            kwargs["dataset_name"] = args.name
        if args.shape is not None:
            kwargs["shape"] = tuple(args.shape)
        out = module.write_laparoscopic_phantom(raw, args.dataset_id, args.num_cases, args.seed, **kwargs)
    print(f"wrote {args.num_cases} cases to {out}")


if __name__ == "__main__":
    main()
