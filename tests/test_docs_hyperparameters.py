"""Each method's hyperparameters are stated once, in its ``default_hyperparameters`` dict; the table of its docs
page must list exactly those names with exactly those defaults (a JSON literal in the "default" column), so
the two cannot drift. The trainer docstrings point to the docs page instead of repeating the table."""
import json
import os
import re

import pytest

from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerFT
from nnunetv2_cimis.training.trainers.ddcl import nnUNetTrainerDDCL
from nnunetv2_cimis.training.trainers.iapl import nnUNetTrainerIAPL
from nnunetv2_cimis.training.trainers.ilt import nnUNetTrainerILT
from nnunetv2_cimis.training.trainers.lwf import nnUNetTrainerLwF
from nnunetv2_cimis.training.trainers.mib import nnUNetTrainerMiB
from nnunetv2_cimis.training.trainers.mosinv import nnUNetTrainerMOSInv
from nnunetv2_cimis.training.trainers.pgcd_dapd import nnUNetTrainerPGCDDAPD
from nnunetv2_cimis.training.trainers.plop import nnUNetTrainerPLOP

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")

#: docs page -> {value of the table's "trainer" column (None: the page has no such column) -> trainer class}
PAGES = {
    "trainers_baselines.md": {"FT": nnUNetTrainerFT, "LwF": nnUNetTrainerLwF, "ILT": nnUNetTrainerILT,
                              "MiB": nnUNetTrainerMiB, "PLOP": nnUNetTrainerPLOP},
    "methods_mosinversion.md": {None: nnUNetTrainerMOSInv},
    "methods_ddcl.md": {None: nnUNetTrainerDDCL},
    "methods_pgcd_dapd.md": {None: nnUNetTrainerPGCDDAPD},
    "methods_iapl.md": {None: nnUNetTrainerIAPL},
}


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def hyperparameter_tables(text):
    """Rows of every markdown table whose header has a "name" and a "default" column, as dicts by header."""
    rows, header = [], None
    for line in text.splitlines() + [""]:
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells if "default" in cells and "name" in cells else []
        elif header and not set(line) <= set("|-: "):
            rows.append(dict(zip(header, cells)))
    return rows


def documented_defaults(page):
    """trainer class -> {name: default} from the page's table."""
    found = {cls: {} for cls in PAGES[page].values()}
    with open(os.path.join(DOCS, page)) as f:
        rows = hyperparameter_tables(f.read())
    assert rows, f"docs/{page} has no hyperparameter table (columns 'name' and 'default')"
    for row in rows:
        name = re.fullmatch(r"`(\w+)`(?: \(.*\))?", row["name"])
        assert name, f"docs/{page}: the name cell {row['name']!r} must be one `name` (one row per hyperparameter)"
        literal = row["default"].strip("`")
        try:
            value = json.loads(literal)
        except json.JSONDecodeError:
            raise AssertionError(f"docs/{page}: the default of {name.group(1)} ({row['default']!r}) is not a JSON "
                                 f"literal") from None
        trainers = [t.strip() for t in row["trainer"].split(",")] if "trainer" in row else [None]
        for t in trainers:
            assert t in PAGES[page], f"docs/{page}: unknown trainer {t!r}"
            found[PAGES[page][t]][name.group(1)] = value
    return found


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("page", sorted(PAGES))
def test_docs_table_equals_default_hyperparameters(page):
    for cls, documented in documented_defaults(page).items():
        defaults = cls.default_hyperparameters
        assert sorted(documented) == sorted(defaults), (f"docs/{page} documents {sorted(documented)} for "
                                                        f"{cls.__name__}, the code has {sorted(defaults)}")
        wrong = {k: (documented[k], defaults[k]) for k in defaults if not _same(documented[k], defaults[k])}
        assert not wrong, f"docs/{page}: (documented, code) defaults of {cls.__name__} differ: {wrong}"


def test_table_parser_sees_a_drift():
    text = "| name | default | status |\n| --- | --- | --- |\n| `kd_weight` | `5.0` | x |\n| `a` | `true` | y |\n"
    rows = hyperparameter_tables(text)
    assert [(r["name"], r["default"]) for r in rows] == [("`kd_weight`", "`5.0`"), ("`a`", "`true`")]
    assert not _same(json.loads("5.0"), 10.0) and not _same(json.loads("1"), True) and _same(1.0, 1)
