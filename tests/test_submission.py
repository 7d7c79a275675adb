"""nnUNetv2_cimis_predict's label restoration and challenge naming (no model needed), and what make_scenario records.

The end-to-end test (a trained tiny model through nnU-Net's predictor, the Docker inference script, scoring with
NSD) is in tests/test_e2e_submission.py.
"""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.submission.conventions import CHALLENGES, canonical_class_name, find_inputs, get_convention
from nnunetv2_cimis.submission.labels import apply_mapping, label_mapping
from nnunetv2_cimis.submission.predict import predict_submission


def _json(labels, source=None):
    d = {"labels": {"background": 0, **labels}, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
    if source is not None:
        d["cimis"] = {"source_labels": source}
    return d


def test_label_mapping_source_global_and_challenge():
    # a scenario that learned spleen first: global spleen 1, liver 2, right kidney 3; FLARE22's values 3, 1, 2
    src = {"1": {"dataset": "Dataset022_FLARE22", "name": "spleen", "value": 3},
           "2": {"dataset": "Dataset022_FLARE22", "name": "liver", "value": 1},
           "3": {"dataset": "Dataset022_FLARE22", "name": "right kidney", "value": 2}}
    dj = _json({"spleen": 1, "liver": 2, "kidney_right": 3}, src)
    assert label_mapping(dj, "global")[0] == {1: 1, 2: 2, 3: 3}
    assert label_mapping(dj, "source")[0] == {1: 3, 2: 1, 3: 2}
    mapping, notes = label_mapping(dj, "flare22")
    assert mapping == {1: 3, 2: 1, 3: 2}  # kidney_right matched to FLARE22's "right kidney" by name
    assert any("does not segment" in n and "aorta" in n for n in notes)
    # BTCV numbers the same organs 1 (spleen), 6 (liver), 2 (right kidney)
    assert label_mapping(dj, "btcv")[0] == {1: 1, 2: 6, 3: 2}
    # KiTS19 has none of them: all background, said in a note
    mapping, notes = label_mapping(dj, "kits19")
    assert mapping == {1: 0, 2: 0, 3: 0} and "written as background" in notes[0]
    seg = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    assert apply_mapping(seg, {1: 3, 2: 1, 3: 2}).tolist() == [[0, 3, 1, 2]]


def test_label_mapping_errors_and_plain_models(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    # two sources whose values collide (a dataset sequence): no single "source" numbering
    src = {"1": {"dataset": "Dataset001_A", "name": "liver", "value": 1},
           "2": {"dataset": "Dataset002_B", "name": "kidney", "value": 1}}
    with pytest.raises(CIMISError, match="collide"):
        label_mapping(_json({"liver": 1, "kidney": 2}, src), "source")
    # step metadata without a record and without the source dataset: say what to use instead
    dj = _json({"liver": 1})
    dj["cimis"] = {"source_dataset": "Dataset003_Gone"}
    with pytest.raises(CIMISError, match="records no source label values"):
        label_mapping(dj, "source")
    # a plain nnU-Net model: its values are its source values
    mapping, notes = label_mapping(_json({"liver": 1, "spleen": 2}), "source")
    assert mapping == {1: 1, 2: 2} and "no step metadata" in notes[0]
    with pytest.raises(CIMISError, match="unknown challenge"):
        label_mapping(_json({"liver": 1}), "flare99")


def test_conventions_naming(tmp_path):
    assert canonical_class_name("Kidney_Right") == "right kidney"
    assert get_convention("KiTS19").output_name("case_00210") == "prediction_00210.nii.gz"
    assert get_convention("btcv").output_name("0061") == "label0061.nii.gz"
    assert get_convention("flare22").output_name("FLARE22_Ts_0001") == "FLARE22_Ts_0001.nii.gz"
    assert {"flare22", "kits23", "btcv", "amos", "word"} <= set(CHALLENGES)
    for c in CHALLENGES.values():  # every challenge's label map is the converter's and starts at background
        assert c.labels()["background"] == 0 and c.source
    (tmp_path / "btcv").mkdir()
    for n in ("img0061.nii.gz", "img0062.nii.gz", "notes.txt"):
        (tmp_path / "btcv" / n).write_bytes(b"")
    assert [c for c, _ in find_inputs(str(tmp_path / "btcv"), get_convention("btcv"), ".nii.gz", 1)] == ["0061", "0062"]
    kits = tmp_path / "kits"
    (kits / "case_00210").mkdir(parents=True)
    (kits / "case_00210" / "imaging.nii.gz").write_bytes(b"")
    (kits / "case_00211.nii.gz").write_bytes(b"")
    assert [c for c, _ in find_inputs(str(kits), get_convention("kits19"), ".nii.gz", 1)] == ["case_00210", "case_00211"]
    nn = tmp_path / "nn"
    nn.mkdir()
    for n in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz"):
        (nn / n).write_bytes(b"")
    with pytest.raises(CIMISError, match="b_0001.nii.gz"):
        find_inputs(str(nn), None, ".nii.gz", 2)
    assert find_inputs(str(nn), None, ".nii.gz", 1)[0][0] == "a"
    with pytest.raises(CIMISError, match="one image per case"):
        find_inputs(str(nn), get_convention("amos"), ".nii.gz", 2)
    with pytest.raises(CIMISError, match="no input image"):
        find_inputs(str(nn), get_convention("amos"), ".nii.gz", 1)


def test_relabel_existing_segmentations(tmp_path):
    """--segmentations: a folder of predictions in the scenario's values gets FLARE22's values and names, and the
    output folder holds nothing else."""
    model = tmp_path / "model"
    model.mkdir()
    src = {"1": {"dataset": "Dataset900_P", "name": "spleen", "value": 3},
           "2": {"dataset": "Dataset900_P", "name": "liver", "value": 1}}
    (model / "dataset.json").write_text(json.dumps(_json({"spleen": 1, "liver": 2}, src)))
    seg_dir = tmp_path / "segs"
    seg_dir.mkdir()
    arr = np.zeros((4, 5, 6), np.uint8)
    arr[0, :2] = 1
    arr[1, :3] = 2
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 2.0, 3.0))
    sitk.WriteImage(img, str(seg_dir / "FLARE22_Ts_0001.nii.gz"))
    out = tmp_path / "out"
    result = predict_submission(str(seg_dir), str(out), str(model), labels="source", segmentations=True)
    assert result["mapping"] == {1: 3, 2: 1} and result["files"] == ["FLARE22_Ts_0001.nii.gz"]
    written = sitk.ReadImage(str(out / "FLARE22_Ts_0001.nii.gz"))
    got = sitk.GetArrayFromImage(written)
    assert (got[arr == 1] == 3).all() and (got[arr == 2] == 1).all() and (got[arr == 0] == 0).all()
    assert written.GetSpacing() == pytest.approx((1.5, 2.0, 3.0))
    assert os.listdir(out) == ["FLARE22_Ts_0001.nii.gz"]  # the staging folder is gone
    with pytest.raises(CIMISError, match="--labels must be"):
        predict_submission(str(seg_dir), str(out), str(model), labels="pizza", segmentations=True)


