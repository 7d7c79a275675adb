"""The CT window of a scenario (nnunetv2_cimis.scenarios.intensity): parsing, fixed windows, clipped shares,
and make_scenario planning the window from step 0 only, from all steps' foreground, or fixed."""
import json
import os

import numpy as np
import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.scenarios.intensity import (clipped_fractions, clipping_warnings, ct_windows,
                                                fixed_window_properties, new_class_clipping,
                                                parse_intensity_window)


def test_parse_intensity_window():
    assert parse_intensity_window(None) == "all"
    assert parse_intensity_window("step0") == "step0"
    assert parse_intensity_window(" all ") == "all"
    assert parse_intensity_window("-150,250") == (-150.0, 250.0)
    assert parse_intensity_window([-1, 2]) == (-1.0, 2.0)
    for bad in ("250,-150", "1,1", "a,b", "1,2,3", "nan,3", "everything"):
        with pytest.raises(CIMISError, match="intensity-window"):
            parse_intensity_window(bad)


def test_fixed_window_maps_to_plus_minus_two():
    p = fixed_window_properties(-150.0, 250.0)
    assert (p["percentile_00_5"], p["percentile_99_5"]) == (-150.0, 250.0)
    # nnU-Net's CTNormalization: (clip(x) - mean) / std
    assert ((-150.0 - p["mean"]) / p["std"], (250.0 - p["mean"]) / p["std"]) == (-2.0, 2.0)


def test_clipped_fractions_hand_computed():
    image = np.array([[-200.0, -100.0, 0.0], [100.0, 200.0, 300.0]])
    label = np.array([[1, 1, 1], [2, 2, 2]])
    # window [-150, 250]: class 1 has one of three voxels below, class 2 one of three above; class 3 absent
    out = clipped_fractions([(image, label)], [1, 2, 3], (-150.0, 250.0))
    assert out == pytest.approx({1: 1 / 3, 2: 1 / 3})
    out = clipped_fractions([(image, label), (np.zeros((2, 3)), np.full((2, 3), 2))], [2], (-150.0, 250.0))
    assert out == pytest.approx({2: 1 / 9})
    with pytest.raises(CIMISError, match="shapes differ"):
        clipped_fractions([(image, label[:1])], [1], (0.0, 1.0))
    lines = clipping_warnings({1: 0.5, 2: 0.01}, {1: "stomach", 2: "liver"}, (-32.0, 77.0))
    assert len(lines) == 1 and "50 %" in lines[0] and "'stomach'" in lines[0] and "[-32, 77]" in lines[0]


def test_ct_windows_reads_only_ct_channels():
    plans = {"foreground_intensity_properties_per_channel": {"0": fixed_window_properties(-1, 1),
                                                             "1": fixed_window_properties(0, 5)},
             "configurations": {"3d_fullres": {"normalization_schemes": ["CTNormalization", "ZScoreNormalization"]}}}
    assert ct_windows(plans) == {0: (-1.0, 1.0)}


@pytest.fixture(scope="module")
def window_scenarios(tmp_path_factory):
    """One phantom, three scenarios (liver+spleen first, then stomach+kidney): windows step0, all, fixed."""
    from e2e_utils import nnunet_env
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.scenarios.make_scenario import make_scenario
    root = str(tmp_path_factory.mktemp("window"))
    env = nnunet_env(root)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    write_abdominal_phantom(env["nnUNet_raw"], 700, 8, shape=(16, 16, 16), seed=0,
                            organs=["liver", "stomach", "spleen", "kidney_left"])
    plans = {}
    try:
        for window, ids in (("step0", (701, 702)), ("all", (711, 712)), ("-150,250", (721, 722))):
            s = make_scenario("700", "liver,spleen;stomach,kidney_left", list(ids), test_fraction=0.25, seed=0,
                              plans_name="nnUNetPlansW", features_per_stage=(4, 8), intensity_window=window)
            with open(os.path.join(env["nnUNet_preprocessed"], s["step_datasets"][0], "nnUNetPlansW.json")) as f:
                plans[window] = json.load(f)
            plans[window + "_summary"] = s
        yield env, plans
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_make_scenario_windows(window_scenarios):
    _, plans = window_scenarios
    step0, all_, fixed = (ct_windows(plans[w])[0] for w in ("step0", "all", "-150,250"))
    # step 0 plans on liver (100 HU, contrast-filled vessels 180 HU) and spleen (125 HU) only: the stomach's
    # fluid (10 HU) and air fall below it
    assert 50 < step0[0] < 100 < 125 < step0[1] < 200
    # all steps' foreground: the stomach's air cap (-800 HU) and the kidney (150 HU) are inside
    assert all_[0] < -500 and all_[1] > 150
    assert fixed == (-150.0, 250.0)
    assert plans["all_summary"]["intensity_window"] == "all"
    assert plans["-150,250_summary"]["intensity_window"] == [-150.0, 250.0]


def test_new_class_clipping_measures_the_step0_window(window_scenarios):
    """What add_classes reports: the step-0 window clips most of the stomach, the fixed window none of it."""
    env, plans = window_scenarios
    from nnunetv2_cimis.scenarios.datasets import SegmentationIO, load_raw_dataset
    name = plans["step0_summary"]["step_datasets"][1]
    _, ds, cases = load_raw_dataset(name)
    io = SegmentationIO(ds, cases[sorted(cases)[0]]["images"][0])
    values = {"stomach": ds["labels"]["stomach"], "kidney_left": ds["labels"]["kidney_left"]}
    fractions, warnings = new_class_clipping(plans["step0"], io, cases, values)
    assert fractions["stomach"] > 0.9  # fluid 10 HU and air: all below a window that starts above 50 HU
    assert any("'stomach'" in w for w in warnings)
    fractions, warnings = new_class_clipping(plans["-150,250"], io, cases, values)
    assert fractions["kidney_left"] < 0.05 and not any("kidney_left" in w for w in warnings)
