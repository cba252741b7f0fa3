"""The command line: help, version, one-line errors with non-zero exit codes, a real run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import molflow

from molflow.cli import EXIT_INPUT, main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "molflow.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", [[], ["simulate"], ["info"], ["quickstart"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: molflow" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("molflow ")


@pytest.mark.parametrize("args,message", [
    (["simulate", "no_such_molecule", "--out", "{tmp}/x.h5"], "no such system or PDB file"),
    (["simulate", "alanine_dipeptide", "--out", "{tmp}/x.h5", "--coefficients", "9"], "between 0 and 8"),
    (["simulate", "alanine_dipeptide", "--out", "{tmp}/x.h5", "--platform", "Quantum"], "not available"),
    (["simulate", "alanine_dipeptide", "--out", "{tmp}/x.h5", "--scheduler", "tcp://h:8786"], "needs --executor dask"),
    (["info", "{tmp}/missing.h5"], "no such trajectory file"),
    (["info", "{tmp}/not_hdf5.h5"], "not a readable HDF5 file"),
])
def test_bad_input_one_line_error(tmp_path, capsys, args, message):
    (tmp_path / "not_hdf5.h5").write_text("hello")
    code = main(["--quiet", *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT
    assert message in err and len(err.splitlines()) == 1 and err.startswith("molflow ")


def test_simulate_and_info_subprocess(tmp_path):
    out = tmp_path / "cli.h5"
    r = _run("simulate", "alanine_dipeptide", "--out", str(out), "--replicas", "2", "--time-ps", "0.3",
             "--frame-fs", "50", "--equilibrate-ps", "0.1", "--coefficients", "2")
    assert r.returncode == 0, r.stderr
    assert "seed=" in r.stderr  # the random default seed is printed
    r = _run("simulate", "alanine_dipeptide", "--out", str(out))
    assert r.returncode == EXIT_INPUT and "exists" in r.stderr
    r = _run("info", str(out), "--json")
    info = json.loads(r.stdout)
    assert info["replicas"] == 2 and info["frames"] == 7 and info["n_coefficients"] == 2
    assert info["datasets"]["brownian"] == [2, 6, 2, 22, 3]
    assert info["seed"] > 0
    seed = info["seed"]
    # --resume takes the run's settings from the file; a longer --time-ps extends it
    r = _run("--quiet", "simulate", "alanine_dipeptide", "--out", str(out), "--resume", "--time-ps", "0.5")
    assert r.returncode == 0, r.stderr
    info = json.loads(_run("info", str(out), "--json").stdout)
    assert info["frames"] == 11 and info["datasets"]["brownian"] == [2, 10, 2, 22, 3]
    assert info["seed"] == seed
    r = _run("simulate", "alanine_dipeptide", "--out", str(out), "--resume", "--coefficients", "3")
    assert r.returncode == EXIT_INPUT and "settings differ" in r.stderr and "n_coefficients" in r.stderr


def test_quickstart_small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", "quickstart", "--small", "--seed", "3"]) == 0
    out = tmp_path / "molflow-quickstart"  # everything under the folder of the current directory
    report = (out / "report.md").read_text()
    assert "ramachandran.png" in report and (out / "ramachandran.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_md"]["frames"] == 21 and summary["seed"] == 3
    # the grown quickstart: short training, sampling with the shipped map, evaluation of both runs
    assert summary["training"]["steps"] == 3 and (out / "model_short.pt").is_file()
    # the shipped map (tau_max 0.5 ps, with its physical finish) runs its 3 jumps without a restart
    with molflow.Trajectory(out / "samples.h5") as t:
        assert t.attrs["kind"] == "flowmap_samples" and t.n_frames == 4 and t.attrs["n_restarts"] == 0
        assert t.attrs["finish_steps"] == summary["sampling"]["finish"]["finish_steps"] > 0
        assert t.attrs["tau_ps"] == summary["sampling"]["tau_ps"] == 0.5
    assert "free_running_error" not in summary["sampling"] and "pathwise_error" not in summary["sampling"]
    speed = summary["sampling"]["speed"]  # a ratio against stock OpenMM timed in the same run
    assert speed["stock_openmm"]["us_per_step_cpu"] > 0 and speed["ratio_vs_stock_openmm"] > 0
    assert f"**{speed['ratio_vs_stock_openmm']:.1f}x**" in report
    for name in ("free_running", "pathwise"):
        ev = summary["evaluation"][name]
        assert 0 <= ev["js_phi_psi"] <= np.log(2) and (out / f"evaluation_{name}" / "metrics.json").is_file()
    assert summary["evaluation"]["free_running"]["spread_ratios"]["n_bonds"] == 21
    assert "## 4. Evaluation" in report
