"""``nnUNetv2_cimis_step_memory``: compute the step memory of a trained model (e.g. one trained by plain
nnU-Net) so that it can be the teacher of an incremental step."""
from __future__ import annotations

import argparse
import os

import torch

from nnunetv2_cimis.command_options import add_version_argument, resolve_device
from nnunetv2_cimis.errors import CIMISError, cli_entry
from nnunetv2_cimis.memory.compute import DEFAULT_PROTOTYPE_TAP


@cli_entry
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_version_argument(parser)
    parser.add_argument("-m", "--model", help="trained model folder (<trainer>__<plans>__<configuration>)")
    parser.add_argument("-d", "--dataset", help="dataset name or id (instead of -m)")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer (with -d)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (with -d)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (with -d)")
    parser.add_argument("-f", "--fold", default="0", help="fold")
    parser.add_argument("--tap", default=DEFAULT_PROTOTYPE_TAP, help="module path of the prototype features")
    parser.add_argument("-device", "--device", default=None,
                        help="cuda, cuda:N, cpu or mps (default: cuda when a GPU is present, else cpu)")
    args = parser.parse_args(argv)
    from nnunetv2_cimis.memory.teacher_memory import compute_memory_for_model
    from nnunetv2_cimis.teacher.loading import model_folder_for
    if args.model:
        model = args.model
    elif args.dataset:
        from nnunetv2.paths import nnUNet_results
        from nnunetv2_cimis.nnunet_folders import dataset_name
        model = model_folder_for(nnUNet_results.get(), dataset_name(args.dataset), args.tr, args.p, args.c)
    else:
        raise CIMISError("give the trained model folder with -m, or -d/-tr/-p/-c")
    fold_folder = os.path.join(model, f"fold_{args.fold}")
    device = resolve_device(args.device)
    path = compute_memory_for_model(fold_folder, device, prototype_tap=args.tap, progress=True)
    print(f"step memory written to {path}")
