"""The command-line reference page, generated from the commands' own argparse definitions.

    python -m nnunetv2_cimis.cli_reference > docs/cli.md

Every console command of the package (the ``console_scripts`` of its distribution metadata, i.e. setup.py) is
run up to its ``parse_args`` call, where the parser it built is captured instead of parsing anything; the page
lists each command's description and every option (spellings, value, default, help). The rendering reads the
parser's actions rather than ``format_help()``, so the page does not depend on the terminal width or on the
Python version's help layout. tests/test_packaging.py keeps docs/cli.md equal to this output.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import textwrap
from typing import Dict, List

DISTRIBUTION = "nnunetv2-cimis"


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def console_scripts() -> Dict[str, str]:
    """Command name -> ``module:function`` of the installed distribution, sorted by name."""
    from importlib.metadata import distribution
    eps = [ep for ep in distribution(DISTRIBUTION).entry_points if ep.group == "console_scripts"]
    return {ep.name: ep.value for ep in sorted(eps, key=lambda e: e.name)}


def load_entry_point(value: str):
    module, _, attr = value.partition(":")
    obj = importlib.import_module(module.strip())
    for part in attr.strip().split("."):
        obj = getattr(obj, part)
    return obj


def capture_parser(value: str, prog: str) -> argparse.ArgumentParser:
    """Run the entry point ``module:function`` until it parses its arguments; return the parser it built."""
    func = load_entry_point(value)
    original = argparse.ArgumentParser.parse_known_args

    def intercept(self, args=None, namespace=None):
        raise _Captured(self)

    old_argv0 = sys.argv[0]
    argparse.ArgumentParser.parse_known_args = intercept
    sys.argv[0] = prog  # parsers without an explicit prog take the command's name from argv[0]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            func([])
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv[0] = old_argv0
    raise RuntimeError(f"{value} returned without parsing its arguments with argparse")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _expand_help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        params = dict(vars(action), prog=prog)
        params["choices"] = ", ".join(map(str, action.choices)) if action.choices else ""
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    return text


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        name = "{" + ",".join(map(str, action.choices)) + "}"
    elif isinstance(action.metavar, str):
        name = action.metavar
    else:
        name = action.dest.upper()
    if action.nargs in ("+", "*"):
        return f"{name} [{name} ...]" if action.nargs == "+" else f"[{name} ...]"
    if action.nargs == "?":
        return f"[{name}]"
    if isinstance(action.nargs, int) and action.nargs > 1:
        return " ".join([name] * action.nargs)
    return name


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    d = action.default
    if isinstance(d, (list, tuple)):
        d = " ".join(map(str, d))
    return f"`{d}`"


def describe(name: str, parser: argparse.ArgumentParser) -> List[str]:
    out = [f"## {name}", ""]
    if parser.description:
        text = parser.description.strip("\n")
        if not issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter):
            # argparse re-wraps such descriptions itself; wrap them the same way at a fixed width
            text = "\n\n".join(textwrap.fill(" ".join(par.split()), 110) for par in text.split("\n\n"))
        out += ["```text", text, "```", ""]
    out += ["| option | value | default | meaning |", "| --- | --- | --- | --- |"]
    for action in parser._actions:  # the parser's own list of arguments, in definition order
        if action.help == argparse.SUPPRESS:
            continue
        flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}` (positional)"
        value = _value(action)
        out.append(f"| {flags} | {_cell(value) and '`' + _cell(value) + '`'} | {_cell(_default(action))} | "
                   f"{_cell(_expand_help(action, name))} |")
    return out + [""]


def generate() -> str:
    scripts = console_scripts()
    lines = ["# Command-line reference", "",
             "Generated from the commands' argparse definitions by `python -m nnunetv2_cimis.cli_reference > "
             "docs/cli.md`; do not edit by hand (tests/test_packaging.py checks that it is up to date). Every "
             "command also answers `-h` and `--version`. nnU-Net's own commands (`nnUNetv2_train`, "
             "`nnUNetv2_predict`, ...) are documented by nnU-Net.", ""]
    lines += [f"- [{n}](#{n.lower()})" for n in scripts] + [""]
    for name, value in scripts.items():
        lines += describe(name, capture_parser(value, name))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> None:
    from nnunetv2_cimis.command_options import add_version_argument
    p = argparse.ArgumentParser(prog="python -m nnunetv2_cimis.cli_reference",
                                description="Print the Markdown command-line reference (docs/cli.md).")
    add_version_argument(p)
    p.parse_args(argv)
    sys.stdout.write(generate())


if __name__ == "__main__":
    main()
