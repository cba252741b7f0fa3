"""The evaluator end to end on two short reference runs (the metrics have their own tests)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import molflow
from molflow.cli import main


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    a = d / "ref.h5"
    b = d / "other.h5"
    molflow.simulate("alanine_dipeptide", a, replicas=2, time_ps=10.0, frame_fs=100.0, equilibrate_ps=1.0,
                     seed=11, progress=False).close()
    molflow.simulate("alanine_dipeptide", b, replicas=2, time_ps=6.0, frame_fs=100.0, equilibrate_ps=1.0,
                     seed=12, progress=False).close()
    return a, b


def test_evaluate_end_to_end(two_runs, tmp_path):
    ref, other = two_runs
    report = tmp_path / "report"
    assert main(["--quiet", "evaluate", "--reference", str(ref), "--samples", str(other), "--report", str(report)]) == 0
    m = json.loads((report / "metrics.json").read_text())
    for row in (m, m["noise_floor"], m["equal_cost"]):
        s = row["stationary"]
        assert 0 <= s["js_phi_psi"] <= np.log(2)
        assert set(s["fes_rmse_kj_mol"]) == {"phi", "psi", "phi_psi"}
        assert s["bond_w1_nm"] >= 0 and s["energy_w1_kj_mol"] >= 0
        assert set(row["kinetics"]) == {"reference", "samples"} and set(row["cost"]) == {"reference", "samples"}
    k = m["kinetics"]["samples"]
    for key in ("rate_neg_to_pos_per_ns", "mfpt_neg_to_pos_ns"):
        assert key in k  # a number, or null with its reason beside it
        if k[key] is None:
            assert k.get("reason")
    assert m["pathwise"]["value"] is None and "free-running" in m["pathwise"]["reason"]
    assert m["cost"]["samples"]["ns_per_wall_s"] > 0
    text = (report / "report.md").read_text()
    assert "Jensen-Shannon" in text and "noise floor" in text
    for png in ("ramachandran.png", "free_energy_1d.png", "autocorrelation.png"):
        assert (report / png).stat().st_size > 5000


def test_identical_runs_give_zero_divergence(two_runs, tmp_path):
    ref, _ = two_runs
    m = molflow.evaluate(ref, ref, tmp_path / "same")
    assert m["stationary"]["js_phi_psi"] == pytest.approx(0.0, abs=1e-12)
    assert m["stationary"]["bond_w1_nm"] == pytest.approx(0.0, abs=1e-12)
    assert m["stationary"]["fes_rmse_kj_mol"]["phi_psi"] == pytest.approx(0.0, abs=1e-9)


def test_other_system_refused(two_runs, tmp_path):
    ref, _ = two_runs
    tri = tmp_path / "tri.h5"
    molflow.simulate("trialanine", tri, replicas=1, time_ps=0.3, equilibrate_ps=0.1, seed=3, progress=False).close()
    with pytest.raises(molflow.InputError, match="different systems"):
        molflow.evaluate(ref, tri, tmp_path / "x")
