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
    from nnunetv2_cimis.cli import ensure_trainer_path
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