def test_make_scenario_records_source_labels(tmp_path, monkeypatch):
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.scenarios.make_scenario import make_scenario
    for k in ("raw", "preprocessed", "results"):
        (tmp_path / k).mkdir()
        monkeypatch.setenv(f"nnUNet_{k}", str(tmp_path / k))
    write_abdominal_phantom(str(tmp_path / "raw"), 950, 8, shape=(16, 16, 16), organs=["liver", "spleen", "aorta"])
    # spleen and aorta first: global spleen 1, aorta 2, liver 3; the phantom's values are liver 1, spleen 2, aorta 3
    summary = make_scenario("950", "spleen,aorta;liver", [951, 952], 953, test_fraction=0.25, seed=0,
                            preprocess=False)
    for name in summary["step_datasets"] + [summary["joint_dataset"]]:
        with open(tmp_path / "raw" / name / "dataset.json") as f:
            dj = json.load(f)
        block = dj.get("cimis") or dj["cimis_joint"]
        assert block["source_labels"]["3"] == {"dataset": "Dataset950_AbdominalPhantom", "name": "liver", "value": 1}
    with open(tmp_path / "raw" / summary["step_datasets"][1] / "dataset.json") as f:
        assert label_mapping(json.load(f), "source")[0] == {1: 2, 2: 3, 3: 1}


def test_mirroring_follows_nnunet_default():
    """nnUNetv2_predict mirrors unless --disable_tta: so do evaluate (command and function) and predict."""
    import inspect

    from nnunetv2_cimis.evaluation import evaluate as ev
    from nnunetv2_cimis.submission.predict import build_parser
    assert ev.build_parser().parse_args(["-d", "1", "-o", "x"]).disable_tta is False
    assert ev.build_parser().parse_args(["-d", "1", "-o", "x", "--disable_tta"]).disable_tta is True
    assert inspect.signature(ev.evaluate_scenario).parameters["use_mirroring"].default is True
    assert inspect.signature(ev.predict_cases).parameters["use_mirroring"].default is True
    assert build_parser().parse_args(["-i", "a", "-o", "b"]).disable_tta is False


def test_export_packs_only_paths_inside_results(tmp_path):
    """A replay-model path read from a step memory may not leave nnUNet_results."""
    from nnunetv2_cimis.submission.export import _inside
    assert _inside(str(tmp_path), "Dataset001_A/x/fold_0/diffusion_model", "m") == \
        os.path.join(str(tmp_path), "Dataset001_A/x/fold_0/diffusion_model")
    for bad in ("../elsewhere", "/abs/path", "a/../../b", ""):
        with pytest.raises(CIMISError):
            _inside(str(tmp_path), bad, "step memory")
