"""End-to-end: nnUNetv2_plan_and_preprocess -> nnUNetv2_train -tr nnUNetTrainerIAPL -> nnUNetv2_predict,
for the 3d_fullres and the 2d configuration.

Tiny data (4 cases of 32^3, two foreground classes), a tiny plans copy (features 8..64), 1 epoch of 2
iterations, all in a temporary folder. Runs the real nnU-Net commands in subprocesses (2-4 minutes on 2
CPU cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nnunetv2_cimis

pytestmark = pytest.mark.e2e

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_IAPLTiny"
PLANS = "nnUNetPlansIAPLTiny"


def _write_case(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path))


def _fabricate_raw(raw: Path, n_cases: int = 4, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    ds = raw / DATASET_NAME
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    (ds / "imagesTs").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), 0)
    for i in range(n_cases + 1):
        label = np.zeros((size,) * 3, np.uint8)
        for cls, radius in ((1, 6), (2, 4)):
            centre = rng.integers(radius + 2, size - radius - 2, 3)
            label[((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius ** 2] = cls
        image = (rng.normal(0, 0.3, label.shape) + 1.0 * (label == 1) + 2.0 * (label == 2)).astype(np.float32)
        if i < n_cases:
            _write_case(ds / "imagesTr" / f"case{i:03d}_0000.nii.gz", image)
            _write_case(ds / "labelsTr" / f"case{i:03d}.nii.gz", label)
        else:
            _write_case(ds / "imagesTs" / f"test{i:03d}_0000.nii.gz", image)
    with open(ds / "dataset.json", "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "ball": 1, "bead": 2},
                   "numTraining": n_cases, "file_ending": ".nii.gz"}, f)


def _tiny_plans(preprocessed: Path) -> None:
    folder = preprocessed / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    for cfg in plans["configurations"].values():
        kw = cfg.get("architecture", {}).get("arch_kwargs")
        if kw:
            n = kw["n_stages"]
            kw["features_per_stage"] = [min(8 * 2 ** i, 64) for i in range(n)]
        cfg["batch_size"] = 2
    (folder / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))
    # 4 cases are too few for nnU-Net's 5-fold split: one explicit fold
    (folder / "splits_final.json").write_text(json.dumps(
        [{"train": ["case000", "case001", "case002"], "val": ["case003"]}]))


def _run(cmd, env, cwd):
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_plan_train_predict_iapl(tmp_path):
    raw, pre, res = tmp_path / "raw", tmp_path / "pre", tmp_path / "res"
    for p in (raw, pre, res):
        p.mkdir()
    _fabricate_raw(raw)
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
        "nnUNet_extTrainer": str(Path(nnunetv2_cimis.__file__).parent / "nnunet_trainers"),
        "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "false",
        "nnUNet_cimis_epochs": "1", "nnUNet_cimis_iterations": "2", "nnUNet_cimis_val_iterations": "1",
        "OMP_NUM_THREADS": "1",
    })
    env.pop("nnUNet_cimis_hparams", None)
    plan_env = dict(env, nnUNet_n_proc_DA="1")  # planning calls torch.set_num_threads(n_proc_DA): 0 fails
    _run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "2d", "-np", "1",
          "--verify_dataset_integrity"], plan_env, tmp_path)
    _tiny_plans(pre)
    import SimpleITK as sitk

    for configuration in ("3d_fullres", "2d"):
        out = _run([_bin("nnUNetv2_train"), str(DATASET_ID), configuration, "0", "-tr", "nnUNetTrainerIAPL",
                    "-p", PLANS, "-device", "cpu"], env, tmp_path)
        model = res / DATASET_NAME / f"nnUNetTrainerIAPL__{PLANS}__{configuration}"
        assert (model / "fold_0" / "checkpoint_final.pth").is_file(), out.stdout[-2000:]
        log = "".join(p.read_text() for p in (model / "fold_0").glob("training_log_*.txt"))
        assert "purity threshold: 0.100" in log  # 1 epoch: progress 0 -> start of the ramp
        summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
        assert "foreground_mean" in summary

        pred = tmp_path / f"pred_{configuration}"
        _run([_bin("nnUNetv2_predict"), "-i", str(raw / DATASET_NAME / "imagesTs"), "-o", str(pred), "-d",
              str(DATASET_ID), "-c", configuration, "-f", "0", "-tr", "nnUNetTrainerIAPL", "-p", PLANS,
              "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env, tmp_path)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "test004.nii.gz")))
        assert seg.shape == (32, 32, 32)
        assert set(np.unique(seg)) <= {0, 1, 2}
