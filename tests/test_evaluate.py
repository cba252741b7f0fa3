"""The evaluator end to end on short reference runs (the metrics have their own tests).

Known answers instead of bounds that hold by construction: the JS numbers equal scipy's on the
replicas each row claims to compare (so the equal-cost row is shown to be out of sample), an MD run
evaluated as samples lands on the noise floor within its error, a 600 K run has the energy shift
equipartition predicts, and an aborted samples file is flagged with counts from one set of arrays.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import h5py
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

import molflow
from molflow.cli import main
from molflow.evaluation import dihedral_angles
from molflow.evaluation.report import conventions, run_status

R_REF, R_OTHER, T_PS, DT_PS = 8, 4, 10.0, 0.1  # the held-out half H has R_REF // 2 = R_OTHER replicas


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Reference MD (8 replicas) and an independent MD run of the held-out half's size (4 replicas)."""
    d = tmp_path_factory.mktemp("eval")
    a = d / "ref.h5"
    b = d / "other.h5"
    molflow.simulate("alanine_dipeptide", a, replicas=R_REF, time_ps=T_PS, frame_fs=1000 * DT_PS, equilibrate_ps=1.0,
                     seed=11, progress=False).close()
    molflow.simulate("alanine_dipeptide", b, replicas=R_OTHER, time_ps=T_PS, frame_fs=1000 * DT_PS, equilibrate_ps=1.0,
                     seed=12, progress=False).close()
    return a, b


def _phi_psi(path, replicas=slice(None), frames=slice(None)):
    sys_ = molflow.load_system("alanine_dipeptide")
    phi_q, psi_q = sys_.central_dihedrals()
    with h5py.File(path, "r") as f:
        x = np.asarray(f["positions"][replicas, frames], dtype=np.float64)
    return dihedral_angles(x, phi_q), dihedral_angles(x, psi_q)


def _scipy_js(a, b):
    """JS (nats) of two (phi, psi) sets on the 64 x 64 grid, by scipy (which returns its square root)."""
    edges = np.linspace(-np.pi, np.pi, 65)
    ha = np.histogram2d(a[0].ravel(), a[1].ravel(), bins=[edges, edges])[0].ravel()
    hb = np.histogram2d(b[0].ravel(), b[1].ravel(), bins=[edges, edges])[0].ravel()
    return jensenshannon(ha, hb) ** 2


def _set_wall_clock(path, seconds):
    with h5py.File(path, "r+") as f:
        f.attrs["wall_clock_s"] = seconds


def test_evaluate_end_to_end(two_runs, tmp_path):
    ref, other = two_runs
    smp = tmp_path / "md_as_samples.h5"
    shutil.copy(other, smp)
    with h5py.File(ref, "r") as f:
        w_ref = float(f.attrs["wall_clock_s"])
    # the sampler's wall-clock buys 0.0201 ns of reference MD: over H's 4 replicas 5.025 ps each,
    # int(50.25) + 1 = 51 frames of every held-out replica
    ns_ref = R_REF * T_PS / 1000
    _set_wall_clock(smp, w_ref * 0.0201 / ns_ref)
    report = tmp_path / "report"
    assert main(["--quiet", "evaluate", "--reference", str(ref), "--samples", str(smp), "--report", str(report)]) == 0
    m = json.loads((report / "metrics.json").read_text())
    h, n = R_REF // 2, 51
    assert m["reference_split"]["construction"] == "replicas"
    assert m["equal_cost"]["frames"] == n and m["equal_cost"]["n_replicas"] == h
    judge = _phi_psi(ref, slice(h, R_REF))
    # every row is judged against the judge replicas J = 4..7, and equal cost is the first 51 frames of
    # H = 0..3: scipy on exactly those frames gives the same numbers (to float rounding)
    assert m["equal_cost"]["stationary"]["js_phi_psi"] == pytest.approx(
        _scipy_js(_phi_psi(ref, slice(0, h), slice(0, n)), judge), abs=1e-10)
    assert m["noise_floor"]["stationary"]["js_phi_psi"] == pytest.approx(_scipy_js(_phi_psi(ref, slice(0, h)), judge),
                                                                         abs=1e-10)
    assert m["stationary"]["js_phi_psi"] == pytest.approx(_scipy_js(_phi_psi(smp), judge), abs=1e-10)
    # MD evaluated as samples: the samples row (4 replicas x 10 ps of independent MD vs J) and the
    # noise floor (H, 4 replicas x 10 ps of MD, vs J) are identically distributed, so their
    # difference has SD <= sqrt(se_s^2 + se_floor^2) (sharing J correlates them positively, which
    # only narrows it); 3 SD. se is the delete-one-block jackknife SE (measured over 4 seeds at this
    # size: SE 0.03-0.05 against a between-seed SD of the rows of 0.04).
    s, f = m["stationary"], m["noise_floor"]["stationary"]
    tol = 3 * math.hypot(s["js_phi_psi_se"], f["js_phi_psi_se"])
    assert abs(s["js_phi_psi"] - f["js_phi_psi"]) < tol, (s["js_phi_psi"], f["js_phi_psi"], tol)
    for row in (m, m["noise_floor"], m["equal_cost"]):
        assert set(row["stationary"]["fes_rmse_kj_mol"]) == {"phi", "psi", "phi_psi"}
        assert set(row["kinetics"]) == {"reference", "samples"} and set(row["cost"]) == {"reference", "samples"}
    k = m["kinetics"]["samples"]
    for key in ("rate_neg_to_pos_per_ns", "mfpt_neg_to_pos_ns"):
        assert key in k  # a number, or null with its reason beside it
        if k[key] is None:
            assert k.get("reason")
    assert m["pathwise"]["value"] is None and "free-running" in m["pathwise"]["reason"]
    assert m["run_status"]["status"] == "complete" and m["run_status"]["note"] == ""
    text = (report / "report.md").read_text()
    assert "Jensen-Shannon" in text and "noise floor" in text and "Construction: **replicas**" in text
    assert "WARNING" not in text
    for png in ("ramachandran.png", "free_energy_1d.png", "autocorrelation.png"):
        assert (report / png).stat().st_size > 5000


