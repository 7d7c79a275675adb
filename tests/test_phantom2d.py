"""Tests of nnunetv2_cimis.phantom.laparoscopic2d (2D RGB laparoscopic phantom as an nnU-Net raw dataset)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.phantom.laparoscopic2d import (STRUCTURES, make_laparoscopic_frame, sparsify_annotation,
                                                   write_laparoscopic_phantom)


def test_frame_shapes_types_and_determinism():
    img, lab, labels = make_laparoscopic_frame((40, 48), seed=3, frame_index=1)
    assert img.shape == (40, 48, 3) and img.dtype == np.uint8
    assert lab.shape == (40, 48) and lab.dtype == np.uint8
    assert labels == {"background": 0, **{n: i + 1 for i, n in enumerate(STRUCTURES)}}
    img2, lab2, _ = make_laparoscopic_frame((40, 48), seed=3, frame_index=1)
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)
    img3, _, _ = make_laparoscopic_frame((40, 48), seed=4, frame_index=1)
    assert not np.array_equal(img, img3)


def test_structures_subset_and_presence():
    _, lab, labels = make_laparoscopic_frame((32, 32), 0, 0, structures=["ureter", "liver"], presence=1.0)
    assert labels == {"background": 0, "liver": 1, "ureter": 2}
    assert set(np.unique(lab).tolist()) <= {0, 1, 2} and 2 in lab
    _, lab, _ = make_laparoscopic_frame((32, 32), 0, 0, presence=0.0)
    assert lab.max() == 0


def test_structures_differ_in_colour():
    """Mean colour inside each structure is closer to its nominal colour than to the background's."""
    means = {}
    for i in range(12):
        img, lab, labels = make_laparoscopic_frame((64, 64), 1, i, presence=1.0, noise_std=0.0)
        for name, v in labels.items():
            if v and (lab == v).sum() > 20:
                means.setdefault(name, []).append(img[lab == v].mean(0))
    for name in ("liver", "fat", "ureter"):
        assert name in means
    assert np.mean(means["fat"], 0)[2] < np.mean(means["ureter"], 0)[2]  # fat is yellow: less blue
    assert np.mean(means["liver"], 0).sum() < np.mean(means["stomach"], 0).sum()  # liver is darker


def test_every_structure_stands_out_in_colour():
    """The 2D demo needs every structure learnable: mean colours (measured in frames, light fall-off included)
    pairwise at least 30 grey levels apart and from the background's; the ureter several pixels wide."""
    pixels = {}
    for i in range(12):
        img, lab, labels = make_laparoscopic_frame((64, 64), 2, i, presence=1.0, noise_std=0.0)
        for name, v in labels.items():
            pixels.setdefault(name, []).append(img[lab == v].astype(float))
    means = {name: np.concatenate(p).mean(0) for name, p in pixels.items()}
    assert set(means) == {"background", *STRUCTURES}
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.linalg.norm(means[a] - means[b]) >= 30, (a, b, means[a], means[b])
    _, lab, labels = make_laparoscopic_frame((64, 64), 2, 0, structures=["ureter"], presence=1.0)
    assert (lab == 1).sum() >= 64 * 3  # a tube crossing the frame, at least 3 pixels wide


def test_sparsify_keeps_k_structures():
    lab = np.array([[0, 1, 2], [3, 3, 1]], dtype=np.uint8)
    out = sparsify_annotation(lab, 2, np.random.default_rng(0))
    kept = set(np.unique(out).tolist()) - {0}
    assert len(kept) == 2 and kept <= {1, 2, 3}
    for v in kept:
        assert np.array_equal(out == v, lab == v)
    assert np.array_equal(sparsify_annotation(lab, 3, np.random.default_rng(0)), lab)


