"""Dataset converters (dataset_conversion/): miniature replicas of each download's raw layout (same folder and
file names, 8x8x6 volumes), converted and checked; bad inputs; nnU-Net's own verify_dataset_integrity."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from e2e_utils import in_process_multiprocessing
from nnunetv2_cimis.dataset_conversion import amos, btcv, common, dsad, flare21, flare22, kits19, kits23, msd, word
from nnunetv2_cimis.errors import CIMISError

SHAPE_ZYX = (6, 8, 8)
SPACING = (0.8, 0.7, 2.5)
ORIGIN = (-10.0, 5.0, 30.0)


# ----------------------------------------------------------------------------------------------- fabrication
def write_nifti(path: Path, arr: np.ndarray, spacing=SPACING, origin=ORIGIN) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), True)


def image_array(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-100, 300, SHAPE_ZYX).astype(np.int16)


def label_array(num_classes: int, seed: int) -> np.ndarray:
    """Every class 0..num_classes at least once (num_classes <= 6*8*8), rest random."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, num_classes + 1, SHAPE_ZYX).astype(np.uint8)
    lab.ravel()[: num_classes + 1] = np.arange(num_classes + 1)
    return lab


def fab_pair(img_path: Path, lab_path: Path, num_classes: int, seed: int):
    write_nifti(img_path, image_array(seed))
    lab = label_array(num_classes, seed)
    if lab_path is not None:
        write_nifti(lab_path, lab)
    return lab


def fab_btcv(root: Path):
    r = root / "RawData"
    labs = {f"BTCV_{n}": fab_pair(r / f"Training/img/img{n}.nii.gz", r / f"Training/label/label{n}.nii.gz", 13, i)
            for i, n in enumerate(["0001", "0002"])}
    write_nifti(r / "Testing/img/img0061.nii.gz", image_array(9))
    return labs, ["BTCV_0061"], {}


def fab_flare21(root: Path):
    labs = {f"FLARE21_train_{n}": fab_pair(root / f"TrainingImg/train_{n}_0000.nii.gz",
                                           root / f"TrainingMask/train_{n}.nii.gz", 4, i)
            for i, n in enumerate(["000", "001"])}
    write_nifti(root / "ValidationImg/validation_001_0000.nii.gz", image_array(9))
    return labs, ["FLARE21_validation_001"], {}


def fab_flare22(root: Path):
    r = root / "FLARE22Train"
    labs = {f"FLARE22_Tr_{n}": fab_pair(r / f"images/FLARE22_Tr_{n}_0000.nii.gz", r / f"labels/FLARE22_Tr_{n}.nii.gz",
                                        13, i) for i, n in enumerate(["0001", "0002"])}
    return labs, [], {}


def fab_kits(root: Path, sub: str, num_classes: int):
    labs = {c: fab_pair(root / sub / c / "imaging.nii.gz", root / sub / c / "segmentation.nii.gz", num_classes, i)
            for i, c in enumerate(["case_00000", "case_00001"])}
    write_nifti(root / sub / "case_00210" / "imaging.nii.gz", image_array(9))
    return labs, ["case_00210"], {}


def fab_kits19(root):
    return fab_kits(root, "data", 2)


def fab_kits23(root):
    labs, test, _ = fab_kits(root, "dataset", 3)
    (root / "dataset/case_00000/instances").mkdir()
    return labs, test, {}


def fab_amos(root: Path):
    r = root / "amos22"
    labs = {"amos_0001": fab_pair(r / "imagesTr/amos_0001.nii.gz", r / "labelsTr/amos_0001.nii.gz", 15, 1),
            "amos_0002": fab_pair(r / "imagesVa/amos_0002.nii.gz", r / "labelsVa/amos_0002.nii.gz", 15, 2)}
    fab_pair(r / "imagesTr/amos_0507.nii.gz", r / "labelsTr/amos_0507.nii.gz", 13, 3)  # MRI: left out by default
    write_nifti(r / "imagesTs/amos_0003.nii.gz", image_array(9))
    official = ["spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach", "arota",
                "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
                "prostate/uterus"]
    (r / "dataset.json").write_text(json.dumps({"labels": {str(i): n for i, n in
                                                           enumerate(["background"] + official)}}))
    return labs, ["amos_0003"], {}


