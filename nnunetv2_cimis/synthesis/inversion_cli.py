"""``nnUNetv2_cimis_synthesize``: synthetic old-class volumes from a trained step by MOSInversion.

Example (the model of step 0 of a scenario, fold 0)::

    nnUNetv2_cimis_synthesize -d 901 -c 3d_fullres -tr nnUNetTrainerFT -f 0 -n 32
    nnUNetv2_cimis_synthesize -m $nnUNet_results/Dataset901_X/nnUNetTrainerFT__nnUNetPlans__3d_fullres -f 0 -n 32

The model's step memory (``step_memory.pth`` next to its checkpoint, see ``docs/architecture.md``) supplies
the normalisation statistics and the conditioning masks. The set is written to ``-o`` (default
``<model folder>/fold_<f>/mosinv_synthetic``, the place ``nnUNetTrainerMOSInv`` looks first); volumes already
there are kept, so an interrupted run resumes. Per volume a report (``volume_XXXX.json``: teacher Dice
against its mask per label, feature-statistics distance before and after) and for the set ``summary.json``.
See ``docs/methods_mosinversion.md``. This module parses the command line; the library code is in
:mod:`nnunetv2_cimis.synthesis.synthetic_sets` (sets on disk) and :mod:`nnunetv2_cimis.synthesis.inversion`.
"""
from __future__ import annotations

import argparse
import os

import torch

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError, cli_entry
from nnunetv2_cimis.synthesis.inversion import InversionConfig
from nnunetv2_cimis.synthesis.mask_augmentation import MaskAugmentation
from nnunetv2_cimis.synthesis.synthetic_sets import (DEFAULT_SUBFOLDER, default_output_folder,
                                                     synthesize_from_teacher, write_summary)


def num_input_channels_of(plans: dict, dataset_json: dict, configuration: str) -> int:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    return determine_num_input_channels(pm, pm.get_configuration(configuration), dataset_json)


def build_parser() -> argparse.ArgumentParser:
    d = InversionConfig()
    p = argparse.ArgumentParser(
        prog="nnUNetv2_cimis_synthesize",
        description="Generate synthetic volumes (patch size of the plans) from a trained step's model by "
                    "mask-conditioned DeepInversion (MOSInversion). Each volume is saved with the model's "
                    "argmax as label and a quality report.")
    add_version_argument(p)
    src = p.add_argument_group("model (either -m, or -d and -c)")
    src.add_argument("-d", dest="dataset", help="dataset name or id of the trained step")
    src.add_argument("-c", dest="configuration", help="configuration, e.g. 3d_fullres")
    src.add_argument("-tr", dest="trainer", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    src.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    src.add_argument("-m", dest="model_folder", help="model folder <trainer>__<plans>__<configuration>")
    src.add_argument("-f", dest="fold", default="0", help="fold (default 0)")
    src.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                     help="checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("-o", dest="output", default=None,
                   help=f"output folder (default <model folder>/fold_<f>/{DEFAULT_SUBFOLDER})")
    p.add_argument("-n", dest="num_volumes", type=int, default=32, help="number of volumes (default 32)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=2,
                   help="volumes optimised together; statistics are matched over the batch (default 2)")
    p.add_argument("--iterations", type=int, default=d.iterations, help=f"Adam steps (default {d.iterations})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--lr-schedule", "--lr_schedule", choices=("poly", "constant"), default=d.lr_schedule,
                   help=f"learning-rate schedule (default {d.lr_schedule}, a choice; the first author's generator "
                        f"uses constant)")
    p.add_argument("--dice-weight", "--dice_weight", type=float, default=d.dice_weight,
                   help=f"default {d.dice_weight}")
    p.add_argument("--stats-weight", "--stats_weight", type=float, default=d.stats_weight,
                   help=f"default {d.stats_weight}")
    p.add_argument("--first-layer-weight", "--first_layer_weight", type=float, default=d.first_layer_weight,
                   help=f"extra weight of the first normalisation layer (default {d.first_layer_weight})")
    p.add_argument("--tv-l1-weight", "--tv_l1_weight", type=float, default=d.tv_l1_weight,
                   help=f"default {d.tv_l1_weight}")
    p.add_argument("--tv-l2-weight", "--tv_l2_weight", type=float, default=d.tv_l2_weight,
                   help=f"default {d.tv_l2_weight}")
    p.add_argument("--no-mask-augmentation", "--no_mask_augmentation", action="store_true",
                   help="use the stored label patches as they are (no flips / elastic / affine)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    p.add_argument("-device", "--device", default=None, help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bar")
    return p


