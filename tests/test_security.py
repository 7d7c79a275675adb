"""Safe by construction (issue 14): no code runs from a loaded file, no path escapes nnU-Net's folders, no
silently corrupt input, no half-written state.

Each loader gets a crafted pickle whose ``__reduce__`` would write a marker file; the test asserts the marker
was not written and that the error names the file and the opt-in ``nnUNet_cimis_trust_checkpoints``.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.safe_load import ENV_TRUST, load_weights_only

OPT_IN = "nnUNet_cimis_trust_checkpoints=1"


class _Payload:
    """Unpickling this runs ``exec``: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def write_malicious(path, marker, checkpoint_like=True):
    """A .pth that looks like an nnU-Net checkpoint (or step memory) and runs code when fully unpickled."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    obj = {"network_weights": {}, "init_args": {"configuration": "3d_fullres"}, "trainer_name": "nnUNetTrainer",
           "format_version": 1, "payload": _Payload(marker)} if checkpoint_like else [_Payload(marker)]
    torch.save(obj, str(path))
    return str(path)


def _model_folder(root, checkpoint_file="checkpoint_final.pth"):
    """<trainer>__<plans>__<configuration>/fold_0 with a malicious checkpoint (plans/dataset.json present)."""
    model = os.path.join(str(root), "nnUNetTrainer__nnUNetPlans__3d_fullres")
    os.makedirs(os.path.join(model, "fold_0"))
    for name in ("plans.json", "dataset.json"):
        with open(os.path.join(model, name), "w") as f:
            json.dump({"dataset_name": "Dataset001_X", "configurations": {}, "labels": {"background": 0, "a": 1},
                       "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}, f)
    return model


def _assert_refused(exc_or_text, marker, path=None):
    text = str(exc_or_text)
    assert not os.path.exists(marker), "the crafted file's code ran"
    assert OPT_IN in text, text
    if path is not None:
        assert str(path) in text, text


@pytest.fixture
def marker(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_TRUST, raising=False)
    return str(tmp_path / "CODE_RAN")


# ------------------------------------------------------------------------------------------ 1. no unpickling
def test_the_payload_really_runs_code_when_fully_unpickled(tmp_path, marker):
    """The crafted file is a real attack: torch.load(weights_only=False) writes the marker."""
    path = write_malicious(tmp_path / "evil.pth", marker)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def test_load_weights_only_refuses_and_names_the_opt_in(tmp_path, marker):
    path = write_malicious(tmp_path / "evil.pth", marker)
    with pytest.raises(CIMISError) as e:
        load_weights_only(path, "teacher checkpoint")
    _assert_refused(e.value, marker, path)
    assert "exec" in str(e.value)  # the object that would have run is named


def test_opt_in_loads_a_legacy_file(tmp_path, marker, monkeypatch, capsys):
    legacy = tmp_path / "legacy.pth"
    torch.save({"network_weights": {}, "when": __import__("datetime").date(2020, 1, 1)}, str(legacy))
    with pytest.raises(CIMISError):
        load_weights_only(str(legacy))
    monkeypatch.setenv(ENV_TRUST, "1")
    assert load_weights_only(str(legacy))["when"].year == 2020
    assert ENV_TRUST in capsys.readouterr().err  # a warning says full unpickling was used


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save({"network_weights": {"w": torch.zeros(1000)}}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CIMISError, match="cannot be read"):
        load_weights_only(str(path), "checkpoint")


def test_numpy_types_of_nnunet_checkpoints_load_weights_only(tmp_path):
    """nnU-Net's logging holds numpy scalars and our step memories numpy label patches: both allowed."""
    path = tmp_path / "ok.pth"
    obj = {"logging": {"mean_fg_dice": [np.float64(0.5), np.float32(0.25)]}, "_best_ema": np.float64(0.1),
           "init_args": {"device": torch.device("cpu"), "fold": 0}, "bank": [np.zeros((2, 2), np.uint8)],
           "axes": (0, 1, 2), "i": np.int64(3)}
    torch.save(obj, str(path))
    loaded = load_weights_only(str(path))
    assert loaded["_best_ema"] == np.float64(0.1) and loaded["bank"][0].dtype == np.uint8