def fab_word(root: Path):
    r = root / "WORD-V0.1.0"
    labs = {"word_0002": fab_pair(r / "imagesTr/word_0002.nii.gz", r / "labelsTr/word_0002.nii.gz", 16, 1),
            "word_0010": fab_pair(r / "imagesVal/word_0010.nii.gz", r / "labelsVal/word_0010.nii.gz", 16, 2)}
    test_labs = {"word_0020": fab_pair(r / "imagesTs/word_0020.nii.gz", r / "labelsTs/word_0020.nii.gz", 16, 3)}
    return labs, ["word_0020"], test_labs


DATASETS = {
    # module, fabricate, folder name, label map
    "btcv": (btcv, fab_btcv, "Dataset501_BTCV"),
    "flare21": (flare21, fab_flare21, "Dataset501_FLARE21"),
    "flare22": (flare22, fab_flare22, "Dataset501_FLARE22"),
    "kits19": (kits19, fab_kits19, "Dataset501_KiTS19"),
    "kits23": (kits23, fab_kits23, "Dataset501_KiTS23"),
    "amos": (amos, fab_amos, "Dataset501_AMOS"),
    "word": (word, fab_word, "Dataset501_WORD"),
}


@pytest.fixture
def raw(tmp_path, monkeypatch):
    r = tmp_path / "nnUNet_raw"
    r.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(r))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)  # the id check looks there too
    monkeypatch.delenv("nnUNet_results", raising=False)
    return r


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


# ----------------------------------------------------------------------------------------------- good input
@pytest.mark.parametrize("key", sorted(DATASETS))
def test_convert_miniature(key, tmp_path, raw):
    module, fab, folder = DATASETS[key]
    src = tmp_path / "download"
    labs, test_ids, test_labs = fab(src)
    out = module.convert(src, 501)
    assert out == raw / folder
    assert sorted(os.listdir(raw)) == [folder]  # no temporary folder left
    dj = json.loads((out / "dataset.json").read_text())
    lm = json.loads((Path(common.__file__).parent / "label_maps" / f"{key}.json").read_text())
    expected_labels = lm["labels"]
    if key == "kits23":  # default form: regions
        expected_labels = lm["regions"]["labels"]
        assert dj["regions_class_order"] == [1, 3, 2]
    assert dj["labels"] == expected_labels
    assert dj["numTraining"] == len(labs)
    assert dj["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == sorted(f"{k}.nii.gz" for k in labs)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(f"{k}_0000.nii.gz" for k in labs)
    if test_ids:
        assert sorted(p.name for p in (out / "imagesTs").iterdir()) == sorted(f"{k}_0000.nii.gz" for k in test_ids)
    else:
        assert not (out / "imagesTs").exists()
    for k, lab in {**labs, **test_labs}.items():
        split = "labelsTs" if k in test_labs else "labelsTr"
        img = read(out / split / f"{k}.nii.gz")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), lab)
        np.testing.assert_allclose(img.GetSpacing(), SPACING)
        np.testing.assert_allclose(img.GetOrigin(), ORIGIN)
        image = read(out / split.replace("labels", "images") / f"{k}_0000.nii.gz")
        assert image.GetSize() == img.GetSize() == SHAPE_ZYX[::-1]