def _resolve_checkpoint(args) -> str:
    from nnunetv2_cimis.teacher.loading import model_folder_for

    if args.model_folder:
        model_folder = args.model_folder
    else:
        if not args.dataset or not args.configuration:
            raise CIMISError("Give the model either as -m MODEL_FOLDER or as -d DATASET -c CONFIGURATION "
                             "[-tr TRAINER -p PLANS].")
        from nnunetv2.paths import nnUNet_results
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        if not nnUNet_results.is_set():
            raise CIMISError("nnUNet_results is not set; set it as for nnU-Net, or pass -m MODEL_FOLDER.")
        try:
            dataset = maybe_convert_to_dataset_name(args.dataset)
        except (RuntimeError, ValueError) as e:
            raise CIMISError(f"Unknown dataset {args.dataset!r}: {e}") from None
        model_folder = model_folder_for(nnUNet_results.get(), dataset, args.trainer, args.plans, args.configuration)
    if args.fold != "all" and not str(args.fold).isdigit():
        raise CIMISError(f"-f must be a fold number or 'all', got {args.fold!r}")
    fold = args.fold if args.fold == "all" else int(args.fold)
    ckpt = os.path.join(model_folder, f"fold_{fold}", args.checkpoint)
    if not os.path.isfile(ckpt):
        raise CIMISError(f"No trained model at {ckpt}. Train it first, or check -d/-c/-tr/-p/-f or -m.")
    return ckpt


@cli_entry
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.num_volumes < 1 or args.batch_size < 1:
        raise CIMISError(f"-n and --batch_size must be >= 1, got {args.num_volumes} and {args.batch_size}")
    try:
        config = InversionConfig(iterations=args.iterations, lr=args.lr, lr_schedule=args.lr_schedule,
                                 dice_weight=args.dice_weight, stats_weight=args.stats_weight,
                                 first_layer_weight=args.first_layer_weight, tv_l1_weight=args.tv_l1_weight,
                                 tv_l2_weight=args.tv_l2_weight)
    except ValueError as e:
        raise CIMISError(str(e)) from None
    ckpt = _resolve_checkpoint(args)
    from nnunetv2_cimis.memory.step_memory import STEP_MEMORY_FILENAME, StepMemory

    memory = StepMemory.load(os.path.join(os.path.dirname(ckpt), STEP_MEMORY_FILENAME))
    if not memory.norm_stats:
        raise CIMISError(f"The step memory of {os.path.dirname(ckpt)} holds no normalisation statistics; "
                         f"recompute it with nnUNetv2_cimis_step_memory.")
    if not memory.label_bank:
        raise CIMISError(f"The step memory of {os.path.dirname(ckpt)} holds no label patch to condition on; "
                         f"recompute it with nnUNetv2_cimis_step_memory.")
    from nnunetv2_cimis.trainer_folder import ensure_trainer_path

    ensure_trainer_path()  # so that a model trained with one of the package's trainers can be rebuilt
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise CIMISError(f"--device {args.device!r}: {e}") from None
    from nnunetv2_cimis.teacher.loading import load_teacher

    teacher = load_teacher(ckpt, device)
    configuration = teacher.init_args["configuration"]
    n_in = num_input_channels_of(teacher.plans, teacher.dataset_json, configuration)
    output = args.output or default_output_folder(ckpt)
    aug = MaskAugmentation(p_flip=0, p_elastic=0, p_rotation=0, p_scale=0) if args.no_mask_augmentation else None
    synthesize_from_teacher(ckpt, teacher.network, memory, n_in, output, args.num_volumes, config,
                            batch_size=args.batch_size, seed=args.seed, augmentation=aug, device=device,
                            show_progress=not args.no_progress, log=print)
    summary = write_summary(output)
    md, sd = summary["mean_dice"], summary["stats_distance"]
    print(f"{summary['num_volumes']} volumes in {output}; teacher Dice vs mask (mean over volumes) "
          f"{md['mean']:.3f} [min {md['min']:.3f}], statistics distance {sd['mean']:.4g} "
          f"(start {summary['stats_distance_start']['mean']:.4g}). Reports: volume_XXXX.json, summary.json."
          if md and sd else f"{summary['num_volumes']} volumes in {output}")


if __name__ == "__main__":
    main()