def test_step_memory_load_refuses(tmp_path, marker):
    from nnunetv2_cimis.memory.step_memory import StepMemory
    path = write_malicious(tmp_path / "fold_0" / "step_memory.pth", marker)
    with pytest.raises(CIMISError) as e:
        StepMemory.load(path)
    _assert_refused(e.value, marker, path)


def test_load_teacher_refuses(tmp_path, marker):
    from nnunetv2_cimis.teacher.loading import load_teacher
    model = _model_folder(tmp_path)
    path = write_malicious(os.path.join(model, "fold_0", "checkpoint_final.pth"), marker)
    with pytest.raises(CIMISError) as e:
        load_teacher(path, torch.device("cpu"))
    _assert_refused(e.value, marker, path)


def test_step_memory_cli_refuses(tmp_path, marker, capsys):
    from nnunetv2_cimis.memory.cli import main
    model = _model_folder(tmp_path)
    path = write_malicious(os.path.join(model, "fold_0", "checkpoint_final.pth"), marker)
    with pytest.raises(SystemExit) as e:
        main(["-m", model, "-f", "0"])
    assert e.value.code == 2
    _assert_refused(capsys.readouterr().err, marker, path)


@pytest.mark.parametrize("evil", ["step_memory.pth", "checkpoint_final.pth"])
def test_synthesize_cli_refuses(tmp_path, marker, capsys, evil):
    from nnunetv2_cimis.memory.step_memory import StepMemory
    from nnunetv2_cimis.synthesis.inversion_cli import main
    model = _model_folder(tmp_path)
    fold = os.path.join(model, "fold_0")
    StepMemory(labels={0: "background", 1: "a"}, prototype_tap="decoder.stages.-2",
               prototypes=torch.zeros(2, 4), prototype_counts=torch.ones(2),
               norm_stats={"n": {"mean": torch.zeros(4), "var": torch.ones(4)}},
               label_bank=[np.zeros((4, 4, 4), np.uint8)], patch_size=[4, 4, 4]).save(os.path.join(fold, "step_memory.pth"))
    torch.save({"network_weights": {}}, os.path.join(fold, "checkpoint_final.pth"))
    path = write_malicious(os.path.join(fold, evil), marker)
    with pytest.raises(SystemExit) as e:
        main(["-m", model, "-f", "0", "-n", "1", "--device", "cpu", "--no_progress"])
    assert e.value.code == 2
    _assert_refused(capsys.readouterr().err, marker, path)


def test_evaluate_refuses_before_nnunet_loads(tmp_path, marker):
    from nnunetv2_cimis.evaluation.evaluate import predict_cases
    model = _model_folder(tmp_path)
    path = write_malicious(os.path.join(model, "fold_0", "checkpoint_final.pth"), marker)
    with pytest.raises(CIMISError) as e:
        predict_cases(model, 0, [["/nonexistent_0000.nii.gz"]], [str(tmp_path / "out")], device=torch.device("cpu"),
                      num_processes=0)
    _assert_refused(e.value, marker, path)


def test_torch_load_routed_through_weights_only(tmp_path, marker):
    """What nnU-Net's predictor and load_checkpoint call (torch.load(..., weights_only=False)) is weights-only
    inside torch_load_weights_only()."""
    from nnunetv2_cimis.safe_load import torch_load_weights_only
    path = write_malicious(tmp_path / "evil.pth", marker)
    with torch_load_weights_only("checkpoint"):
        with pytest.raises(CIMISError) as e:
            torch.load(path, map_location="cpu", weights_only=False)
    _assert_refused(e.value, marker, path)
    assert torch.load is not None and torch.load.__module__.startswith("torch")  # restored


