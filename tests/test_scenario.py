"""Tests of nnunetv2_cimis.scenarios.scenario: parsing scenario specs into class-name groups."""
import json

import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.scenarios.scenario import load_presets, parse_scenario, scenario_label

NAMES = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "stomach"]


def test_split_string_in_label_order():
    assert parse_scenario("2-2-2", NAMES) == [["liver", "spleen"], ["left kidney", "right kidney"],
                                              ["pancreas", "stomach"]]


def test_split_string_uneven_and_with_spaces_around():
    assert parse_scenario("  1-3-2 ", NAMES) == [["liver"], ["spleen", "left kidney", "right kidney"],
                                                 ["pancreas", "stomach"]]


def test_fewer_classes_than_the_dataset():
    assert parse_scenario("1-2", NAMES) == [["liver"], ["spleen", "left kidney"]]


def test_explicit_groups_by_name():
    assert parse_scenario("pancreas,liver;stomach", NAMES) == [["pancreas", "liver"], ["stomach"]]


def test_explicit_groups_strip_spaces_and_keep_names_with_spaces():
    assert parse_scenario(" left kidney , right kidney ; spleen", NAMES) == [["left kidney", "right kidney"],
                                                                            ["spleen"]]


def test_json_list_of_lists():
    spec = json.dumps([["stomach"], ["liver", "spleen"], ["pancreas"]])
    assert parse_scenario(spec, NAMES) == [["stomach"], ["liver", "spleen"], ["pancreas"]]


def test_result_is_a_fresh_list():
    groups = parse_scenario("2-2", NAMES)
    groups[0].append("x")
    assert parse_scenario("2-2", NAMES)[0] == ["liver", "spleen"]


@pytest.mark.parametrize("spec,match", [
    ("liver;kidney", "does not have"),                 # unknown class
    ("liver,spleen;liver", "twice"),                   # class twice
    ('[["liver"], ["liver"]]', "twice"),               # class twice in JSON
    ("4-3", "needs 7 classes"),                        # more classes than exist
    ("2-0-2", "0 classes"),                            # a 0 step
    ("0-2", "0 classes"),
    ("6", "at least 2"),                               # a single step (split)
    ("liver,spleen", "at least 2"),                    # a single step (names)
    ('[["liver"]]', "at least 2"),                     # a single step (JSON)
    ("2--2", "Malformed"),
    ("2-2-", "Malformed"),
    ("-2-2", "Malformed"),
    ("liver;;spleen", "empty"),
    ("liver,;spleen", "empty"),
    ("liver;spleen;", "empty"),
    ("btcv:9-9", "Unknown scenario preset"),
    ("nosuchdataset:2-2", "Unknown scenario preset"),
    ('[["liver"], ["spleen"]', "not valid JSON"),
    ('[["liver"], "spleen"]', "list of lists"),
    ('[["liver"], []]', "empty"),
    ('[["liver"], ["spleen", 3]]', "empty class name"),
    ("", "empty"),
    ("   ", "empty"),
])
def test_bad_specs_raise(spec, match):
    with pytest.raises(CIMISError, match=match):
        parse_scenario(spec, NAMES)


def test_empty_middle_step_with_single_letter_names():
    with pytest.raises(CIMISError, match="Step 1 .* empty"):
        parse_scenario("a;;b", ["a", "b", "c"])
    with pytest.raises(CIMISError, match="Malformed"):
        parse_scenario("2--2", ["a", "b", "c", "d"])


def test_unknown_class_message_lists_the_dataset_classes():
    with pytest.raises(CIMISError) as e:
        parse_scenario("liver;heart", NAMES)
    assert "'heart'" in str(e.value) and "pancreas" in str(e.value)


def test_scenario_label():
    assert scenario_label("2-2-2", parse_scenario("2-2-2", NAMES)) == "2-2-2"
    groups = parse_scenario("pancreas,liver;stomach", NAMES)
    assert scenario_label("pancreas,liver;stomach", groups) == "2-1"


def test_btcv_preset_resolves():
    presets = load_presets()
    if "btcv:4-4-5" not in presets:
        pytest.skip("no BTCV preset file installed in nnunetv2_cimis/scenarios/presets/")
    steps = presets["btcv:4-4-5"]["steps"]
    assert [len(s) for s in steps] == [4, 4, 5]
    names = [c for s in steps for c in s]
    assert len(set(names)) == 13
    assert parse_scenario("btcv:4-4-5", names) == steps
    assert parse_scenario("BTCV:4-4-5", names) == steps  # the dataset part is case-insensitive
    assert scenario_label("btcv:4-4-5", steps) == "btcv:4-4-5"
    # the preset's names are checked against the dataset's classes
    with pytest.raises(CIMISError, match="does not have"):
        parse_scenario("btcv:4-4-5", names[:-1])
