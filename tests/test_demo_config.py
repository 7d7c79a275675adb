"""The demo's per-kind defaults are consistent: the scenario parses into ``num_steps`` steps over the organs the
phantom draws, the minimum trainer list of the benchmark is there, and bad arguments are refused early."""
import pytest

from nnunetv2_cimis.demo import KINDS, run_demo
from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.phantom.abdominal3d import ORGANS
from nnunetv2_cimis.scenarios.scenario import parse_scenario


def test_abdominal_kind_is_consistent():
    k = KINDS["abdominal3d"]
    organs = [o for o in ORGANS if o in k.organs]  # the phantom's label order
    groups = parse_scenario(k.scenario, organs)
    assert len(groups) == k.num_steps and sorted(sum(groups, [])) == sorted(organs)
    assert {"nnUNetTrainerFT", "nnUNetTrainerMiB", "nnUNetTrainerPLOP", "nnUNetTrainerPGCDDAPD"} <= set(
        k.default_trainers)
    assert k.configuration == "3d_fullres" and k.intensity_window == (-150.0, 250.0)


def test_bad_demo_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(CIMISError, match="Unknown phantom kind"):
        run_demo(str(tmp_path / "x"), kind="mri")
    with pytest.raises(CIMISError, match="Unknown or unsuitable trainers"):
        run_demo(str(tmp_path / "y"), trainers=["nnUNetTrainerNope"])
    with pytest.raises(CIMISError, match="--features-per-stage takes positive integers"):
        run_demo(str(tmp_path / "z"), features=[24, 0])
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


def test_chains_start_longest_first():
    from nnunetv2_cimis.demo import chain_order
    assert chain_order(["nnUNetTrainerFT", "nnUNetTrainerMiB", "nnUNetTrainerDDCL"]) == [
        "nnUNetTrainerDDCL", "nnUNetTrainerMiB", "nnUNetTrainerFT"]
    assert chain_order(["nnUNetTrainerFT", "nnUNetTrainerMiB", "nnUNetTrainerPLOP", "nnUNetTrainerPGCDDAPD"]) == [
        "nnUNetTrainerPLOP", "nnUNetTrainerMiB", "nnUNetTrainerPGCDDAPD", "nnUNetTrainerFT"]