def test_write_dataset(tmp_path):
    out = write_laparoscopic_phantom(str(tmp_path), 951, 3, seed=2, shape=(32, 32), structures_per_frame=1,
                                     num_test_cases=2)
    assert os.path.basename(out) == "Dataset951_LaparoscopicPhantom"
    with open(os.path.join(out, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["file_ending"] == ".png" and dj["numTraining"] == 3
    assert dj["overwrite_image_reader_writer"] == "NaturalImage2DIO"
    assert len(dj["channel_names"]) == 3 and dj["labels"]["vesicular_glands"] == 6
    assert sorted(os.listdir(os.path.join(out, "imagesTr"))) == [f"lap_00{i}_0000.png" for i in range(3)]
    assert sorted(os.listdir(os.path.join(out, "labelsTs"))) == ["lap_003.png", "lap_004.png"]
    for i in range(3):
        img = np.array(Image.open(os.path.join(out, "imagesTr", f"lap_00{i}_0000.png")))
        lab = np.array(Image.open(os.path.join(out, "labelsTr", f"lap_00{i}.png")))
        assert img.shape == (32, 32, 3) and lab.shape == (32, 32)
        assert len(set(np.unique(lab).tolist()) - {0}) <= 1  # one structure annotated per frame
    # the frames are the generator's frames (PNG is lossless)
    img0, _, _ = make_laparoscopic_frame((32, 32), 2, 0)
    assert np.array_equal(np.array(Image.open(os.path.join(out, "imagesTr", "lap_000_0000.png"))), img0)
    # nnU-Net's natural-image reader sees three channels
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    data, props = NaturalImage2DIO().read_images([os.path.join(out, "imagesTr", "lap_000_0000.png")])
    assert data.shape == (3, 1, 32, 32)


def test_write_errors(tmp_path):
    write_laparoscopic_phantom(str(tmp_path), 952, 1, shape=(16, 16))
    with pytest.raises(CIMISError, match="already exists"):
        write_laparoscopic_phantom(str(tmp_path), 952, 1, shape=(16, 16))
    with pytest.raises(CIMISError, match="already used"):
        write_laparoscopic_phantom(str(tmp_path), 952, 1, shape=(16, 16), dataset_name="Other")
    write_laparoscopic_phantom(str(tmp_path), 952, 1, shape=(16, 16), overwrite=True)
    with pytest.raises(CIMISError, match="shape"):
        write_laparoscopic_phantom(str(tmp_path), 953, 1, shape=(8, 8))
    with pytest.raises(CIMISError, match="structures"):
        write_laparoscopic_phantom(str(tmp_path), 953, 1, structures=["spleen"])
    with pytest.raises(CIMISError, match="num_cases"):
        write_laparoscopic_phantom(str(tmp_path), 953, 0)
    with pytest.raises(CIMISError, match="structures_per_frame"):
        write_laparoscopic_phantom(str(tmp_path), 953, 1, structures_per_frame=0)


def test_phantom_cli_writes_2d_dataset(tmp_path, monkeypatch):
    from nnunetv2_cimis.phantom.cli import main
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    main(["-d", "954", "-n", "2", "--kind", "laparoscopic2d", "--shape", "24", "20"])
    img = np.array(Image.open(tmp_path / "Dataset954_LaparoscopicPhantom" / "imagesTr" / "lap_001_0000.png"))
    assert img.shape == (24, 20, 3)


def test_demo_kind_draws_every_structure_in_every_frame(tmp_path, monkeypatch):
    """The 2D demo: a scenario over all six structures, fine-tuning with MiB's head initialisation (written to the
    demo's hyperparameter file beside the CPU-sized DDCL settings), and a phantom with every structure in every
    frame (absent classes scored 0 for a few false-positive pixels, docs/benchmarks.md)."""
    from nnunetv2_cimis import demo
    from nnunetv2_cimis.phantom import laparoscopic2d
    from nnunetv2_cimis.scenarios.scenario import parse_scenario
    k = demo.KINDS["laparoscopic2d"]
    groups = parse_scenario(k.scenario, list(STRUCTURES))
    assert len(groups) == k.num_steps and sorted(sum(groups, [])) == sorted(STRUCTURES)
    assert k.configuration == "2d" and k.step0_trainer == "nnUNetTrainerDDCL"
    assert {"nnUNetTrainerFT", "nnUNetTrainerMiB", "nnUNetTrainerDDCL"} <= set(k.default_trainers)
    seen = {}

    class Written(Exception):
        pass

    def fake_writer(*args, **kwargs):
        seen.update(kwargs, num_cases=args[2])
        raise Written

    monkeypatch.setattr(laparoscopic2d, "write_laparoscopic_phantom", fake_writer)
    saved = dict(os.environ)  # run_demo exports its nnU-Net folders before writing the phantom
    try:
        with pytest.raises(Written):
            demo.run_demo(str(tmp_path / "out"), kind="laparoscopic2d")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert seen["presence"] == 1.0 and seen["num_cases"] == k.cases and tuple(seen["shape"]) == k.shape
    hparams = json.loads((tmp_path / "out" / "hparams.json").read_text())
    assert hparams["nnUNetTrainerFT"] == {"head_init": "mib"} and "nnUNetTrainerDDCL" in hparams