def test_no_weights_only_false_left_in_the_package():
    """Every load of the package goes through safe_load (the only weights_only=False is its documented opt-in)."""
    import ast
    import nnunetv2_cimis
    root = os.path.dirname(os.path.dirname(nnunetv2_cimis.__file__))
    offenders = []
    for package in ("nnunetv2_cimis", "dataset_conversion", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if not name.endswith(".py") or name == "safe_load.py":
                    continue
                with open(os.path.join(folder, name)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                            node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch":
                        offenders.append(f"{name}:{node.lineno}")
                    if isinstance(node, ast.keyword) and node.arg == "weights_only" and \
                            getattr(node.value, "value", None) is False:
                        offenders.append(f"{name}:{node.value.lineno}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------ 1. end to end
def _copy_teacher(env, steps, tmp_path):
    """A copy of the trained step-0 model (for nnUNet_cimis_teacher) that the test may tamper with."""
    from e2e_utils import model_folder
    src = os.path.dirname(model_folder(env, steps[0], "nnUNetTrainerFT"))
    dst = tmp_path / "shared_model" / os.path.basename(src)
    shutil.copytree(src, dst)
    return str(dst / "fold_0")


@pytest.mark.e2e
def test_real_checkpoint_and_step_memory_load_weights_only(tiny_scenario):
    """What our trainer writes loads with torch.load(weights_only=True) and only the allow-listed numpy types."""
    from e2e_utils import model_folder
    from nnunetv2_cimis.safe_load import ALLOWED_NUMPY_GLOBALS
    folder = model_folder(tiny_scenario["env"], tiny_scenario["step_datasets"][0], "nnUNetTrainerFT")
    with torch.serialization.safe_globals(ALLOWED_NUMPY_GLOBALS):
        ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=True)
        memory = torch.load(os.path.join(folder, "step_memory.pth"), map_location="cpu", weights_only=True)
    assert ckpt["cimis_state"]["step"] == 0 and ckpt["network_weights"]
    assert memory["format_version"] == 1 and memory["label_bank"]
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(folder, "checkpoint_final.pth"))
    assert all(g.startswith("numpy.") for g in unsafe), unsafe  # nothing but the allowed numpy types


@pytest.mark.e2e
@pytest.mark.parametrize("trainer, evil", [("nnUNetTrainerFT", "checkpoint_final.pth"),
                                           ("nnUNetTrainerPGCDDAPD", "step_memory.pth"),
                                           ("nnUNetTrainerFT", "step_memory.pth")])
def test_trainer_refuses_malicious_teacher_files(tiny_scenario, tmp_path, marker, monkeypatch, trainer, evil):
    """nnUNet_cimis_teacher (and the teacher named in the metadata: same loader) and the teacher's step memory,
    at initialize for the methods that need it and for FT, which carries old prototypes forward (checked at the
    start, not after training)."""
    from e2e_utils import build_trainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2_cimis.trainer_folder import ensure_trainer_path
    env, steps = tiny_scenario["env"], tiny_scenario["step_datasets"]
    fold = _copy_teacher(env, steps, tmp_path)
    path = write_malicious(os.path.join(fold, evil), marker)
    monkeypatch.setenv("nnUNet_cimis_teacher", os.path.join(fold, "checkpoint_final.pth"))
    ensure_trainer_path()
    t = build_trainer(steps[1], recursive_find_trainer_class_by_name(trainer))
    with pytest.raises(SystemExit) as e:
        t.initialize()
    _assert_refused(e.value, marker, path)


@pytest.mark.e2e
def test_continue_training_refuses_malicious_checkpoint(tiny_scenario, tmp_path, marker):
    """nnUNetv2_train --c: the trainer's load_checkpoint loads weights-only before nnU-Net sees the file."""
    from e2e_utils import build_trainer
    from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerFT
    path = write_malicious(tmp_path / "checkpoint_latest.pth", marker)
    t = build_trainer(tiny_scenario["step_datasets"][0], nnUNetTrainerFT, continue_training=True)
    with pytest.raises(SystemExit) as e:
        t.load_checkpoint(path)
    _assert_refused(e.value, marker, path)


@pytest.mark.e2e
def test_add_classes_refuses_malicious_or_unloadable_model(tiny_scenario, tmp_path, marker, capsys):
    from nnunetv2_cimis.scenarios.add_classes import main
    env, steps = tiny_scenario["env"], tiny_scenario["step_datasets"]
    fold = _copy_teacher(env, steps, tmp_path)
    path = write_malicious(os.path.join(fold, "checkpoint_final.pth"), marker)
    with pytest.raises(SystemExit) as e:
        main(["-m", os.path.dirname(fold), "-d", steps[1], "-o", "990", "--name", "Evil"])
    assert e.value.code == 2
    _assert_refused(capsys.readouterr().err, marker, path)
    # an unloadable (truncated) checkpoint: refused too, nothing created
    data = open(os.path.join(env["nnUNet_results"], steps[0], os.path.basename(os.path.dirname(fold)), "fold_0",
                             "checkpoint_final.pth"), "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(SystemExit) as e:
        main(["-m", os.path.dirname(fold), "-d", steps[1], "-o", "990", "--name", "Evil"])
    assert e.value.code == 2 and "cannot be read" in capsys.readouterr().err
    assert not [d for d in os.listdir(env["nnUNet_raw"]) if d.startswith("Dataset990")]


# ------------------------------------------------------------------------------------------ 2. one name rule
def _phantom(roots, dataset_id=300, n=8):
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    return write_abdominal_phantom(str(roots / "raw"), dataset_id, n, shape=(16, 16, 16), seed=0)


BAD_NAMES = ["../../../outside", "a/b", ".hidden", "", "a b", "..", "x\\..\\y"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_one_name_rule_everywhere(bad, tmp_path, monkeypatch):
    """naming.check_dataset_name is the rule of the converters, the phantoms, make_scenario and add_classes."""
    from nnunetv2_cimis.dataset_conversion.common import dataset_folder_name as converter_rule
    from nnunetv2_cimis.naming import check_dataset_name
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.phantom.laparoscopic2d import write_laparoscopic_phantom
    for call in (lambda: check_dataset_name(bad), lambda: converter_rule(5, bad),
                 lambda: write_abdominal_phantom(str(tmp_path / "raw"), 5, 1, dataset_name=bad),
                 lambda: write_laparoscopic_phantom(str(tmp_path / "raw"), 5, 1, dataset_name=bad)):
        with pytest.raises(CIMISError, match="may only hold letters, digits"):
            call()
    assert not (tmp_path / "raw").exists() or not os.listdir(tmp_path / "raw")


def test_make_scenario_refuses_an_escaping_name(roots, capsys):
    from nnunetv2_cimis.scenarios.make_scenario import main
    _phantom(roots)
    outside = roots / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    before = sorted(os.listdir(roots))
    with pytest.raises(SystemExit) as e:
        main(["-d", "300", "-s", "4-4", "--ids", "301", "302", "--name", "../../../outside", "--no-preprocess"])
    assert e.value.code == 2 and "--name" in capsys.readouterr().err
    assert sorted(os.listdir(roots)) == before and (outside / "keep.txt").read_text() == "mine"
    assert os.listdir(roots / "raw") == ["Dataset300_AbdominalPhantom"]


def test_make_scenario_clean_up_removes_only_what_it_created(roots, monkeypatch):
    """A folder that appears between the id check and the write (another user, another run) makes the run fail;
    the clean-up removes the datasets this run wrote and leaves that folder alone."""
    import nnunetv2_cimis.scenarios.make_scenario as ms
    _phantom(roots)
    theirs = roots / "raw" / "Dataset302_AbdominalPhantomStep1"
    theirs.mkdir()
    (theirs / "dataset.json").write_text("{}")
    monkeypatch.setattr(ms, "dataset_id_taken", lambda i: None)
    with pytest.raises(CIMISError, match="already exists"):
        ms.make_scenario("300", "4-4", [301, 302], preprocess=False)
    assert (theirs / "dataset.json").read_text() == "{}"
    assert sorted(os.listdir(roots / "raw")) == ["Dataset300_AbdominalPhantom", "Dataset302_AbdominalPhantomStep1"]


@pytest.mark.parametrize("args, fragment", [(["-o", "0"], "1..999"), (["-o", "-3"], "1..999"),
                                            (["-o", "1000"], "1..999"),
                                            (["-o", "5", "--name", "../../x"], "--name")])
def test_add_classes_refuses_bad_ids_and_names_first(roots, capsys, args, fragment):
    from nnunetv2_cimis.scenarios.add_classes import main
    with pytest.raises(SystemExit) as e:
        main(["-m", str(roots / "no_model"), "-d", "1", *args])
    assert e.value.code == 2 and fragment in capsys.readouterr().err
    assert all(not os.listdir(roots / k) for k in ("raw", "preprocessed", "results"))


def test_make_scenario_refuses_bad_ids(roots, capsys):
    from nnunetv2_cimis.scenarios.make_scenario import main
    _phantom(roots)
    for ids in (["0", "1"], ["998", "999"]):  # 999 + 1: the joint dataset would be 1000
        with pytest.raises(SystemExit) as e:
            main(["-d", "300", "-s", "4-4", "--ids", *ids, "--no-preprocess"])
        assert e.value.code == 2 and "1..999" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 3. case identifiers
def _use_dataset_key(folder, rename):
    """Rewrite a raw dataset's dataset.json to list its cases under the 'dataset' key, renaming some."""
    with open(os.path.join(folder, "dataset.json")) as f:
        ds = json.load(f)
    entries = {}
    for name in sorted(os.listdir(os.path.join(folder, "labelsTr"))):
        case = name[:-len(".nii.gz")]
        entries[rename.get(case, case)] = {"images": [os.path.join(folder, "imagesTr", case + "_0000.nii.gz")],
                                           "label": os.path.join(folder, "labelsTr", name)}
    ds["dataset"] = entries
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(ds, f)
    return sorted(entries)


def test_make_scenario_refuses_escaping_case_ids(roots, capsys):
    from nnunetv2_cimis.scenarios.make_scenario import main
    folder = _phantom(roots)
    first = sorted(os.listdir(os.path.join(folder, "labelsTr")))[0][:-len(".nii.gz")]
    _use_dataset_key(folder, {first: "../../../escaped"})
    with pytest.raises(SystemExit) as e:
        main(["-d", "300", "-s", "4-4", "--ids", "301", "302", "--no-preprocess"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "../../../escaped" in err and "case identifier" in err
    assert not any("escaped" in f for _, _, files in os.walk(roots) for f in files)
    assert os.listdir(roots / "raw") == ["Dataset300_AbdominalPhantom"]


def test_evaluate_refuses_escaping_test_case_ids(tmp_path):
    from nnunetv2_cimis.evaluation.evaluate import load_test_set
    (tmp_path / "img.nii.gz").write_bytes(b"x")
    (tmp_path / "lab.nii.gz").write_bytes(b"x")
    for case, ending in (("../../victim", ".nii.gz"), ("ok", "/../../x.nii.gz")):
        path = tmp_path / "test_set.json"
        path.write_text(json.dumps({"file_ending": ending, "labels": {"background": 0, "a": 1},
                                    "cases": {case: {"images": [str(tmp_path / "img.nii.gz")],
                                                     "label": str(tmp_path / "lab.nii.gz")}}}))
        with pytest.raises(CIMISError, match="case identifier|file_ending"):
            load_test_set(str(path))


@pytest.mark.parametrize("key, value", [("step_datasets", ["Dataset301_AStep0", "../../../x"]),
                                        ("joint_dataset", "../x"), ("teacher", {"dataset": "/etc", "trainer": "FT"}),
                                        ("teacher", {"dataset": "Dataset301_AStep0", "trainer": "../x"})])
def test_step_metadata_names_are_checked(key, value):
    from nnunetv2_cimis.scenarios.step_metadata import make_metadata, read_step_info
    meta = make_metadata("s", 1, [[1], [2]], {"dataset": "Dataset301_AStep0", "trainer": "nnUNetTrainerFT",
                                               "same_trainer_as_student": False},
                         ["Dataset301_AStep0", "Dataset302_AStep1"], "Dataset303_AJoint", None, None)
    meta[key] = value
    with pytest.raises(CIMISError, match="recreate|trainer class name|not a dataset folder name"):
        read_step_info({"labels": {"background": 0, "a": 1, "b": 2}, "cimis": meta}, "Dataset302_AStep1")


# ------------------------------------------------------------------------------------------ 4. truncated files
def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_truncated_gzip_is_refused_where_sitk_would_pad_with_zeros(tmp_path):
    import SimpleITK as sitk
    from nnunetv2_cimis.integrity import check_file_complete
    a = np.random.RandomState(0).randint(-1000, 1000, (24, 24, 24)).astype(np.int16)
    for name in ("a.nii.gz", "a.nii"):
        sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / name), name.endswith(".gz"))
        check_file_complete(str(tmp_path / name))  # complete files pass
        _truncate(tmp_path / name)
        with pytest.raises(CIMISError, match=f"cannot read the image .*{name}.*truncated"):
            check_file_complete(str(tmp_path / name), "image")
    # what the check protects against: SimpleITK reads the truncated file and fills it with zeros
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nii.gz"))) != a).mean() > 0.3


@pytest.mark.parametrize("which", ["imagesTr", "labelsTr"])
def test_make_scenario_refuses_truncated_inputs(roots, capsys, which):
    from nnunetv2_cimis.scenarios.make_scenario import main
    folder = _phantom(roots)
    victim = sorted(os.listdir(os.path.join(folder, which)))[3]
    _truncate(os.path.join(folder, which, victim))
    with pytest.raises(SystemExit) as e:
        main(["-d", "300", "-s", "4-4", "--ids", "301", "302", "--no-preprocess"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and victim in err and "truncated" in err
    assert os.listdir(roots / "raw") == ["Dataset300_AbdominalPhantom"]


@pytest.mark.parametrize("which", ["img", "label"])
def test_converter_refuses_truncated_inputs(tmp_path, monkeypatch, which):
    from test_conversion import fab_btcv
    from nnunetv2_cimis.dataset_conversion import btcv
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    fab_btcv(tmp_path / "dl")
    victim = tmp_path / "dl" / "RawData" / "Training" / which / f"{which}0002.nii.gz"
    _truncate(victim)
    with pytest.raises(CIMISError, match=f"{victim.name}.*truncated"):
        btcv.convert(tmp_path / "dl", 501)
    assert os.listdir(tmp_path / "raw") == []


# ------------------------------------------------------------------------------------------ 5. SIGTERM
def test_sigterm_during_make_scenario_cleans_up_like_ctrl_c(roots, monkeypatch):
    import signal
    import nnunetv2_cimis.scenarios.make_scenario as ms
    _phantom(roots)
    real_write_joint = ms._write_joint

    def write_joint_then_get_killed(*args, **kwargs):
        real_write_joint(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` / SLURM send

    monkeypatch.setattr(ms, "_write_joint", write_joint_then_get_killed)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        ms.make_scenario("300", "4-4", [301, 302], preprocess=False)
    assert os.listdir(roots / "raw") == ["Dataset300_AbdominalPhantom"]  # steps and joint removed again
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    # and the ids are free for a rerun
    monkeypatch.setattr(ms, "_write_joint", real_write_joint)
    assert ms.make_scenario("300", "4-4", [301, 302], preprocess=False)["step_datasets"]


# ------------------------------------------------------------------------------------------ 7. malformed JSON
def test_malformed_source_dataset_json_is_an_error(roots, capsys):
    from nnunetv2_cimis.scenarios.make_scenario import main
    folder = _phantom(roots)
    for content in ("{not json", "[1, 2]", json.dumps({"labels": [1], "channel_names": {"0": "CT"},
                                                       "file_ending": ".nii.gz", "numTraining": 8})):
        with open(os.path.join(folder, "dataset.json"), "w") as f:
            f.write(content)
        with pytest.raises(SystemExit) as e:
            main(["-d", "300", "-s", "4-4", "--ids", "301", "302", "--no-preprocess"])
        assert e.value.code == 2 and "dataset.json" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{broken", "[]", json.dumps({"dataset_name": "Dataset001_X"})])
def test_malformed_model_plans_is_an_error(tmp_path, roots, capsys, content):
    from nnunetv2_cimis.scenarios.add_classes import main
    from nnunetv2_cimis.teacher.loading import load_teacher
    model = _model_folder(tmp_path / "m")
    torch.save({"network_weights": {}, "init_args": {"configuration": "3d_fullres"}},
               os.path.join(model, "fold_0", "checkpoint_final.pth"))
    with open(os.path.join(model, "plans.json"), "w") as f:
        f.write(content)
    with pytest.raises(CIMISError, match="plans"):
        load_teacher(os.path.join(model, "fold_0", "checkpoint_final.pth"), torch.device("cpu"))
    with pytest.raises(SystemExit) as e:
        main(["-m", model, "-d", "1", "-o", "5"])
    assert e.value.code == 2 and "plans.json" in capsys.readouterr().err


@pytest.mark.parametrize("edit", [lambda ds: ds.update(cimis=[1, 2]),
                                  lambda ds: ds["cimis"].update(num_steps="two"),
                                  lambda ds: ds["cimis"].update(step_datasets="Dataset301_A"),
                                  lambda ds: ds.update(labels=["background", "a"])])
def test_malformed_cimis_block_is_an_error(edit):
    from nnunetv2_cimis.scenarios.step_metadata import make_metadata, read_step_info
    ds = {"labels": {"background": 0, "a": 1}, "cimis": make_metadata("s", 0, [[1], [2]], None, [], None, None, None)}
    edit(ds)
    with pytest.raises(CIMISError):
        read_step_info(ds, "Dataset301_A")


# ------------------------------------------------------------------------------------------ 9. non-finite numbers
@pytest.mark.parametrize("raw", ['{"kd_weight": NaN}', '{"kd_weight": Infinity}', '{"kd_weight": -Infinity}',
                                 '{"kd_weight": 1e999}', '{"nnUNetTrainerX": {"kd_weight": NaN}}'])
def test_non_finite_hyperparameters_refused(raw, monkeypatch):
    from nnunetv2_cimis.settings import resolve_hyperparameters
    monkeypatch.setenv("nnUNet_cimis_hparams", raw)
    with pytest.raises(CIMISError, match="finite"):
        resolve_hyperparameters({"kd_weight": 1.0}, "nnUNetTrainerX")


def test_run_with_non_finite_loss_stops_with_a_clear_message():
    from types import SimpleNamespace
    from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerIncremental
    log = []
    t = SimpleNamespace(max_nonfinite_iterations=3, current_epoch=7, hp={"kd_weight": 10.0}, initial_lr=1e-2,
                        print_to_log_file=log.append)
    check = nnUNetTrainerIncremental._check_loss_finite
    for loss in (np.float32(np.nan), np.float32(np.inf), np.float32(0.5), np.float32(np.nan), np.float32(np.nan)):
        check(t, {"loss": loss})  # a finite loss in between resets the count
    with pytest.raises(SystemExit, match="not finite .* for 3 iterations in a row") as e:
        check(t, {"loss": np.array(np.nan)})
    assert "kd_weight" in str(e.value) and log


# ------------------------------------------------------------------------------------------ 10. warnings at start
def test_warns_when_no_training_case_has_a_new_class(tmp_path, capsys):
    import pickle
    from types import SimpleNamespace
    from nnunetv2_cimis.scenarios.step_metadata import make_metadata, read_step_info
    from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerIncremental
    step = read_step_info({"labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3},
                           "cimis": make_metadata("s", 1, [[1], [2, 3]], {"dataset": "Dataset301_AStep0",
                                                                         "trainer": "nnUNetTrainerFT"},
                                                  [], None, None, None)}, "Dataset302_AStep1")
    for i, present in enumerate(([2], [])):  # spleen in one case, kidney nowhere
        with open(tmp_path / f"case{i}.pkl", "wb") as f:
            pickle.dump({"class_locations": {v: (np.ones((2, 4)) if v in present else np.zeros((0, 4)))
                                             for v in (1, 2, 3) if v != 1}}, f)
    log = []
    t = SimpleNamespace(step=step, preprocessed_dataset_folder=str(tmp_path), print_to_log_file=log.append)
    nnUNetTrainerIncremental._check_no_old_labels_in_masks(t)
    assert len(log) == 1 and "[3]" in log[0] and "kidney" in log[0] and "WARNING" in log[0]


# ------------------------------------------------------------------------------------------ 8. atomic checkpoint
@pytest.mark.e2e
def test_checkpoint_with_method_state_is_one_atomic_save(tiny_scenario, tmp_path, monkeypatch, capsys):
    from e2e_utils import build_trainer
    from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerFT
    t = build_trainer(tiny_scenario["step_datasets"][0], nnUNetTrainerFT)
    t.initialize()
    path = str(tmp_path / "checkpoint_latest.pth")
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (saves.append(a[1]), real_save(*a, **k))[1])
    t.save_checkpoint(path)
    assert len(saves) == 1 and saves[0] != path  # one save, to a temporary file renamed into place
    first = load_weights_only(path)
    assert first["cimis_state"]["step"] == 0 and first["network_weights"]

    def killed_while_writing(obj, f, *a, **k):  # the process dies half-way through writing the new checkpoint
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_latest.pth"]  # no temporary file left
    assert load_weights_only(path)["cimis_state"] == first["cimis_state"]  # the previous checkpoint is intact
    # a checkpoint without cimis_state (another trainer's, or an old version's) loads with a warning
    del first["cimis_state"]
    torch.save(first, path)
    capsys.readouterr()
    t.load_checkpoint(path)
    assert "has no 'cimis_state'" in capsys.readouterr().out
