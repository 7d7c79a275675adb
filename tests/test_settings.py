"""Tests of nnunetv2_cimis.settings: training length, learning rate and hyperparameters from the environment."""
import json
import math
from types import SimpleNamespace

import pytest

from nnunetv2_cimis import settings
from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.settings import apply_training_length, incremental_lr, resolve_hyperparameters

ALL_ENV = [settings.ENV_EPOCHS, settings.ENV_ITERATIONS, settings.ENV_VAL_ITERATIONS, settings.ENV_LR,
           settings.ENV_HPARAMS, settings.ENV_TEACHER]
DEFAULTS = {"kd_weight": 10.0, "temperature": 1.0, "use_bg": True, "num_samples": 4, "tap": "decoder.stages.-2"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ALL_ENV:
        monkeypatch.delenv(name, raising=False)


def _trainer():
    return SimpleNamespace(num_epochs=1000, num_iterations_per_epoch=250, num_val_iterations_per_epoch=50)


def test_env_variable_names():
    assert ALL_ENV == ["nnUNet_cimis_epochs", "nnUNet_cimis_iterations", "nnUNet_cimis_val_iterations",
                       "nnUNet_cimis_lr", "nnUNet_cimis_hparams", "nnUNet_cimis_teacher"]


# ---------------------------------------------------------------- training length
def test_training_length_unset_keeps_defaults(monkeypatch):
    t = _trainer()
    apply_training_length(t)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (1000, 250, 50)
    monkeypatch.setenv("nnUNet_cimis_epochs", "  ")  # blank = unset
    apply_training_length(t)
    assert t.num_epochs == 1000


def test_training_length_from_env(monkeypatch):
    monkeypatch.setenv("nnUNet_cimis_epochs", "2")
    monkeypatch.setenv("nnUNet_cimis_iterations", " 3 ")
    t = _trainer()
    apply_training_length(t)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (2, 3, 50)
    monkeypatch.setenv("nnUNet_cimis_val_iterations", "1")
    apply_training_length(t)
    assert t.num_val_iterations_per_epoch == 1 and type(t.num_epochs) is int


@pytest.mark.parametrize("name", ["nnUNet_cimis_epochs", "nnUNet_cimis_iterations", "nnUNet_cimis_val_iterations"])
@pytest.mark.parametrize("value,match", [("0", "must be positive"), ("-3", "must be positive"),
                                         ("abc", "not a valid int"), ("1.5", "not a valid int")])
def test_training_length_bad_values(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(CIMISError, match=match) as e:
        apply_training_length(_trainer())
    assert name in str(e.value)


# ---------------------------------------------------------------- learning rate
def test_incremental_lr(monkeypatch):
    assert incremental_lr(0.01) == 0.01
    monkeypatch.setenv("nnUNet_cimis_lr", "1e-3")
    assert incremental_lr(0.01) == pytest.approx(0.001)
    monkeypatch.setenv("nnUNet_cimis_lr", "0.5")
    assert incremental_lr(0.01) == 0.5


@pytest.mark.parametrize("value,match", [("0", "positive"), ("-0.1", "positive"), ("fast", "not a valid float")])
def test_incremental_lr_bad_values(monkeypatch, value, match):
    monkeypatch.setenv("nnUNet_cimis_lr", value)
    with pytest.raises(CIMISError, match=match):
        incremental_lr(0.01)


def test_incremental_lr_nan_is_refused(monkeypatch):
    monkeypatch.setenv("nnUNet_cimis_lr", "nan")
    with pytest.raises(CIMISError):
        value = incremental_lr(0.01)
        assert not math.isnan(value)  # reached only if no error: show what came back


# ---------------------------------------------------------------- hyperparameters
def test_hparams_unset_returns_a_copy_of_the_defaults():
    hp = resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")
    assert hp == DEFAULTS and hp is not DEFAULTS
    hp["kd_weight"] = 0
    assert DEFAULTS["kd_weight"] == 10.0


def test_hparams_flat(monkeypatch):
    monkeypatch.setenv("nnUNet_cimis_hparams", json.dumps({"kd_weight": 5, "use_bg": False, "tap": "encoder.stages.-1",
                                                           "num_samples": 8}))
    hp = resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")
    assert hp == {"kd_weight": 5.0, "temperature": 1.0, "use_bg": False, "num_samples": 8, "tap": "encoder.stages.-1"}
    assert type(hp["kd_weight"]) is float  # an int given for a float default becomes a float


def test_hparams_keyed_by_trainer(monkeypatch):
    monkeypatch.setenv("nnUNet_cimis_hparams", json.dumps({"nnUNetTrainerMiB": {"kd_weight": 2},
                                                           "nnUNetTrainerPLOP": {"pod_weight": 0.01}}))
    assert resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")["kd_weight"] == 2.0
    # a trainer not in the file keeps its defaults (PLOP's names are not checked against MiB's defaults)
    assert resolve_hyperparameters(DEFAULTS, "nnUNetTrainerLwF") == DEFAULTS
    with pytest.raises(CIMISError, match="pod_weight"):
        resolve_hyperparameters(DEFAULTS, "nnUNetTrainerPLOP")  # PLOP's block is checked against its defaults


def test_hparams_from_a_file(monkeypatch, tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"nnUNetTrainerMiB": {"temperature": 2.5}}))
    monkeypatch.setenv("nnUNet_cimis_hparams", str(path))
    assert resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")["temperature"] == 2.5