def test_equal_cost_is_out_of_sample(two_runs, tmp_path):
    """The reference evaluated as its own samples, at its own cost. The old in-sample construction
    scored the whole reference against itself here (JS 0); now the equal-cost MD is all of H
    (the wall-clock buys 8 replicas' worth, more than H holds) judged against J: it *is* the noise
    floor, and that is far from 0 for runs this short."""
    ref, _ = two_runs
    m = molflow.evaluate(ref, ref, tmp_path / "same")
    eq, nf = m["equal_cost"]["stationary"], m["noise_floor"]["stationary"]
    assert m["equal_cost"]["frames"] == int(T_PS / DT_PS) + 1 and "equals the noise floor" in m["equal_cost"]["note"]
    for key in ("js_phi_psi", "bond_w1_nm", "energy_w1_kj_mol"):
        assert eq[key] == nf[key]
    # 4 vs 4 replicas of 10 ps: the floor is a few tenths (0.25-0.35 over 4 seeds), many SE above 0
    assert nf["js_phi_psi"] > 5 * nf["js_phi_psi_se"]
    # against the whole reference (information only) the samples are the reference: exactly 0
    w = m["stationary_vs_whole_reference"]
    assert w["js_phi_psi"] == pytest.approx(0.0, abs=1e-12) and w["bond_w1_nm"] == pytest.approx(0.0, abs=1e-12)
    assert w["fes_rmse_kj_mol"]["phi_psi"] == pytest.approx(0.0, abs=1e-9)


