"""``nnUNetv2_cimis_add_classes``: extend an already trained nnU-Net model with new classes.

Input: a trained model folder (``<trainer>__<plans>__<configuration>``, a plain ``nnUNetTrainer`` model is
the common case) and an nnU-Net raw dataset in which only the new structures are labelled. Output: the next
step's dataset in the union label space (old classes keep their values, new classes are numbered after
them; its masks hold the new classes only), the model's plans copied to it, preprocessed, with step
metadata naming the model as teacher — ready for ``nnUNetv2_train NEW_ID CONFIG FOLD -tr <method>``.
The model's step memory is computed from its training data if missing and that data is still available.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError, cli_entry
from nnunetv2_cimis.memory.step_memory import STEP_MEMORY_FILENAME
from nnunetv2_cimis.naming import check_dataset_id, check_dataset_name, dataset_folder_name
from nnunetv2_cimis.safe_load import load_json_object
from nnunetv2_cimis.nnunet_folders import dataset_id_taken, dataset_name, require_env
from nnunetv2_cimis.scenarios.datasets import (SegmentationIO, check_images_readable, load_raw_dataset, plain_labels,
                                               sigterm_as_interrupt, write_label_dataset)
from nnunetv2_cimis.scenarios.intensity import new_class_clipping
from nnunetv2_cimis.scenarios.splits import write_splits
from nnunetv2_cimis.scenarios.step_metadata import METADATA_KEY, make_metadata, read_step_info


def _read_model_folder(model_folder: str, fold: str):
    files = {}
    for name in ("plans.json", "dataset.json"):
        path = os.path.join(model_folder, name)
        if not os.path.isfile(path):
            raise CIMISError(f"{model_folder} is not a trained nnU-Net model folder: {name} is missing. Give the "
                             f"folder <trainer>__<plans>__<configuration> inside nnUNet_results/<dataset>.")
        files[name] = load_json_object(path, f"{name} of the model")
    if not isinstance(files["plans.json"].get("configurations"), dict) or \
            not isinstance(files["plans.json"].get("dataset_name"), str):
        raise CIMISError(f"{os.path.join(model_folder, 'plans.json')} lacks 'dataset_name' or 'configurations': it is "
                         f"not an nnU-Net plans file. Restore the model folder as nnU-Net wrote it.")
    ckpt = os.path.join(model_folder, f"fold_{fold}", "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        raise CIMISError(f"{ckpt} does not exist: the model has not finished training fold {fold}.")
    parts = os.path.basename(os.path.normpath(model_folder)).split("__")
    if len(parts) != 3:
        raise CIMISError(f"The model folder name {os.path.basename(model_folder)} is not of the form "
                         f"<trainer>__<plans>__<configuration>.")
    return files["plans.json"], files["dataset.json"], ckpt, parts


ADDED_BY = "nnUNetv2_cimis_add_classes"


def extension_names(model_dataset: str, src_dataset: str, prev_meta: Optional[dict]) -> Tuple[str, str]:
    """(scenario label, dataset base name) of the step dataset that extends a model with a new dataset's classes.

    The label says what the chain is made of: the model's dataset (without its ``StepK`` suffix), then each added
    dataset, joined by ``+`` (``Abdomen+Pancreas``, then ``Abdomen+Pancreas+Kidney``); a model whose dataset was
    itself made here continues its label. Made by ``make_scenario``, the model's scenario label is not reused: the
    new chain is no longer that scenario. The base name is the label with ``Plus`` for ``+``
    (``AbdomenPlusPancreas``; the dataset becomes ``DatasetXXX_AbdomenPlusPancreasStep<k>``).
    """
    src_base = src_dataset.split("_", 1)[1]
    if prev_meta is not None and prev_meta.get("created_by") == ADDED_BY and prev_meta.get("scenario"):
        label = f"{prev_meta['scenario']}+{src_base}"
    else:
        model_base = model_dataset.split("_", 1)[1]
        model_base = re.sub(r"Step\d+$", "", model_base) or model_base
        label = f"{model_base}+{src_base}"
    return label, label.replace("+", "Plus")


def add_classes(model_folder: str, new_dataset: str, output_id: int, fold: str = "0",
                classes: Optional[Sequence[str]] = None, name: Optional[str] = None, num_processes: int = 1,
                compute_teacher_memory: bool = True, device: Optional[str] = None) -> dict:
    """Create the next step's dataset (see module docstring). Returns a summary dict.

    ``device``: where the model's missing step memory is computed (``cuda``, ``cuda:N``, ``cpu``, ``mps``;
    default: the GPU when one is present, as nnU-Net, else the CPU).
    """
    from nnunetv2_cimis.command_options import resolve_device
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    check_dataset_id(output_id, "-o/--output-id")
    if name is not None:
        check_dataset_name(name, "--name")
    memory_device = resolve_device(device)  # a GPU asked for but absent: say so before any work
    raw_root = require_env("nnUNet_raw")
    pre_root = require_env("nnUNet_preprocessed")
    model_folder = os.path.abspath(model_folder)
    plans, model_json, ckpt, (trainer, plans_name, configuration) = _read_model_folder(model_folder, fold)
    from nnunetv2_cimis.teacher.loading import load_teacher
    load_teacher(ckpt, torch.device("cpu"))  # refuse now a model that the next step could not load (weights-only)
    old_labels = plain_labels(model_json, f"the model's dataset.json ({model_folder})")
    src_name = dataset_name(new_dataset)
    src_folder, src_json, cases = load_raw_dataset(src_name)
    src_labels = plain_labels(src_json, src_name)
    new_names = [n for n, v in sorted(src_labels.items(), key=lambda kv: kv[1]) if v != 0]
    if classes:
        unknown = [c for c in classes if c not in new_names]
        if unknown:
            raise CIMISError(f"--classes names {unknown}, which {src_name} does not label (it has {new_names}).")
        new_names = list(classes)
    if not new_names:
        raise CIMISError(f"{src_name} labels no structure: nothing to add.")
    overlap = [c for c in new_names if c in old_labels]
    if overlap:
        raise CIMISError(f"{src_name} labels {overlap}, which the model already knows. A step dataset must label only "
                         f"new structures: pass --classes with the new ones only, or rename the labels if they are "
                         f"different structures.")
    if len(src_json["channel_names"]) != len(model_json["channel_names"]):
        raise CIMISError(f"{src_name} has {len(src_json['channel_names'])} input channels but the model expects "
                         f"{len(model_json['channel_names'])} ({model_json['channel_names']}).")
    if src_json["file_ending"] != model_json["file_ending"]:
        print(f"note: {src_name} uses {src_json['file_ending']} files, the model was trained on "
              f"{model_json['file_ending']}; nnU-Net reads both as long as the geometry is comparable.")
    taken = dataset_id_taken(output_id)
    if taken:
        raise CIMISError(f"Dataset id {output_id} is already used by {taken}; choose a free id.")

    # step metadata: continue the model's scenario if it has one
    first = max(old_labels.values()) + 1
    new_values = {c: first + i for i, c in enumerate(new_names)}
    if METADATA_KEY in model_json:
        prev = read_step_info(model_json, "the model's dataset")
        classes_per_step = prev.classes_per_step[:prev.index + 1] + [list(new_values.values())]
        index = prev.index + 1
    else:
        classes_per_step = [sorted(v for v in old_labels.values() if v != 0), list(new_values.values())]
        index = 1
    scenario, default_base = extension_names(plans["dataset_name"], src_name, model_json.get(METADATA_KEY))
    base = name or default_base
    target_name = dataset_folder_name(output_id, f"{base}Step{index}", "-o/--output-id", "--name")
    labels = dict(old_labels, **new_values)
    teacher = {"dataset": plans["dataset_name"], "trainer": trainer, "same_trainer_as_student": False,
               "checkpoint": ckpt}
    meta = make_metadata(scenario, index, classes_per_step, teacher, [], None, None, plans["dataset_name"])
    meta["source_dataset"] = src_name
    # where each class came from (nnUNetv2_cimis_predict --labels source): the model's record, else its own values
    prev_sources = (model_json.get(METADATA_KEY) or {}).get("source_labels") or \
        {str(v): {"dataset": plans["dataset_name"], "name": n, "value": v} for n, v in old_labels.items() if v != 0}
    meta["source_labels"] = dict(prev_sources, **{str(v): {"dataset": src_name, "name": c, "value": src_labels[c]}
                                                  for c, v in new_values.items()})
    meta["teacher_model_folder"] = model_folder
    meta["created_by"] = ADDED_BY

    first_case = cases[sorted(cases)[0]]
    io = SegmentationIO(src_json, first_case["images"][0])
    for c in sorted(cases):
        check_images_readable(io, cases[c]["images"])
    # the model's CT window was planned on its own organs; say so when it hides much of a new one
    clipped, warnings = new_class_clipping(plans, io, cases, {c: src_labels[c] for c in new_names})
    for line in warnings:
        print(line, file=sys.stderr)
    raw_target = os.path.join(raw_root, target_name)
    pre_target = os.path.join(pre_root, target_name)
    # clean-up removes only what this run created (never a folder that was there before)
    created = [p for p in (raw_target, pre_target) if not os.path.lexists(p)]
    if len(created) < 2:
        raise CIMISError(f"{raw_target if raw_target not in created else pre_target} already exists; choose a free "
                         f"dataset id with -o or remove that folder.")
    restore_sigterm = sigterm_as_interrupt()
    try:
        write_label_dataset(raw_target, src_json, cases, labels, {src_labels[c]: v for c, v in new_values.items()},
                            list(src_labels.values()), io, extra={METADATA_KEY: meta})
        os.makedirs(pre_target)
        moved = dict(plans, dataset_name=target_name)
        with open(os.path.join(pre_target, plans_name + ".json"), "w") as f:
            json.dump(moved, f, indent=2)
        shutil.copyfile(os.path.join(raw_target, "dataset.json"), os.path.join(pre_target, "dataset.json"))
        fp = os.path.join(model_folder, "dataset_fingerprint.json")
        if os.path.isfile(fp):
            shutil.copyfile(fp, os.path.join(pre_target, "dataset_fingerprint.json"))
        preprocess_dataset(output_id, plans_name, [configuration], [num_processes], verbose=False,
                           show_progress_bar=False)
        write_splits(pre_target, list(cases))
    except BaseException:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        restore_sigterm()
    memory_note = "present"
    if not os.path.isfile(os.path.join(os.path.dirname(ckpt), STEP_MEMORY_FILENAME)):
        memory_note = "missing"
        if compute_teacher_memory:
            from nnunetv2_cimis.memory.teacher_memory import compute_memory_for_model
            try:
                compute_memory_for_model(os.path.dirname(ckpt), memory_device, progress=True)
                memory_note = "computed"
            except CIMISError as e:
                print(f"warning: {e}")
    return {"dataset": target_name, "step": index, "labels": labels, "new_classes": new_names,
            "teacher": ckpt, "plans": plans_name, "configuration": configuration, "cases": len(cases),
            "teacher_step_memory": memory_note, "clipped_by_ct_window": clipped,
            "next": f"nnUNetv2_train {output_id} {configuration} {fold} -p {plans_name} -tr <method>"}


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(p)
    p.add_argument("-m", "--model", required=True, help="trained model folder <trainer>__<plans>__<configuration>")
    p.add_argument("-d", "--dataset", required=True, help="raw dataset (id or name) labelling only new structures")
    p.add_argument("-o", "--output-id", type=int, required=True, help="id of the step dataset to create")
    p.add_argument("-f", "--fold", default="0", help="fold of the model to extend")
    p.add_argument("--classes", nargs="+", default=None, help="add only these labels of the new dataset")
    p.add_argument("--name", default=None, help="base name of the new dataset")
    p.add_argument("-np", "--num-processes", type=int, default=1)
    p.add_argument("--no-teacher-memory", action="store_true",
                   help="do not compute the model's step memory when it is missing")
    p.add_argument("-device", "--device", default=None,
                   help="device of the step-memory pass: cuda, cuda:N, cpu or mps (default: cuda when a GPU is "
                        "present, else cpu)")
    a = p.parse_args(argv)
    # nnU-Net's planning and preprocessing talk on stdout; keep stdout for the JSON summary
    with contextlib.redirect_stdout(sys.stderr):
        summary = add_classes(a.model, a.dataset, a.output_id, a.fold, a.classes, a.name, a.num_processes,
                              not a.no_teacher_memory, a.device)
    print(json.dumps(summary, indent=2))
