"""Tests of nnunetv2_cimis.synthesis.diffusion: tiny DDPM training, saving, DDIM sampling, the resumable cache."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from nnunetv2_cimis.errors import CIMISError  # noqa: E402
from nnunetv2_cimis.synthesis.diffusion import (DiffusionConfig, IntensityScaler, SyntheticImageCache,  # noqa: E402
                                                crops_for_diffusion, load_diffusion_model, sample_images,
                                                save_diffusion_model, train_diffusion_model)

TINY = dict(image_size=8, block_channels=(8, 16), norm_groups=4, layers_per_block=1, num_train_timesteps=50,
            train_iterations=3, batch_size=4, sampling_steps=3)


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    torch.set_num_threads(1)
    images = torch.rand(6, 3, 8, 8) * 4 + 10
    model = train_diffusion_model(images, DiffusionConfig(**TINY), log=lambda s: None)
    folder = str(tmp_path_factory.mktemp("diffusion") / "model")
    save_diffusion_model(model, folder, extra_meta={"step": 0})
    return folder, model


def test_config_checks():
    with pytest.raises(ValueError, match="divisible"):
        DiffusionConfig(image_size=10, block_channels=(8, 16, 32), norm_groups=4)
    with pytest.raises(ValueError, match="multiples"):
        DiffusionConfig(block_channels=(12, 16), norm_groups=8)
    with pytest.raises(ValueError, match="sampling_steps"):
        DiffusionConfig(num_train_timesteps=10, sampling_steps=20)
    with pytest.raises(ValueError, match="train_iterations"):
        DiffusionConfig(train_iterations=0)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionConfig(prediction_type="noise")


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_other_prediction_types_train_and_sample(prediction_type, tmp_path):
    images = torch.rand(4, 3, 8, 8)
    model = train_diffusion_model(images, DiffusionConfig(**dict(TINY, prediction_type=prediction_type)),
                                  log=lambda s: None)
    folder = save_diffusion_model(model, str(tmp_path / "m"))
    loaded = load_diffusion_model(folder)
    assert loaded.scheduler_config["prediction_type"] == prediction_type
    out = sample_images(loaded, [0, 1])
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_intensity_scaler_round_trip_and_values():
    x = torch.tensor([[[[0.0, 10.0]], [[-1.0, 1.0]]]])  # (1, 2, 1, 2)
    s = IntensityScaler(low=[0.0, -1.0], high=[10.0, 1.0])
    assert s.to_model(x).tolist() == [[[[-1.0, 1.0]], [[-1.0, 1.0]]]]
    assert s.to_model(torch.tensor([[[[5.0]], [[0.0]]]])).flatten().tolist() == [0.0, 0.0]
    assert torch.allclose(s.from_model(s.to_model(x)), x)
    fitted = IntensityScaler.fit(torch.arange(201.0).view(1, 1, 201, 1), 0.5, 99.5)
    assert fitted.low[0] == pytest.approx(1.0) and fitted.high[0] == pytest.approx(199.0)
    const = IntensityScaler.fit(torch.ones(2, 1, 3, 3))
    assert const.high[0] - const.low[0] == pytest.approx(1.0)


def test_crops_shape_and_padding():
    rng = np.random.default_rng(0)
    img = np.zeros((3, 1, 20, 12), dtype=np.float32)
    img[:, :, :, :] = 2.0
    crops = crops_for_diffusion(img, (1, 16, 16), 8, 5, rng)
    assert crops.shape == (5, 3, 8, 8)
    # the 12-wide image is zero padded to the 16-wide patch: right part averages to 0
    assert crops[:, :, :, -1].abs().max() < 1e-6 and crops[:, :, :, 0].min() > 1.9
    with pytest.raises(ValueError, match="image"):
        crops_for_diffusion(np.zeros((3, 2, 4, 4)), (4, 4), 4, 1, rng)


def test_train_rejects_bad_images():
    with pytest.raises(ValueError, match="\\(N, C, 8, 8\\)"):
        train_diffusion_model(torch.rand(2, 3, 16, 16), DiffusionConfig(**TINY))


def test_save_load_round_trip(tiny_model_folder):
    folder, model = tiny_model_folder
    loaded = load_diffusion_model(folder)
    assert loaded.num_channels == 3 and loaded.config == model.config
    assert loaded.scaler == model.scaler and loaded.meta["step"] == 0
    for (k, a), (_, b) in zip(model.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), k
    with open(os.path.join(folder, "cimis_diffusion.json")) as f:
        assert json.load(f)["config"]["image_size"] == 8


def test_load_missing_or_broken_model_raises(tmp_path):
    with pytest.raises(CIMISError, match="No diffusion model"):
        load_diffusion_model(str(tmp_path / "nothing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cimis_diffusion.json").write_text("{not json")
    with pytest.raises(CIMISError, match="cannot be read"):
        load_diffusion_model(str(tmp_path / "broken"))


def test_sampling_is_per_index_deterministic_and_in_data_range(tiny_model_folder):
    folder, _ = tiny_model_folder
    model = load_diffusion_model(folder)
    a = sample_images(model, [0, 1, 2], seed=3)
    b = sample_images(model, [2], seed=3)
    assert a.shape == (3, 3, 8, 8)
    assert torch.allclose(a[2], b[0], atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    lo, hi = torch.tensor(model.scaler.low), torch.tensor(model.scaler.high)
    assert (a >= lo.view(1, 3, 1, 1) - 1e-4).all() and (a <= hi.view(1, 3, 1, 1) + 1e-4).all()


def test_cache_is_resumable_and_invalidated(tiny_model_folder, tmp_path):
    folder, _ = tiny_model_folder
    cache_dir = str(tmp_path / "cache")
    cache = SyntheticImageCache(cache_dir, [folder, folder], num_samples=4, sampling_steps=2, seed=1, batch_size=3)
    with pytest.raises(CIMISError, match="missing"):
        cache.load()
    stats = cache.ensure(log=lambda s: None)
    assert stats["sampled"] == 4
    full = cache.load()
    assert full.shape == (4, 3, 8, 8)
    # interrupted run: one sample lost, only that one is drawn again, identical to before
    os.remove(cache.path(2))
    again = SyntheticImageCache(cache_dir, [folder, folder], num_samples=4, sampling_steps=2, seed=1, batch_size=1)
    assert again.ensure(log=lambda s: None)["sampled"] == 1
    assert torch.allclose(again.load(), full, atol=1e-5)
    # nothing to do the next time
    assert again.ensure(log=lambda s: None)["sampled"] == 0
    # other settings: everything is resampled
    other = SyntheticImageCache(cache_dir, [folder], num_samples=2, sampling_steps=3, seed=1)
    assert other.ensure(log=lambda s: None)["sampled"] == 2
    assert not os.path.exists(cache.path(3))


def test_cache_checks(tmp_path):
    with pytest.raises(ValueError, match="model_folders"):
        SyntheticImageCache(str(tmp_path), [], 2)
    with pytest.raises(CIMISError, match="No diffusion model"):
        SyntheticImageCache(str(tmp_path / "c"), [str(tmp_path / "none")], 2).ensure(log=lambda s: None)
