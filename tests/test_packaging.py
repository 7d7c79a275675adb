"""Packaging: setup.py's requirements and extras, the converters' install location (a real wheel is built and
inspected), --version on every console command, docs/cli.md in sync with the argparse definitions, the
README's nnUNet_extTrainer line, the missing-diffusers error, flag aliases."""
import os
import re
import runpy
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution, version
from pathlib import Path

import pytest
import setuptools

import nnunetv2_cimis
from nnunetv2_cimis.command_options import version_string
from nnunetv2_cimis.cli_reference import capture_parser, generate, load_entry_point
from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.trainer_folder import trainer_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_kwargs():
    """The keyword arguments setup.py passes to setuptools.setup (captured, nothing is built)."""
    captured = {}
    original = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original
        os.chdir(cwd)
    return captured


def _console_scripts(kw):
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in kw["entry_points"]["console_scripts"])


def _requirement_names(reqs):
    return [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs]


def test_requirements(setup_kwargs):
    from packaging.specifiers import SpecifierSet
    kw = setup_kwargs
    assert kw["version"] == nnunetv2_cimis.__version__
    assert kw["python_requires"] == ">=3.10"
    names = _requirement_names(kw["install_requires"])
    assert "torch" not in names, "torch is left to nnunetv2's requirement (a user's CUDA torch must not be replaced)"
    assert "diffusers" not in names
    (nnunet,) = [r for r in kw["install_requires"] if r.startswith("nnunetv2")]
    spec = SpecifierSet(nnunet[len("nnunetv2"):])
    assert version("nnunetv2") in spec, f"the installed (tested) nnunetv2 {version('nnunetv2')} is outside {spec}"
    assert any(s.operator == "<" for s in spec), "nnunetv2 needs an upper bound (the code uses its internals)"
    assert "2.9.0" not in spec
    assert _requirement_names(kw["extras_require"]["ddcl"]) == ["diffusers"]
    assert {"pytest", "diffusers"} <= set(_requirement_names(kw["extras_require"]["test"]))
    assert (REPO / "LICENSE").is_file() and "Apache License" in (REPO / "LICENSE").read_text()
    assert kw["license"] == "Apache-2.0"
    assert (REPO / "CHANGELOG.md").is_file()


def test_converters_live_under_the_package_namespace(setup_kwargs):
    kw = setup_kwargs
    assert not [p for p in kw["packages"] if p.split(".")[0] != "nnunetv2_cimis"]
    assert kw["package_dir"] == {"nnunetv2_cimis.dataset_conversion": "dataset_conversion"}
    scripts = _console_scripts(kw)
    converters = {k: v for k, v in scripts.items() if k.startswith("nnUNetv2_cimis_convert_")}
    assert len(converters) == 9
    assert all(v.startswith("nnunetv2_cimis.dataset_conversion.") for v in converters.values())
    from nnunetv2_cimis.dataset_conversion import btcv, common
    assert Path(btcv.__file__).parent == REPO / "dataset_conversion"
    assert btcv.make_parser is common.make_parser  # the modules import each other under the package name


