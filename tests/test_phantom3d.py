"""Tests of the synthetic 3D abdominal CT phantom and its command."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.phantom import abdominal3d
from nnunetv2_cimis.phantom.abdominal3d import ORGANS, make_abdominal_case, write_abdominal_phantom
from nnunetv2_cimis.phantom.cli import main as phantom_main


def _read(path):
    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img), img.GetSpacing()


def test_write_dataset_files_geometry_and_json(tmp_path):
    out = write_abdominal_phantom(str(tmp_path), 901, 3, shape=(32, 32, 32), spacing=(1.5, 1.5, 1.5), seed=0)
    assert out == os.path.join(str(tmp_path), "Dataset901_AbdominalPhantom")
    dj = json.load(open(os.path.join(out, "dataset.json")))
    assert dj["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(ORGANS)}}
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    assert dj["channel_names"] == {"0": "CT"}
    cases = sorted(os.listdir(os.path.join(out, "labelsTr")))
    assert cases == [f"phantom_{i:03d}.nii.gz" for i in range(3)]
    for c in cases:
        img, sp_img = _read(os.path.join(out, "imagesTr", c.replace(".nii.gz", "_0000.nii.gz")))
        lab, sp_lab = _read(os.path.join(out, "labelsTr", c))
        assert img.shape == lab.shape == (32, 32, 32)
        assert sp_img == sp_lab == (1.5, 1.5, 1.5)
        assert lab.dtype == np.uint8
        # every organ present, nothing outside the label set
        assert set(np.unique(lab)) == set(range(len(ORGANS) + 1))


def test_anisotropic_spacing_written_in_array_order(tmp_path):
    out = write_abdominal_phantom(str(tmp_path), 902, 1, shape=(16, 32, 24), spacing=(3.0, 1.5, 1.0))
    img, spacing = _read(os.path.join(out, "imagesTr", "phantom_000_0000.nii.gz"))
    assert img.shape == (16, 32, 24)
    assert spacing == (1.0, 1.5, 3.0)  # SimpleITK reports (x, y, z): the array order reversed


def test_deterministic_by_seed_and_cases_vary():
    a_img, a_lab, _ = make_abdominal_case((32, 32, 32), seed=3, case_index=0)
    b_img, b_lab, _ = make_abdominal_case((32, 32, 32), seed=3, case_index=0)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab, _ = make_abdominal_case((32, 32, 32), seed=3, case_index=1)
    d_img, d_lab, _ = make_abdominal_case((32, 32, 32), seed=4, case_index=0)
    for other in (c_lab, d_lab):
        assert (other != a_lab).mean() > 0.005
    # organ volumes vary between cases by more than a few voxels
    vols = np.array([[(make_abdominal_case((32, 32, 32), 0, i)[1] == v).sum() for v in range(1, 9)]
                     for i in range(4)])
    assert (vols.max(0) - vols.min(0) > 3).all()


def test_files_deterministic(tmp_path):
    a = write_abdominal_phantom(str(tmp_path / "a"), 903, 2, seed=7)
    b = write_abdominal_phantom(str(tmp_path / "b"), 903, 2, seed=7)
    for sub, name in (("imagesTr", "phantom_001_0000.nii.gz"), ("labelsTr", "phantom_001.nii.gz")):
        np.testing.assert_array_equal(_read(os.path.join(a, sub, name))[0], _read(os.path.join(b, sub, name))[0])


def test_intensities_in_plausible_ranges():
    img, lab, labels = make_abdominal_case((48, 48, 48), seed=0, case_index=0, noise_std=0.0)
    # air outside the body, organs at their nominal HU without noise
    assert img[0, 0, 0] == pytest.approx(abdominal3d.AIR_HU)
    for name, value in labels.items():
        if name in ("background", "stomach", "liver"):
            continue
        np.testing.assert_allclose(img[lab == value], abdominal3d.ORGAN_HU[name])
    liver_values = img[lab == labels["liver"]]
    assert set(np.unique(liver_values)) == {abdominal3d.ORGAN_HU["liver"], abdominal3d.LIVER_VESSEL_HU}
    assert 0.01 < np.mean(liver_values == abdominal3d.LIVER_VESSEL_HU) < 0.2  # vessels: a small share
    stomach = img[lab == labels["stomach"]]
    assert set(np.unique(stomach)) == {abdominal3d.AIR_HU_STOMACH, abdominal3d.ORGAN_HU["stomach"]}
    img_n, lab_n, _ = make_abdominal_case((48, 48, 48), seed=0, case_index=0, noise_std=10.0)
    np.testing.assert_array_equal(lab, lab_n)
    spleen = img_n[lab == labels["spleen"]]
    assert abs(spleen.mean() - abdominal3d.ORGAN_HU["spleen"]) < 3.0 and 8.0 < spleen.std() < 12.0
    assert img_n.min() > -1100 and img_n.max() < 500


def test_anatomy_sides():
    """Liver on the patient's right (low x index), spleen on the left; kidneys posterior of the aorta's front."""
    _, lab, labels = make_abdominal_case((32, 32, 32), seed=1, case_index=2)
    x_of = {n: np.nonzero(lab == v)[2].mean() for n, v in labels.items() if n != "background"}
    assert x_of["liver"] < 16 < x_of["spleen"]
    assert x_of["kidney_right"] < 16 < x_of["kidney_left"]
    # the aorta spans (nearly) the whole cranio-caudal extent
    assert len(np.unique(np.nonzero(lab == labels["aorta"])[0])) >= 28


def test_subset_of_organs_and_bad_arguments(tmp_path):
    _, lab, labels = make_abdominal_case((32, 32, 32), organs=["spleen", "liver"])
    assert labels == {"background": 0, "liver": 1, "spleen": 2}
    assert set(np.unique(lab)) == {0, 1, 2}
    with pytest.raises(CIMISError, match="organs"):
        make_abdominal_case((32, 32, 32), organs=["heart"])
    with pytest.raises(CIMISError, match="shape"):
        make_abdominal_case((32, 32))
    with pytest.raises(CIMISError, match="spacing"):
        write_abdominal_phantom(str(tmp_path), 904, 1, spacing=(1.0, 0.0, 1.0))
    write_abdominal_phantom(str(tmp_path), 905, 1)
    with pytest.raises(CIMISError, match="already"):
        write_abdominal_phantom(str(tmp_path), 905, 1, dataset_name="Other")
    with pytest.raises(CIMISError, match="already exists"):
        write_abdominal_phantom(str(tmp_path), 905, 1)
    write_abdominal_phantom(str(tmp_path), 905, 2, overwrite=True)
    assert len(os.listdir(tmp_path / "Dataset905_AbdominalPhantom" / "labelsTr")) == 2


def test_64_cubed_and_speed():
    import time
    t = time.perf_counter()
    _, lab, _ = make_abdominal_case((64, 64, 64), seed=0, case_index=0)
    assert set(np.unique(lab)) == set(range(9))
    assert time.perf_counter() - t < 5.0


def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    phantom_main(["-d", "906", "-n", "2", "--shape", "16", "24", "24", "--spacing", "2", "1", "1",
                  "--seed", "1"])
    out = tmp_path / "Dataset906_AbdominalPhantom"
    img, spacing = _read(str(out / "imagesTr" / "phantom_001_0000.nii.gz"))
    assert img.shape == (16, 24, 24) and spacing == (1.0, 1.0, 2.0)
    with pytest.raises(SystemExit) as e:
        phantom_main(["-d", "906", "-n", "2"])
    assert e.value.code == 2 and "already taken" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(SystemExit) as e:
        phantom_main(["-d", "907", "-n", "2"])
    assert e.value.code == 2 and "nnUNet_raw" in capsys.readouterr().err


def test_cli_laparoscopic_dispatch(tmp_path, monkeypatch, capsys):
    import sys
    import types
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    calls = []
    fake = types.ModuleType("nnunetv2_cimis.phantom.laparoscopic2d")
    fake.write_laparoscopic_phantom = lambda raw, did, n, seed, **kw: calls.append((raw, did, n, seed, kw)) or "x"
    monkeypatch.setitem(sys.modules, "nnunetv2_cimis.phantom.laparoscopic2d", fake)
    phantom_main(["-d", "908", "-n", "3", "--kind", "laparoscopic2d", "--seed", "5"])
    assert calls == [(str(tmp_path), 908, 3, 5, {})]
    # module absent: a clear error, exit status 2
    monkeypatch.setitem(sys.modules, "nnunetv2_cimis.phantom.laparoscopic2d", None)
    with pytest.raises(SystemExit) as e:
        phantom_main(["-d", "908", "-n", "2", "--kind", "laparoscopic2d"])
    assert e.value.code == 2 and "laparoscopic2d" in capsys.readouterr().err
