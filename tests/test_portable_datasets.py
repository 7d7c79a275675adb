"""Portable step datasets (issue 12 point 5): a scenario's datasets reference their images relative to the
dataset folder (as nnU-Net resolves the ``dataset`` key), so moving ``nnUNet_raw`` keeps nnU-Net's integrity
check green and the test set readable."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from nnunetv2_cimis.scenarios.datasets import raw_relative


@pytest.fixture(scope="module")
def moved_scenario(tmp_path_factory):
    """Phantom -> scenario "2-1" (raw datasets only), then nnUNet_raw moved to another place."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _make_and_move(tmp_path_factory.mktemp("portable"), monkeypatch)


def _make_and_move(tmp_path, monkeypatch):
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.scenarios.make_scenario import make_scenario
    raw = tmp_path / "site_a" / "nnUNet_raw"
    for var, p in (("nnUNet_raw", raw), ("nnUNet_preprocessed", tmp_path / "pre"),
                   ("nnUNet_results", tmp_path / "res")):
        os.makedirs(p)
        monkeypatch.setenv(var, str(p))
    write_abdominal_phantom(str(raw), 950, 8, shape=(16, 16, 16), organs=["liver", "spleen", "aorta"])
    summary = make_scenario("950", "2-1", [951, 952], 953, test_fraction=0.25, seed=0, preprocess=False)
    datasets = summary["step_datasets"] + [summary["joint_dataset"]]
    written = {d: json.loads((raw / d / "dataset.json").read_text()) for d in datasets}
    moved = tmp_path / "site_b" / "data" / "nnUNet_raw"
    os.makedirs(moved.parent)
    shutil.move(str(raw), str(moved))
    shutil.rmtree(tmp_path / "site_a")
    monkeypatch.setenv("nnUNet_raw", str(moved))
    return moved, summary, datasets, written


def test_image_references_are_relative_to_the_dataset_folder(moved_scenario):
    moved, summary, datasets, written = moved_scenario
    for d in datasets:
        for case, files in written[d]["dataset"].items():
            for image in files["images"]:
                assert not os.path.isabs(image), image
                assert image.startswith("../Dataset950_"), image
            assert files["label"] == f"labelsTr/{case}.nii.gz"


def test_nnunet_integrity_check_after_moving_raw(moved_scenario):
    """nnU-Net's own resolution and integrity check on the moved folder (before: FileNotFoundError)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    moved, summary, datasets, written = moved_scenario
    for d in datasets:
        folder = str(moved / d)
        files = get_filenames_of_train_images_and_targets(folder)
        assert files and all(os.path.isfile(p) for f in files.values() for p in f["images"] + [f["label"]])
        assert all(p.startswith(str(moved)) for f in files.values() for p in f["images"])
        verify_dataset_integrity(folder, num_processes=1)


def test_nnunet_command_verifies_a_moved_step_dataset(moved_scenario):
    """The real command line, as a user runs it after moving the folder."""
    moved, summary, datasets, written = moved_scenario
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_extract_fingerprint")
    proc = subprocess.run([exe, "-d", "952", "--verify_dataset_integrity", "-np", "1"],
                          env=dict(os.environ, nnUNet_raw=str(moved), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FileNotFoundError" not in proc.stderr


def test_test_set_survives_the_move(moved_scenario):
    from nnunetv2_cimis.evaluation.evaluate import load_test_set
    from nnunetv2_cimis.scenarios.step_metadata import read_step_info
    moved, summary, datasets, written = moved_scenario
    step0 = moved / summary["step_datasets"][0]
    info = read_step_info(json.loads((moved / summary["step_datasets"][1] / "dataset.json").read_text()))
    raw_entries = json.loads((step0 / "test_set.json").read_text())["cases"]
    assert all(not os.path.isabs(p) for e in raw_entries.values() for p in e["images"] + [e["label"]])
    test_set = load_test_set(info.test_set, str(step0))
    assert test_set["cases"]
    for entry in test_set["cases"].values():
        assert all(os.path.isfile(p) for p in entry["images"] + [entry["label"]])


def test_raw_relative(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    folder = raw / "Dataset951_XStep0"
    assert raw_relative(str(raw / "Dataset950_X" / "imagesTr" / "a_0000.nii.gz"), str(folder)) == \
        os.path.join("..", "Dataset950_X", "imagesTr", "a_0000.nii.gz")
    outside = str(tmp_path / "elsewhere" / "a_0000.nii.gz")
    assert raw_relative(outside, str(folder)) == outside  # does not move with nnUNet_raw: stays absolute
    monkeypatch.delenv("nnUNet_raw")
    assert raw_relative(str(raw / "a.nii.gz"), str(folder)) == str(raw / "a.nii.gz")
