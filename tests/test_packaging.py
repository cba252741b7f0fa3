"""Packaging: environment.yml lists the same dependencies as pyproject.toml."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower()


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_names = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_names = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python"}
    assert {CONDA_NAMES.get(n, n) for n in pip_names} == conda_names


def test_console_script_and_ci_use_readme_test_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["molflow"] == "molflow.cli:main"
    readme = (ROOT / "README.md").read_text()
    test_cmd = re.search(r"python -m pytest[^\n`]*", readme).group(0).strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_wheel_carries_every_subpackage_and_the_builtin_systems(tmp_path):
    """A non-editable install must not depend on the checkout (it once lacked molflow/evaluation)."""
    import subprocess
    import sys
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("molflow-*.whl"))).namelist()
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "molflow").rglob("__init__.py")}
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, pkg
    for system in ("alanine_dipeptide", "trialanine"):
        for f in ("system.yaml", "structure.pdb"):
            assert any(n.endswith(f"share/molflow/systems/{system}/{f}") for n in names), (system, f)
    assert any(n.endswith("share/molflow/systems/alanine_dipeptide/flowmap.pt") for n in names)  # quickstart's map