def test_wheel_installs_no_generic_top_level_package(tmp_path):
    """A real (non-editable) build: only nnunetv2_cimis at top level, converters and label maps inside it."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("nnunetv2_cimis", "dataset_conversion"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "setup.cfg", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"nnunetv2_cimis", f"nnunetv2_cimis-{nnunetv2_cimis.__version__}.dist-info"}, top
    assert "nnunetv2_cimis/dataset_conversion/btcv.py" in names
    assert "nnunetv2_cimis/dataset_conversion/label_maps/btcv.json" in names
    assert "nnunetv2_cimis/scenarios/presets/btcv.json" in names
    assert any(n.endswith("dist-info/licenses/LICENSE") or n.endswith("dist-info/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(f"nnunetv2_cimis-{nnunetv2_cimis.__version__}.dist-info/METADATA").decode()
    assert "Requires-Python: >=3.10" in meta
    assert not re.search(r"^Requires-Dist: torch", meta, re.M)
    assert re.search(r'^Requires-Dist: diffusers>=0.27; extra == "ddcl"', meta, re.M)


def test_installed_commands_match_setup(setup_kwargs):
    installed = {ep.name: ep.value for ep in distribution("nnunetv2-cimis").entry_points
                 if ep.group == "console_scripts"}
    assert installed == _console_scripts(setup_kwargs), (
        "the installed console scripts differ from setup.py: run `pip install -e .` again")


def test_every_command_prints_its_version(setup_kwargs, capsys):
    for name, value in _console_scripts(setup_kwargs).items():
        main = load_entry_point(value)
        with pytest.raises(SystemExit) as e:
            main(["--version"])
        assert e.value.code == 0, name
        assert capsys.readouterr().out.strip() == version_string(), name
    assert version_string().startswith(f"nnunetv2-cimis {nnunetv2_cimis.__version__} (nnunetv2 ")


def test_cli_reference_is_up_to_date():
    committed = (REPO / "docs" / "cli.md").read_text()
    assert committed == generate(), ("docs/cli.md is out of date: regenerate it with "
                                     "`python -m nnunetv2_cimis.cli_reference > docs/cli.md`")


def test_cli_reference_lists_every_option():
    page = generate()
    parser = capture_parser("nnunetv2_cimis.scenarios.make_scenario:main", "nnUNetv2_cimis_make_scenario")
    section = page.split("## nnUNetv2_cimis_make_scenario", 1)[1].split("\n## ", 1)[0]
    for action in parser._actions:
        for flag in action.option_strings:
            assert f"`{flag}`" in section, flag
    assert "`--features-per-stage`" in section and "`--version`" in section


def test_readme_appends_to_nnunet_ext_trainer(tmp_path):
    lines = [l for l in (REPO / "README.md").read_text().splitlines() if l.startswith("export nnUNet_extTrainer=")]
    assert len(lines) == 1
    line = lines[0].split("#", 1)[0].strip()
    script = f'{line}\nprintf "%s" "$nnUNet_extTrainer"'
    exe_dir = os.path.dirname(shutil.which("nnUNetv2_cimis_trainer_path") or sys.executable)
    env = dict(os.environ, PATH=exe_dir + os.pathsep + os.environ["PATH"])
    for before, expected in (("/other/trainers", "/other/trainers:" + trainer_path()),
                             (None, trainer_path())):
        env.pop("nnUNet_extTrainer", None)
        if before:
            env["nnUNet_extTrainer"] = before
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == expected


def test_missing_diffusers_names_the_extra(monkeypatch):
    from nnunetv2_cimis.synthesis import diffusion
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(CIMISError, match=re.escape('pip install "nnunetv2-cimis[ddcl]"')):
        diffusion.require_diffusers()
    with pytest.raises(CIMISError, match="extra 'ddcl'"):
        diffusion.build_unet(diffusion.DiffusionConfig(), 3)


def test_ddcl_trainer_checks_diffusers_before_training(monkeypatch):
    """initialize() (before the first iteration) stops with the message, not the end of the step."""
    from nnunetv2_cimis.training.trainers.ddcl import nnUNetTrainerDDCL
    monkeypatch.setitem(sys.modules, "diffusers", None)
    trainer = nnUNetTrainerDDCL.__new__(nnUNetTrainerDDCL)  # initialize() checks first, before using any state
    with pytest.raises(SystemExit, match=r"nnunetv2-cimis\[ddcl\]"):
        trainer.initialize()


def test_synthesize_accepts_both_spellings():
    from nnunetv2_cimis.synthesis.inversion_cli import build_parser
    p = build_parser()
    a = p.parse_args(["-m", "x", "--batch_size", "3", "--lr_schedule", "constant", "-device", "cpu",
                      "--no_progress"])
    b = p.parse_args(["-m", "x", "--batch-size", "3", "--lr-schedule", "constant", "--device", "cpu",
                      "--no-progress"])
    assert vars(a) == vars(b)
    assert a.batch_size == 3 and a.device == "cpu" and a.no_progress