def test_amos_modality_selection(tmp_path, raw):
    fab_amos(tmp_path / "dl")
    out = amos.convert(tmp_path / "dl", 502, modality="mri")
    assert sorted(os.listdir(out / "labelsTr")) == ["amos_0507.nii.gz"]
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI"} and not (out / "imagesTs").exists()
    out = amos.convert(tmp_path / "dl", 503, modality="all")
    assert sorted(os.listdir(out / "labelsTr")) == ["amos_0001.nii.gz", "amos_0002.nii.gz", "amos_0507.nii.gz"]
    with pytest.raises(CIMISError, match="modality"):
        amos.convert(tmp_path / "dl", 504, modality="pet")


def test_amos_wrong_source_dataset_json(tmp_path, raw):
    fab_amos(tmp_path / "dl")
    (tmp_path / "dl/amos22/dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    with pytest.raises(CIMISError, match="dataset.json lists labels"):
        amos.convert(tmp_path / "dl", 502)


def test_kits23_plain_labels_form(tmp_path, raw):
    fab_kits23(tmp_path / "dl")
    out = kits23.convert(tmp_path / "dl", 505, form="labels")
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    assert "regions_class_order" not in dj and dj["kits23_form"] == "labels"
    with pytest.raises(CIMISError, match="form"):
        kits23.convert(tmp_path / "dl", 506, form="nested")


def test_kits19_value_3_is_unknown(tmp_path, raw):
    """KiTS19 has no cyst: a KiTS23 segmentation (value 3) given to the KiTS19 converter is refused."""
    fab_kits(tmp_path / "dl", "data", 3)
    with pytest.raises(CIMISError, match=r"case_00000/segmentation.nii.gz holds value\(s\) \[3\]"):
        kits19.convert(tmp_path / "dl", 507)
    assert os.listdir(raw) == []


def test_input_may_be_the_inner_folder(tmp_path, raw):
    fab_btcv(tmp_path / "dl")
    out = btcv.convert(tmp_path / "dl" / "RawData", 508, name="BTCVinner")
    assert out.name == "Dataset508_BTCVinner"


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_input_folder(tmp_path, raw):
    with pytest.raises(CIMISError, match=r"folder .*nowhere does not exist"):
        btcv.convert(tmp_path / "nowhere", 501)


@pytest.mark.parametrize("key", sorted(DATASETS))
def test_mislaid_input_folder(key, tmp_path, raw):
    """The download's content one folder too deep under an unexpected name: not found, nothing written."""
    module, fab, _ = DATASETS[key]
    fab(tmp_path / "dl" / "unexpected" / "deeper")
    with pytest.raises(CIMISError, match="does not look like|expected"):
        module.convert(tmp_path / "dl", 501)
    assert os.listdir(raw) == []


def test_grid_mismatch_names_the_label(tmp_path, raw):
    fab_btcv(tmp_path / "dl")
    bad = tmp_path / "dl/RawData/Training/label/label0002.nii.gz"
    write_nifti(bad, np.zeros((6, 8, 7), np.uint8))
    with pytest.raises(CIMISError, match=r"label0002.nii.gz and its image have different grids: shape"):
        btcv.convert(tmp_path / "dl", 501)
    assert os.listdir(raw) == []


def test_spacing_mismatch_is_reported(tmp_path, raw):
    fab_flare21(tmp_path / "dl")
    write_nifti(tmp_path / "dl/TrainingMask/train_001.nii.gz", label_array(4, 1), spacing=(0.8, 0.7, 5.0))
    with pytest.raises(CIMISError, match=r"train_001.nii.gz and its image have different grids: spacing"):
        flare21.convert(tmp_path / "dl", 501)
    assert os.listdir(raw) == []


def test_unknown_label_value_names_the_file(tmp_path, raw):
    fab_flare22(tmp_path / "dl")
    lab = label_array(13, 0)
    lab[0, 0, 0] = 14
    write_nifti(tmp_path / "dl/FLARE22Train/labels/FLARE22_Tr_0002.nii.gz", lab)
    with pytest.raises(CIMISError, match=r"FLARE22_Tr_0002.nii.gz holds value\(s\) \[14\]"):
        flare22.convert(tmp_path / "dl", 501)
    assert os.listdir(raw) == []


def test_label_without_image(tmp_path, raw):
    fab_word(tmp_path / "dl")
    write_nifti(tmp_path / "dl/WORD-V0.1.0/labelsTr/word_0099.nii.gz", label_array(16, 5))
    with pytest.raises(CIMISError, match=r"word_0099.nii.gz has no image"):
        word.convert(tmp_path / "dl", 501)
    assert os.listdir(raw) == []


def test_training_image_without_label(tmp_path, raw):
    fab_btcv(tmp_path / "dl")
    write_nifti(tmp_path / "dl/RawData/Training/img/img0003.nii.gz", image_array(3))
    with pytest.raises(CIMISError, match=r"img0003.nii.gz has no label file"):
        btcv.convert(tmp_path / "dl", 501)


def test_kits_segmentation_without_imaging(tmp_path, raw):
    fab_kits19(tmp_path / "dl")
    write_nifti(tmp_path / "dl/data/case_00005/segmentation.nii.gz", label_array(2, 5))
    with pytest.raises(CIMISError, match=r"case_00005/segmentation.nii.gz has no image"):
        kits19.convert(tmp_path / "dl", 501)


def test_unreadable_image(tmp_path, raw):
    fab_flare21(tmp_path / "dl")
    (tmp_path / "dl/TrainingImg/train_001_0000.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(CIMISError, match=r"cannot read .*train_001_0000.nii.gz"):
        flare21.convert(tmp_path / "dl", 501)
    assert os.listdir(raw) == []


def test_unexpected_file_name(tmp_path, raw):
    fab_btcv(tmp_path / "dl")
    write_nifti(tmp_path / "dl/RawData/Training/img/scan_a.nii.gz", image_array(3))
    with pytest.raises(CIMISError, match=r"unexpected file .*scan_a.nii.gz"):
        btcv.convert(tmp_path / "dl", 501)


def test_id_taken_and_overwrite(tmp_path, raw):
    fab_btcv(tmp_path / "dl")
    btcv.convert(tmp_path / "dl", 501)
    with pytest.raises(CIMISError, match="already taken.*--overwrite"):
        btcv.convert(tmp_path / "dl", 501)
    fab_flare21(tmp_path / "fl")
    with pytest.raises(CIMISError, match="already taken"):
        flare21.convert(tmp_path / "fl", 501, overwrite=True)  # same id, other name: never overwritten
    (raw / "Dataset501_BTCV" / "marker").write_text("old")
    btcv.convert(tmp_path / "dl", 501, overwrite=True)
    assert not (raw / "Dataset501_BTCV" / "marker").exists()
    assert sorted(os.listdir(raw)) == ["Dataset501_BTCV"]


def test_failed_overwrite_keeps_the_old_dataset(tmp_path, raw):
    fab_btcv(tmp_path / "dl")
    btcv.convert(tmp_path / "dl", 501)
    write_nifti(tmp_path / "dl/RawData/Training/label/label0002.nii.gz", np.full(SHAPE_ZYX, 20, np.uint8))
    with pytest.raises(CIMISError):
        btcv.convert(tmp_path / "dl", 501, overwrite=True)
    assert sorted(os.listdir(raw)) == ["Dataset501_BTCV"]
    assert len(os.listdir(raw / "Dataset501_BTCV" / "labelsTr")) == 2


def test_id_taken_in_preprocessed(tmp_path, raw, monkeypatch):
    (tmp_path / "pre" / "Dataset501_Other").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    fab_btcv(tmp_path / "dl")
    with pytest.raises(CIMISError, match=r"already used in \$nnUNet_preprocessed: Dataset501_Other"):
        btcv.convert(tmp_path / "dl", 501)
    assert os.listdir(raw) == []


def test_bad_output_id(tmp_path, raw):
    fab_btcv(tmp_path / "dl")
    with pytest.raises(CIMISError, match="1..999"):
        btcv.convert(tmp_path / "dl", 1000)


def test_nnunet_raw_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    fab_btcv(tmp_path / "dl")
    with pytest.raises(CIMISError, match="nnUNet_raw is not set"):
        btcv.convert(tmp_path / "dl", 501)


def test_cli_exit_code_and_message(tmp_path, raw, capsys):
    with pytest.raises(SystemExit) as e:
        btcv.main(["--input", str(tmp_path / "nowhere"), "--output-id", "501"])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    fab_kits23(tmp_path / "dl")
    kits23.main(["--input", str(tmp_path / "dl"), "--output-id", "502", "--form", "labels"])
    assert "wrote" in capsys.readouterr().out
    assert (raw / "Dataset502_KiTS23" / "dataset.json").is_file()


# ----------------------------------------------------------------------------------------------- MSD
def fab_msd_prostate(root: Path):
    """Task05_Prostate: 2 channels (T2, ADC) in 4D files, labels PZ/TZ, a macOS '._' file to skip."""
    r = root / "Task05_Prostate"
    chans = {}
    for i, c in enumerate(["prostate_00", "prostate_01"]):
        arr = np.stack([image_array(10 * i), image_array(10 * i + 1)])  # (c, z, y, x)
        img = sitk.GetImageFromArray(arr, isVector=False)
        img.SetSpacing(SPACING + (1.0,))
        img.SetOrigin(ORIGIN + (0.0,))
        (r / "imagesTr").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(r / "imagesTr" / f"{c}.nii.gz"), True)
        chans[c] = arr
        write_nifti(r / "labelsTr" / f"{c}.nii.gz", label_array(2, i))
    (r / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"\x00")
    (r / "imagesTs").mkdir()
    img = sitk.GetImageFromArray(np.stack([image_array(7), image_array(8)]), isVector=False)
    sitk.WriteImage(img, str(r / "imagesTs" / "prostate_03.nii.gz"), True)
    (r / "dataset.json").write_text(json.dumps({
        "name": "PROSTATE", "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "training": [], "test": []}))
    return r, chans


def test_msd_4d_split_into_channels(tmp_path, raw):
    task, chans = fab_msd_prostate(tmp_path / "dl")
    out = msd.convert(task, 510)
    assert out.name == "Dataset510_Prostate"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T2", "1": "ADC"}
    assert dj["labels"] == {"background": 0, "PZ": 1, "TZ": 2} and dj["numTraining"] == 2
    assert sorted(os.listdir(out / "imagesTr")) == ["prostate_00_0000.nii.gz", "prostate_00_0001.nii.gz",
                                                     "prostate_01_0000.nii.gz", "prostate_01_0001.nii.gz"]
    assert sorted(os.listdir(out / "imagesTs")) == ["prostate_03_0000.nii.gz", "prostate_03_0001.nii.gz"]
    for c, arr in chans.items():
        for ch in range(2):
            img = read(out / "imagesTr" / f"{c}_{ch:04d}.nii.gz")
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr[ch])
            np.testing.assert_allclose(img.GetSpacing(), SPACING)


def test_msd_3d_task_and_label_check(tmp_path, raw):
    r = tmp_path / "dl" / "Task09_Spleen"
    fab_pair(r / "imagesTr/spleen_2.nii.gz", r / "labelsTr/spleen_2.nii.gz", 1, 0)
    (r / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}}))
    out = msd.convert(r, 511, name="MSDSpleen")
    assert out.name == "Dataset511_MSDSpleen"
    assert os.listdir(out / "imagesTr") == ["spleen_2_0000.nii.gz"]
    (r / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"}}))
    with pytest.raises(CIMISError, match="official Task09_Spleen"):
        msd.convert(r, 512)
    (r / "dataset.json").unlink()
    with pytest.raises(CIMISError, match="dataset.json"):
        msd.convert(r, 512)


def test_msd_wrong_channel_count(tmp_path, raw):
    task, _ = fab_msd_prostate(tmp_path / "dl")
    dj = json.loads((task / "dataset.json").read_text())
    dj["modality"] = {"0": "T2"}
    (task / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(CIMISError, match=r"prostate_00.nii.gz has 2 channel\(s\).*1 modalities"):
        msd.convert(task, 513)
    assert os.listdir(raw) == []


# ----------------------------------------------------------------------------------------------- DSAD
STRUCTURES = ["abdominal_wall", "colon", "inferior_mesenteric_artery", "intestinal_veins", "liver", "pancreas",
              "small_intestine", "spleen", "stomach", "ureter", "vesicular_glands"]
H, W = 10, 12


def png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3)).astype(np.uint8)


