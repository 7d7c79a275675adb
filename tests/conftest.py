"""Shared fixtures. ``tiny_scenario``: one tiny phantom scenario per test session, step 0 trained with
``nnUNetTrainerFT`` for two iterations through the real ``nnUNetv2_train``."""
import os

import pytest

from e2e_utils import make_tiny_scenario, train


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test running the real nnU-Net on tiny data")


@pytest.fixture(scope="session")
def tiny_scenario(tmp_path_factory):
    old = dict(os.environ)
    root = str(tmp_path_factory.mktemp("cimis_scenario"))
    summary = make_tiny_scenario(root)
    train(summary["step_datasets"][0], "nnUNetTrainerFT", summary["env"])
    yield summary
    os.environ.clear()
    os.environ.update(old)


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Empty nnUNet_raw / _preprocessed / _results under tmp_path, set in the environment."""
    for k in ("raw", "preprocessed", "results"):
        (tmp_path / k).mkdir()
        monkeypatch.setenv(f"nnUNet_{k}", str(tmp_path / k))
    return tmp_path