def test_hparams_unknown_key(monkeypatch):
    monkeypatch.setenv("nnUNet_cimis_hparams", json.dumps({"kd_wieght": 5}))
    with pytest.raises(CIMISError, match=r"unknown hyperparameters \['kd_wieght'\] for nnUNetTrainerMiB") as e:
        resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")
    assert "kd_weight" in str(e.value)  # the known names are listed


@pytest.mark.parametrize("raw,match", [
    ("{not json", "neither a JSON object nor the path"),
    ("/no/such/file.json", "neither a JSON object nor the path"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ("3", "must hold a JSON object, got int"),
])
def test_hparams_bad_json(monkeypatch, raw, match):
    monkeypatch.setenv("nnUNet_cimis_hparams", raw)
    with pytest.raises(CIMISError, match=match):
        resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")


@pytest.mark.parametrize("overrides,match", [
    ({"use_bg": 1}, "must be true/false"),
    ({"use_bg": "yes"}, "must be true/false"),
    ({"kd_weight": "5"}, "must be a number"),
    ({"num_samples": None}, "must be a number"),
    ({"temperature": [1.0]}, "must be a number"),
])
def test_hparams_type_checks(monkeypatch, overrides, match):
    monkeypatch.setenv("nnUNet_cimis_hparams", json.dumps(overrides))
    with pytest.raises(CIMISError, match=match):
        resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")


def test_hparams_bool_for_a_number_is_refused(monkeypatch):
    monkeypatch.setenv("nnUNet_cimis_hparams", json.dumps({"kd_weight": True}))
    with pytest.raises(CIMISError):
        resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")


def test_hparams_fraction_for_an_int_is_refused(monkeypatch):
    monkeypatch.setenv("nnUNet_cimis_hparams", json.dumps({"num_samples": 2.5}))
    with pytest.raises(CIMISError):
        resolve_hyperparameters(DEFAULTS, "nnUNetTrainerMiB")


@pytest.mark.parametrize("raw, expected", [(None, True), ("", True), ("1", True), ("0", False), (" 0 ", False)])
def test_final_validation_switch(monkeypatch, raw, expected):
    from nnunetv2_cimis.settings import final_validation_enabled
    if raw is None:
        monkeypatch.delenv("nnUNet_cimis_final_validation", raising=False)
    else:
        monkeypatch.setenv("nnUNet_cimis_final_validation", raw)
    assert final_validation_enabled() is expected


@pytest.mark.parametrize("raw", ["no", "2", "true"])
def test_final_validation_switch_bad_values(monkeypatch, raw):
    from nnunetv2_cimis.settings import final_validation_enabled
    monkeypatch.setenv("nnUNet_cimis_final_validation", raw)
    with pytest.raises(CIMISError, match="use 1 .* or 0"):
        final_validation_enabled()


def test_skipped_final_validation_is_logged_and_never_reaches_nnunet(monkeypatch):
    """Both the incremental trainers and the joint bound return before nnU-Net's validation (which would fail on
    this stand-in, which is not a trainer) and say so in the training log."""
    from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerIncremental, nnUNetTrainerJoint
    monkeypatch.setenv("nnUNet_cimis_final_validation", "0")
    lines = []
    stand_in = SimpleNamespace(print_to_log_file=lines.append)
    assert nnUNetTrainerIncremental.perform_actual_validation(stand_in) is None
    assert nnUNetTrainerJoint.perform_actual_validation(stand_in) is None
    assert len(lines) == 2 and all("Final validation skipped" in line and "--val" in line for line in lines)


def test_omp_num_threads_is_honoured_on_cpu_only(monkeypatch):
    import torch
    from nnunetv2_cimis.settings import apply_cpu_threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        apply_cpu_threads(torch.device("cuda"))  # never touched off the CPU (no GPU needed: nothing is allocated)
        assert torch.get_num_threads() == 2
        apply_cpu_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(2)
        apply_cpu_threads(torch.device("cpu"))  # unset: nnU-Net's choice stays
        assert torch.get_num_threads() == 2
        for bad in ("x", "0", "-1"):
            monkeypatch.setenv("OMP_NUM_THREADS", bad)
            with pytest.raises(CIMISError, match="OMP_NUM_THREADS"):
                apply_cpu_threads(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def test_fine_tuning_head_init_hyperparameter():
    """nnUNetTrainerFT's ``head_init``: MiB's code's random rows by default, MiB's initialisation on request."""
    from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerFT
    assert nnUNetTrainerFT.default_hyperparameters == {"head_init": "random"}
    for value in ("random", "mib"):
        stand_in = SimpleNamespace(hp={"head_init": value})
        nnUNetTrainerFT.build_method_losses(stand_in)
        assert stand_in.head_init == value
    with pytest.raises(ValueError, match="head_init must be 'random' or 'mib'"):
        nnUNetTrainerFT.build_method_losses(SimpleNamespace(hp={"head_init": "zeros"}))
