"""Results folders of hyperparameter variants (nnUNet_cimis_variant_folders, nnunetv2_cimis.settings): names,
the teacher lookup, and one real run: train into the variant folder, validate against step references,
nnUNetv2_predict finds the model, the next step finds its teacher."""
import json
import os
import subprocess
import sys

import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.settings import (ENV_HPARAMS, ENV_LR, ENV_VARIANT_FOLDERS, results_trainer_name,
                                     variant_folders_enabled, variant_settings, variant_trainer_name)

MIB_DEFAULTS = {"kd_weight": 10.0, "unce": True, "tap": "decoder.stages.-2"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (ENV_VARIANT_FOLDERS, ENV_LR, ENV_HPARAMS, "nnUNet_cimis_teacher"):
        monkeypatch.delenv(name, raising=False)


def test_variant_names():
    changed = variant_settings(MIB_DEFAULTS, dict(MIB_DEFAULTS, kd_weight=5, unce=False), 0.005, 1e-3)
    assert changed == {"kd_weight": 5, "unce": False, "lr": 0.005}
    name = variant_trainer_name("nnUNetTrainerMiB", changed)
    assert name == "nnUNetTrainerMiB_kd_weight5_unce_false_lr0p005"
    assert name.isidentifier() and "__" not in name  # nnU-Net splits folder names on "__"
    assert variant_trainer_name("nnUNetTrainerMiB", {}) == "nnUNetTrainerMiB"  # defaults: nnU-Net's name
    assert variant_trainer_name("T", {"lr": 1e-05, "w": -2.5, "tap": "decoder.stages.-2", "xs": [1, 2]}) == \
        "T_lr1em05_wm2p5_tap_decoder_stages_2_xs_1_2"
    assert variant_settings(MIB_DEFAULTS, MIB_DEFAULTS, 1e-3, 1e-3) == {}  # same lr as the default: not a variant
    long_name = variant_trainer_name("T", {"tap": "x" * 200})
    assert long_name.startswith("T_settings") and len(long_name) == len("T_settings") + 12
    assert long_name != variant_trainer_name("T", {"tap": "y" * 200})


def test_results_trainer_name_from_environment(monkeypatch):
    assert not variant_folders_enabled()
    monkeypatch.setenv(ENV_HPARAMS, json.dumps({"nnUNetTrainerMiB": {"kd_weight": 5}}))
    monkeypatch.setenv(ENV_LR, "0.005")
    assert results_trainer_name("nnUNetTrainerMiB", MIB_DEFAULTS, 1e-3, True) == "nnUNetTrainerMiB"  # off
    monkeypatch.setenv(ENV_VARIANT_FOLDERS, "1")
    assert results_trainer_name("nnUNetTrainerMiB", MIB_DEFAULTS, 1e-3, True) == "nnUNetTrainerMiB_kd_weight5_lr0p005"
    # nnUNet_cimis_lr does not apply at step 0
    assert results_trainer_name("nnUNetTrainerMiB", MIB_DEFAULTS, 1e-3, False) == "nnUNetTrainerMiB_kd_weight5"
    monkeypatch.setenv(ENV_VARIANT_FOLDERS, "maybe")
    with pytest.raises(CIMISError, match="nnUNet_cimis_variant_folders"):
        variant_folders_enabled()


def _checkpoint(results, dataset, folder_trainer):
    fold = results / dataset / f"{folder_trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"")
    return str(fold / "checkpoint_final.pth")


def test_teacher_lookup_finds_the_variant(roots, monkeypatch):
    """A sweep keeps one chain per setting: the teacher of step 2 is the step-1 model trained with the same
    settings, never the default one next to it; step 1's teacher (another trainer, the shared step-0 model)
    keeps its plain name."""
    from nnunetv2_cimis.teacher.loading import teacher_checkpoint_path
    results = roots / "results"
    ds1, ds0 = "Dataset912_XStep1", "Dataset911_XStep0"
    default = _checkpoint(results, ds1, "nnUNetTrainerMiB")
    variant = _checkpoint(results, ds1, "nnUNetTrainerMiB_kd_weight5")
    step0 = _checkpoint(results, ds0, "nnUNetTrainerFT")

    def lookup(dataset, trainer, teacher_step):
        return teacher_checkpoint_path(str(results), dataset, trainer, "nnUNetPlans", "3d_fullres", 0,
                                       teacher_step=teacher_step)

    monkeypatch.setenv(ENV_HPARAMS, json.dumps({"nnUNetTrainerMiB": {"kd_weight": 5}}))
    assert lookup(ds1, "nnUNetTrainerMiB", 1) == default  # variant folders off: nnU-Net's names
    monkeypatch.setenv(ENV_VARIANT_FOLDERS, "1")
    assert lookup(ds1, "nnUNetTrainerMiB", 1) == variant
    assert lookup(ds0, "nnUNetTrainerFT", 0) == step0
    monkeypatch.setenv(ENV_HPARAMS, json.dumps({"nnUNetTrainerMiB": {"kd_weight": 7}}))
    with pytest.raises(CIMISError, match="nnUNetTrainerMiB_kd_weight7__.*same nnUNet_cimis_hparams"):
        lookup(ds1, "nnUNetTrainerMiB", 1)  # no silent fall-back to another setting's model
    monkeypatch.setenv(ENV_HPARAMS, json.dumps({"kd_weight": 5}))  # flat: FT refuses it, so it never trained FT
    assert lookup(ds0, "nnUNetTrainerFT", 0) == step0


@pytest.mark.e2e
def test_variant_run_predict_and_next_teacher(tiny_scenario, tmp_path, monkeypatch):
    from e2e_utils import CONFIGURATION, PLANS, build_trainer, model_folder, train
    from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerFT
    from nnunetv2_cimis.training.validation import REFERENCE_FOLDER, SUMMARY_KEY
    env, steps = tiny_scenario["env"], tiny_scenario["step_datasets"]
    name = "nnUNetTrainerFT_lr0p002"
    variant_env = {ENV_VARIANT_FOLDERS: "1", ENV_LR: "0.002"}
    plain = os.path.dirname(model_folder(env, steps[1], "nnUNetTrainerFT"))
    plain_existed = os.path.isdir(plain)
    proc = train(steps[1], "nnUNetTrainerFT", env, extra_env=variant_env)
    folder = model_folder(env, steps[1], name)
    assert os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
    assert os.path.isdir(plain) == plain_existed  # no stray folder under the class name
    # the final validation scored against step references (new classes: masks; old: the teacher)
    with open(os.path.join(folder, "validation", "summary.json")) as f:
        entry = json.load(f)[SUMMARY_KEY]
    assert entry["old_labels"] == [1, 2] and entry["new_labels"] == [3, 4]
    assert entry["teacher"].endswith(os.path.join("nnUNetTrainerFT__" + PLANS + "__" + CONFIGURATION, "fold_0",
                                                  "checkpoint_final.pth"))
    assert os.listdir(os.path.join(folder, REFERENCE_FOLDER))
    assert "Mean validation Dice of the old classes (against the teacher)" in proc.stdout
    # nnUNetv2_predict finds the model by the folder's trainer part; the class comes from the checkpoint
    with open(os.path.join(env["nnUNet_raw"], steps[0], "test_set.json")) as f:
        case, files = sorted(json.load(f)["cases"].items())[0]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    os.symlink(os.path.join(env["nnUNet_raw"], steps[0], files["images"][0]), inp / f"{case}_0000.nii.gz")
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_predict")
    proc = subprocess.run([exe, "-i", str(inp), "-o", str(out), "-d", steps[1], "-c", CONFIGURATION, "-f", "0", "-tr",
                           name, "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                          env=dict(os.environ, **env), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / f"{case}.nii.gz").is_file()
    # step 2 under the same settings finds this model as its teacher; under other settings it refuses
    for k, v in variant_env.items():
        monkeypatch.setenv(k, v)
    trainer = build_trainer(steps[2], nnUNetTrainerFT)
    assert os.path.basename(trainer.output_folder_base) == f"{name}__{PLANS}__{CONFIGURATION}"
    trainer.initialize()
    assert trainer.teacher_info.checkpoint_path == os.path.join(folder, "checkpoint_final.pth")
    monkeypatch.setenv(ENV_LR, "0.003")
    trainer = build_trainer(steps[2], nnUNetTrainerFT)
    with pytest.raises(SystemExit, match="nnUNetTrainerFT_lr0p003__"):
        trainer.initialize()