def fab_dsad(root: Path):
    """multilabel/01: frame 00 with all 11 masks (liver rows 0-2, stomach rows 2-4: row 2 overlaps),
    frame 01 with only the colon mask. liver/01: one single-structure frame."""
    ml = root / "multilabel" / "01"
    png(ml / "image00.png", rgb(0))
    png(ml / "image01.png", rgb(1))
    for s in STRUCTURES:
        m = np.zeros((H, W), np.uint8)
        if s == "liver":
            m[0:3] = 255
        if s == "stomach":
            m[2:5] = 255
        png(ml / f"mask00_{s}.png", m)
    colon = np.zeros((H, W), np.uint8)
    colon[:, :4] = 255
    png(ml / "mask01_colon.png", colon)
    png(root / "liver" / "01" / "image00.png", rgb(2))
    liver = np.zeros((H, W), np.uint8)
    liver[5:] = 255
    png(root / "liver" / "01" / "mask00.png", liver)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_dsad_merge_rule(tmp_path, raw):
    fab_dsad(tmp_path / "dl")
    out = dsad.convert(tmp_path / "dl", 520)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"]["ignore"] == 12 and dj["labels"]["liver"] == 5 and dj["labels"]["stomach"] == 9
    assert dj["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dj["file_ending"] == ".png"
    assert dj["overwrite_image_reader_writer"] == "NaturalImage2DIO" and dj["numTraining"] == 2
    np.testing.assert_array_equal(read_png(out / "imagesTr/DSAD_multilabel_01_00_0000.png"), rgb(0))
    full = read_png(out / "labelsTr/DSAD_multilabel_01_00.png")
    expected = np.zeros((H, W), np.uint8)
    expected[0:2], expected[2], expected[3:5] = 5, 12, 9  # overlap row 2 -> ignore; rest background (all annotated)
    np.testing.assert_array_equal(full, expected)
    partial = read_png(out / "labelsTr/DSAD_multilabel_01_01.png")
    expected = np.full((H, W), 12, np.uint8)  # 10 structures not annotated: unlabelled pixels unknown
    expected[:, :4] = 2
    np.testing.assert_array_equal(partial, expected)


def test_dsad_alternative_rules_and_single_source(tmp_path, raw):
    fab_dsad(tmp_path / "dl")
    out = dsad.convert(tmp_path / "dl", 521, source="all", overlap="priority", unannotated="background")
    dj = json.loads((out / "dataset.json").read_text())
    assert "ignore" not in dj["labels"] and dj["numTraining"] == 3
    full = read_png(out / "labelsTr/DSAD_multilabel_01_00.png")
    assert (full[0:3] == 5).all() and (full[3:5] == 9).all() and (full[5:] == 0).all()  # liver (5) beats stomach
    single = read_png(out / "labelsTr/DSAD_liver_01_00.png")
    assert (single[5:] == 5).all() and (single[:5] == 0).all()
    out = dsad.convert(tmp_path / "dl", 522, source="single")
    single = read_png(out / "labelsTr/DSAD_liver_01_00.png")
    assert (single[5:] == 5).all() and (single[:5] == 12).all()


def test_dsad_merge_masks_unit():
    a = np.array([[1, 1, 0]], bool)
    b = np.array([[0, 1, 1]], bool)
    np.testing.assert_array_equal(dsad.merge_masks({3: a, 7: b}, 2, 12), [[3, 12, 7]])
    np.testing.assert_array_equal(dsad.merge_masks({3: a, 7: b}, 2, 12, overlap="priority"), [[3, 3, 7]])
    np.testing.assert_array_equal(dsad.merge_masks({3: a}, 2, 12), [[3, 3, 12]])
    np.testing.assert_array_equal(dsad.merge_masks({3: a}, 2, 12, unannotated="background"), [[3, 3, 0]])


@pytest.mark.parametrize("case", ["mask_without_image", "bad_value", "bad_size", "unknown_structure",
                                  "image_without_mask", "grey_image"])
def test_dsad_bad_input(case, tmp_path, raw):
    fab_dsad(tmp_path / "dl")
    ml = tmp_path / "dl/multilabel/01"
    if case == "mask_without_image":
        png(ml / "mask07_liver.png", np.zeros((H, W), np.uint8))
        match = r"mask07_liver.png has no image"
    elif case == "bad_value":
        png(ml / "mask00_colon.png", np.full((H, W), 128, np.uint8))
        match = r"mask00_colon.png holds value\(s\) \[128\]"
    elif case == "bad_size":
        png(ml / "mask00_colon.png", np.zeros((H + 1, W), np.uint8))
        match = r"mask00_colon.png has size"
    elif case == "unknown_structure":
        png(ml / "mask00_uterus.png", np.zeros((H, W), np.uint8))
        match = r"mask00_uterus.png names an unknown structure"
    elif case == "image_without_mask":
        png(ml / "image05.png", rgb(5))
        match = r"image05.png has no mask"
    else:
        png(ml / "image01.png", rgb(1)[..., 0])
        match = r"image01.png has PIL mode 'L'"
    with pytest.raises(CIMISError, match=match):
        dsad.convert(tmp_path / "dl", 523)
    assert os.listdir(raw) == []


def test_dsad_missing_layout(tmp_path, raw):
    (tmp_path / "dl").mkdir()
    with pytest.raises(CIMISError, match="multilabel"):
        dsad.convert(tmp_path / "dl", 524)
    with pytest.raises(CIMISError, match="no single-structure folder"):
        dsad.convert(tmp_path / "dl", 524, source="single")


# ----------------------------------------------------------------------------------------------- nnU-Net check
def test_nnunet_verify_dataset_integrity(tmp_path, raw, monkeypatch):
    """nnU-Net's own check (what --verify_dataset_integrity runs) passes on converted miniatures: 3D CT with
    imagesTs, KiTS23 regions, MSD multi-channel and the DSAD 2D PNG dataset with its ignore label."""
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    monkeypatch.setattr(vdi.multiprocessing, "get_context", in_process_multiprocessing().get_context)
    fab_btcv(tmp_path / "btcv")
    fab_kits23(tmp_path / "kits23")
    task, _ = fab_msd_prostate(tmp_path / "msd")
    fab_dsad(tmp_path / "dsad")
    outs = [btcv.convert(tmp_path / "btcv", 530), kits23.convert(tmp_path / "kits23", 531), msd.convert(task, 532),
            dsad.convert(tmp_path / "dsad", 533)]
    for out in outs:
        verify_dataset_integrity(str(out), num_processes=1)  # raises on any problem
    # and it does fail on a broken dataset (the check above can fail)
    write_nifti(outs[0] / "labelsTr" / "BTCV_0001.nii.gz", np.full(SHAPE_ZYX, 14, np.uint8))
    with pytest.raises(RuntimeError):
        verify_dataset_integrity(str(outs[0]), num_processes=1)
