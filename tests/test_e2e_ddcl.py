"""End-to-end: 2D laparoscopic phantom -> scenario "3-3" -> nnUNetv2_train -tr nnUNetTrainerDDCL (2d) for both
steps -> resume state -> nnUNetv2_predict, through the real nnU-Net commands on tiny data.

Tiny: 10 frames of 64 x 64, network features 4..32, 1 epoch of 2 iterations, a diffusion model of a few
iterations on 16 x 16 images, 4 synthetic images. About two minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from e2e_utils import nnunet_env

pytestmark = pytest.mark.e2e

PLANS = "nnUNetPlansTiny2D"
CONFIGURATION = "2d"
TRAINER = "nnUNetTrainerDDCL"
HPARAMS = {"diffusion_image_size": 16, "diffusion_channels": [8, 16], "diffusion_train_iterations": 3,
           "diffusion_batch_size": 4, "diffusion_crops_per_case": 2, "diffusion_sampling_steps": 2,
           "num_synthetic": 4, "contrast_queue_size": 20, "contrast_anchors_per_class": 16}


def _exe(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _fold_folder(env, dataset):
    return os.path.join(env["nnUNet_results"], dataset, f"{TRAINER}__{PLANS}__{CONFIGURATION}", "fold_0")


@pytest.fixture(scope="module")
def ddcl_run(tmp_path_factory):
    from nnunetv2_cimis.phantom.laparoscopic2d import write_laparoscopic_phantom
    from nnunetv2_cimis.scenarios.make_scenario import make_scenario
    import nnunetv2.experiment_planning.plan_and_preprocess_api as api
    old = dict(os.environ)
    root = str(tmp_path_factory.mktemp("ddcl_e2e"))
    env = nnunet_env(root, iterations=2, epochs=1, val_iterations=1)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): 0 is only valid for training
    os.environ.update(env, nnUNet_n_proc_DA="1")
    try:
        write_laparoscopic_phantom(env["nnUNet_raw"], 960, 10, seed=0, shape=(64, 64))
        fingerprinted = []
        real_extract = api.extract_fingerprint_dataset

        def spy(dataset, extractor, *args):
            fingerprinted.append((int(dataset), extractor))
            return real_extract(dataset, extractor, *args)

        api.extract_fingerprint_dataset = spy
        try:
            summary = make_scenario("960", "3-3", [961, 962], test_fraction=0.2, seed=0,
                                    configuration=CONFIGURATION, plans_name=PLANS,
                                    features_per_stage=(4, 8, 16, 32, 32, 32, 32), step0_trainer=TRAINER,
                                    num_processes=1, fingerprint_samples=10 ** 5)
        finally:
            api.extract_fingerprint_dataset = real_extract
        full_env = dict(os.environ, **env, nnUNet_cimis_hparams=json.dumps(HPARAMS))
        steps = summary["step_datasets"]
        logs = []
        for ds in steps:
            logs.append(_run([_exe("nnUNetv2_train"), ds, CONFIGURATION, "0", "-tr", TRAINER, "-p", PLANS,
                              "-device", "cpu"], full_env))
        yield {"env": full_env, "steps": steps, "summary": summary, "logs": logs, "fingerprinted": fingerprinted}
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_rgb_scenario_fingerprints_step0_only(ddcl_run):
    """The default window 'all' is read by CTNormalization only: RGB frames need no joint-dataset fingerprint;
    the one fingerprint draws the asked number of foreground pixels."""
    [(dataset, extractor)] = ddcl_run["fingerprinted"]
    assert dataset == 961 and ddcl_run["summary"]["intensity_window"] == "all"
    step0 = ddcl_run["summary"]["step_datasets"][0]
    assert extractor(step0, 1, False).num_foreground_voxels_for_intensitystats == 10 ** 5


def test_step0_writes_diffusion_model(ddcl_run):
    from nnunetv2_cimis.memory.step_memory import StepMemory
    folder = _fold_folder(ddcl_run["env"], ddcl_run["steps"][0])
    assert os.path.isfile(os.path.join(folder, "diffusion_model", "cimis_diffusion.json"))
    memory = StepMemory.load(os.path.join(folder, "step_memory.pth"))
    entries = memory.extra["ddcl_diffusion_models"]
    assert [e["step"] for e in entries] == [0]
    assert entries[0]["relative_to_results"].endswith(os.path.join("fold_0", "diffusion_model"))


def test_step1_replays_and_keeps_state(ddcl_run):
    from nnunetv2_cimis.memory.step_memory import StepMemory
    folder = _fold_folder(ddcl_run["env"], ddcl_run["steps"][1])
    cache = os.path.join(folder, "synthetic_cache")
    assert sorted(f for f in os.listdir(cache) if f.endswith(".npy")) == [f"sample_{i:05d}.npy" for i in range(4)]
    memory = StepMemory.load(os.path.join(folder, "step_memory.pth"))
    assert [e["step"] for e in memory.extra["ddcl_diffusion_models"]] == [0, 1]
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    state = ckpt["cimis_state"]["method"]
    assert state["synthetic_cache_folder"] == cache
    assert state["queue"]["count"].sum() > 0  # the queues were filled during training
    # the projection head stays out of the network: inference loads plain nnU-Net weights
    assert not any("projection" in k for k in ckpt["network_weights"])
    log = open([os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("training_log")][0]).read()
    assert "DDCL: 4 synthetic images from 1 diffusion model(s)" in log


def test_resume_restores_head_queue_and_cache(ddcl_run):
    """What ``--c`` does: initialize, load the checkpoint; then the cached synthetic images are reused."""
    from nnunetv2_cimis.training.trainers.ddcl import nnUNetTrainerDDCL
    env = ddcl_run["env"]
    ds = ddcl_run["steps"][1]
    old = dict(os.environ)
    os.environ.update(env)
    try:
        pre = os.path.join(env["nnUNet_preprocessed"], ds)
        with open(os.path.join(pre, PLANS + ".json")) as f:
            plans = json.load(f)
        plans["continue_training"] = True  # as nnUNetv2_train --c sets it
        with open(os.path.join(pre, "dataset.json")) as f:
            dataset_json = json.load(f)
        trainer = nnUNetTrainerDDCL(plans, CONFIGURATION, 0, dataset_json, torch.device("cpu"))
        path = os.path.join(_fold_folder(env, ds), "checkpoint_final.pth")
        trainer.load_checkpoint(path)
        saved = torch.load(path, map_location="cpu", weights_only=False)["cimis_state"]["method"]
        for k, v in saved["queue"].items():
            assert torch.equal(trainer.queue.state_dict()[k].cpu(), v), k
        for k, v in saved["projection_head"].items():
            assert torch.equal(trainer.projection_head.state_dict()[k].cpu(), v), k
        # the optimizer has the head's parameter group
        assert len(trainer.optimizer.param_groups) == 2
        before = {f: os.path.getmtime(os.path.join(saved["synthetic_cache_folder"], f))
                  for f in os.listdir(saved["synthetic_cache_folder"]) if f.endswith(".npy")}
        trainer.on_incremental_train_start()
        assert trainer.synthetic_images.shape[0] == 4
        after = {f: os.path.getmtime(os.path.join(saved["synthetic_cache_folder"], f)) for f in before}
        assert before == after  # reused, not resampled

        # one training iteration: the synthetic image joins the batch, the teacher sees it, the loss is finite
        seen = {}
        original = trainer.compute_loss

        def spy(output, target, ctx):
            seen["student"], seen["teacher"] = output[0].shape[0], ctx.teacher_output[0].shape[0]
            seen["target"] = target[0].shape[0]
            return original(output, target, ctx)

        trainer.compute_loss = spy
        scales = trainer._get_deep_supervision_scales()
        target = [torch.zeros(2, 1, round(64 * s[0]), round(64 * s[1])) for s in scales]
        for t in target:
            t[:, :, : t.shape[2] // 2] = 4  # a new class
        queued = trainer.queue.queue.clone()
        out = trainer.train_step({"data": torch.randn(2, 3, 64, 64), "target": target})
        assert seen == {"student": 3, "teacher": 3, "target": 3}
        assert float(out["loss"]) == float(out["loss"])  # not NaN
        assert not torch.equal(trainer.queue.queue, queued)  # new embeddings were pushed
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_predict_with_ddcl_model(ddcl_run, tmp_path):
    env = ddcl_run["env"]
    ds = ddcl_run["steps"][1]
    raw_images = os.path.join(env["nnUNet_raw"], "Dataset960_LaparoscopicPhantom", "imagesTr")
    inp = tmp_path / "in"
    inp.mkdir()
    first = sorted(os.listdir(raw_images))[0]
    os.symlink(os.path.join(raw_images, first), inp / first)
    out = tmp_path / "out"
    _run([_exe("nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", ds, "-c", CONFIGURATION, "-tr", TRAINER,
          "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert os.path.isfile(out / first.replace("_0000.png", ".png"))


def test_missing_replay_model_is_a_clear_error(ddcl_run):
    """A step whose teacher was not trained with DDCL stops with a message (default missing_replay_model)."""
    from nnunetv2_cimis.memory.step_memory import StepMemory
    env = ddcl_run["env"]
    folder0 = _fold_folder(env, ddcl_run["steps"][0])
    mem_path = os.path.join(folder0, "step_memory.pth")
    backup = mem_path + ".bak"
    os.replace(mem_path, backup)
    try:
        memory = StepMemory.load(backup)
        memory.extra = {}
        memory.save(mem_path)
        proc = subprocess.run([_exe("nnUNetv2_train"), ddcl_run["steps"][1], CONFIGURATION, "0", "-tr", TRAINER,
                               "-p", PLANS, "-device", "cpu"], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode != 0
        assert "left no diffusion model" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        os.replace(backup, mem_path)