def test_hot_mirrored_run_known_answers(two_runs, tmp_path):
    """A 600 K run, mirrored (x -> -x), evaluated as samples of the 300 K reference.

    - Mirroring flips phi and psi: JS equals scipy's on the flipped angles and lies far above the
      floor (the mirror puts the beta/alphaR basins at phi > 0).
    - No constraints, so 3A - 6 = 60 internal DOFs; equipartition (harmonic) raises the mean
      potential energy by 60 kB (600 - 300 K) / 2 = 74.8 kJ/mol, and W1 >= |mean shift|, W1 ~ the
      shift when it dwarfs the spreads (13-27 kJ/mol). Anharmonic torsions and the 1 ps
      equilibration move it by a fraction: 0.7-1.3x.
    - Kinetic temperature: per frame T sqrt(2/(3A)) = 104 K at 600 K; kinetic and potential energy
      exchange relaxes on 1/friction = 1 ps, so 2 x 10 ps give ~ 2 x 10 / 2 = 10 independent
      values: SE ~ 33 K, 4 SE = 130 K around 600 K.
    """
    ref, _ = two_runs
    hot = tmp_path / "hot.h5"
    molflow.simulate("alanine_dipeptide", hot, replicas=2, time_ps=T_PS, frame_fs=1000 * DT_PS, equilibrate_ps=1.0,
                     seed=5, progress=False, temperature_K=600.0).close()
    with h5py.File(ref, "r") as f:
        fp = f.attrs["fingerprint"]
    with h5py.File(hot, "r+") as f:
        f.attrs["fingerprint"] = fp  # judged as samples of the 300 K system
        for key in ("positions", "velocities", "forces"):
            x = f[key][...]
            x[..., 0] *= -1  # mirror image: same energies, phi and psi change sign
            f[key][...] = x
    m = molflow.evaluate(ref, hot, tmp_path / "hot")
    s, nf = m["stationary"], m["noise_floor"]["stationary"]
    judge = _phi_psi(ref, slice(R_REF // 2, R_REF))
    phi, psi = _phi_psi(hot)
    assert s["js_phi_psi"] == pytest.approx(_scipy_js((phi, psi), judge), abs=1e-10)
    assert np.mean(phi > 0) > 0.5  # (the file really is mirrored: most of phi now positive)
    assert s["js_phi_psi"] > nf["js_phi_psi"] + 3 * math.hypot(s["js_phi_psi_se"], nf["js_phi_psi_se"])
    du = 60 * 0.5 * 0.0083144626 * 300.0  # kJ/mol: 60 DOFs x kB/2 x 300 K
    assert 0.7 * du < s["energy_w1_kj_mol"] < 1.3 * du, (s["energy_w1_kj_mol"], du)
    assert abs(s["kinetic_temperature_k"]["samples"] - 600.0) < 130.0, s["kinetic_temperature_k"]


def test_aborted_samples_are_flagged_with_consistent_counts(two_runs, tmp_path):
    """Every replica stopped (the last at the jump whose frame was never written), fewer frames than
    planned: the top of report.md says so, and the note, metrics.json and the evaluated shape agree."""
    _, other = two_runs
    bad = tmp_path / "aborted.h5"
    shutil.copy(other, bad)
    F = int(T_PS / DT_PS) + 1
    stopped = [12, 30, 41, F]  # replica 3 stopped at jump F: its frames 0..F-1 are all present
    with h5py.File(bad, "r+") as f:
        for r, j in enumerate(stopped):
            if j < F:
                for key in ("positions", "velocities"):
                    f[key][r, j:] = np.nan
        f.attrs.update(kind="flowmap_samples", n_jumps_requested=200, stopped_at_jump=stopped, n_stopped=4,
                       n_restarts=9, mode="sample", pathwise=False, tau_ps=DT_PS)
        del f["potential_energy"], f["forces"]
    ref, _ = two_runs
    m = molflow.evaluate(ref, bad, tmp_path / "aborted")
    st = m["run_status"]
    assert st["status"] == "aborted" and st["n_stopped"] == 4 and st["n_jumps_planned"] == 200
    assert st["replicas_evaluated"] == [3] and st["n_frames_evaluated"] == F
    assert (m["samples"]["n_replicas"], m["samples"]["n_frames"]) == (1, F) and m["samples"]["n_stopped"] == 4
    assert f"Evaluated: 1 replica(s) x {F} frames" in st["note"] and "3 replica(s) with non-finite frames left out" \
        in st["note"] and "(4 of 4)" in st["note"]
    top = (tmp_path / "aborted" / "report.md").read_text().splitlines()[:4]
    assert any("WARNING: aborted run" in line and f"1 replica(s) x {F} frames" in line for line in top), top


def test_run_status_counts_come_from_one_array():
    F = 20
    phi = np.zeros((3, F))
    phi[0, 5:] = np.nan
    phi[1, 9:] = np.nan
    phi[2, 7:] = np.nan
    st = run_status(phi, phi, {"stopped_at_jump": [5, 9, 7], "n_jumps_requested": 50}, 0.1)
    # no replica is complete: every replica up to the first non-finite frame of any (frame 5)
    assert st["status"] == "aborted" and st["replicas_evaluated"] == [0, 1, 2] and st["n_frames_evaluated"] == 5
    assert "Evaluated: 3 replica(s) x 5 frames" in st["note"] and "frames 0..4 are used" in st["note"]
    st = run_status(np.zeros((2, F)), np.zeros((2, F)), {"stopped_at_jump": [-1, -1], "n_jumps_requested": 50}, 0.1)
    assert st["status"] == "incomplete" and f"{F - 1} of the 50" in st["note"]
    st = run_status(np.zeros((2, F)), np.zeros((2, F)), {"time_ps_requested": (F - 1) * 0.1}, 0.1)
    assert st["status"] == "complete" and st["note"] == ""


def test_conventions_name_the_dihedrals_used():
    tri = conventions(molflow.load_system("trialanine"))["dihedrals"]
    assert "(14, 16, 18, 24)" in tri and "(16, 18, 24, 26)" in tri and "(4, 6, 8, 14)" not in tri
    ala = conventions(molflow.load_system("alanine_dipeptide"))["dihedrals"]
    assert "(4, 6, 8, 14)" in ala and "(6, 8, 14, 16)" in ala


def test_other_system_refused(two_runs, tmp_path):
    ref, _ = two_runs
    tri = tmp_path / "tri.h5"
    molflow.simulate("trialanine", tri, replicas=1, time_ps=0.3, equilibrate_ps=0.1, seed=3, progress=False).close()
    with pytest.raises(molflow.InputError, match="different systems"):
        molflow.evaluate(ref, tri, tmp_path / "x")


def test_one_replica_falls_back_to_time_halves():
    from molflow.evaluation.report import RunData, split_reference

    F = 11
    phi = np.arange(F, dtype=float)[None] / F
    run = RunData("r", phi, phi.copy(), 0.1, np.zeros((1, F, 3, 3)), None, np.arange(F), {})
    sp = split_reference(run)
    assert sp.construction == "time_halves" and "fallback" in sp.description
    assert sp.held_out.phi.tolist() == phi[:, :5].tolist() and sp.judge.phi.tolist() == phi[:, 5:].tolist()
    three = dataclasses.replace(run, phi=np.repeat(phi, 3, 0), psi=np.repeat(phi, 3, 0),
                                positions=np.zeros((3, F, 3, 3)))
    sp = split_reference(three)
    assert sp.construction == "replicas" and sp.held_out.phi.shape[0] == 1 and sp.judge.phi.shape[0] == 2
