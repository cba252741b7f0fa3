"""The sampler: the run-file contract, exact resume, pathwise inputs, guards, and the CLI.

Most tests use a *force-blind* map: a checkpoint with the "ou" base whose network weights are all
zero, so the map is exactly the free-particle Ornstein-Uhlenbeck conditional law (models/molecular.py) — a known map,
which makes the plumbing checkable without a trained model. Free atoms drift apart within tens of
fs, which the explosion guard rightly flags; the plumbing tests widen its bond range so that they do
not depend on it, and the guard has its own test with the default range.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import molflow
from molflow import InputError, SimulationError
from molflow import sampling
from molflow.cli import main
from molflow.sampling import FlowMap, pathwise_inputs, start_states_from_run
from molflow.checkpoint import load_checkpoint, save_checkpoint
from molflow.training.loop import train

TINY = dict(n_features=8, n_layers=1, batch_size=4, validate_every=10_000, checkpoint_every=10_000, finish_steps=0)
TAU = 0.008  # ps: two 4 fs frames


@pytest.fixture(autouse=True)
def wide_bond_guard(monkeypatch):
    monkeypatch.setattr(sampling, "BOND_RANGE", (0.01, 100.0))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampling")
    run = d / "ref.h5"
    molflow.simulate("alanine_dipeptide", run, replicas=2, time_ps=0.4, frame_fs=4.0, n_coefficients=3,
                     equilibrate_ps=0.5, seed=21, progress=False).close()
    model = d / "m.pt"
    train("alanine_dipeptide", [str(run)], model, tau_max_ps=TAU, steps=1, seed=3, config=TINY, progress=False,
          base="ou")
    ck = load_checkpoint(model)
    for key in ("model", "ema"):  # force-blind: the network's correction is exactly zero
        ck[key] = {k: (torch.zeros_like(t) if k.startswith("net.") else t) for k, t in ck[key].items()}
    save_checkpoint(model, {k: v for k, v in ck.items() if k not in ("format", "molflow_version")})
    return run, model


def test_file_contract_and_in_memory_agree(files, tmp_path):
    run, model = files
    fm = FlowMap.load(model, device="cpu")
    x0, v0 = start_states_from_run(run, 3)
    mem = fm.sample((x0, v0), n_jumps=4, tau_ps=TAU, seed=9)
    traj = fm.sample((x0, v0), n_jumps=4, tau_ps=TAU, seed=9, out=tmp_path / "s.h5", chunk_jumps=3)
    A, N = fm.system.n_atoms, fm.n_coefficients
    assert traj.n_frames == 5 and traj.n_replicas == 3
    assert traj.brownian.shape == (3, 4, N, A, 3)
    np.testing.assert_allclose(traj.time, np.arange(5) * TAU)
    np.testing.assert_array_equal(traj.positions[:, 0], x0.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(traj.positions), mem["positions"])
    np.testing.assert_array_equal(np.asarray(traj.brownian), mem["brownian"])
    a = traj.attrs
    assert (a["mode"], a["pathwise"], a["tau_ps"]) == ("sample", False, TAU)
    assert a["n_restarts"] == sum(a["restarts_per_replica"]) == mem["restarts_per_replica"].sum()
    assert a["model_fingerprint"] == fm.fingerprint and a["fingerprint"] == fm.system.fingerprint
    assert a["frame_interval_fs"] == pytest.approx(TAU * 1000) and a["wall_clock_s"] > 0
    assert traj.forces is None and traj.potential_energy is None
    traj.close()


def test_resume_continues_exactly(files, tmp_path):
    """A run cut after 3 jumps and resumed to 7 equals an uncut run (random numbers depend on the
    jump index only), and differing settings are refused by name."""
    run, model = files
    fm = FlowMap.load(model, device="cpu")
    x0, v0 = start_states_from_run(run, 2)
    full = fm.sample((x0, v0), n_jumps=7, tau_ps=TAU, seed=5, out=tmp_path / "full.h5")
    part = tmp_path / "part.h5"
    fm.sample((x0, v0), n_jumps=3, tau_ps=TAU, seed=5, out=part).close()
    with pytest.raises(InputError, match="exists"):
        fm.sample((x0, v0), n_jumps=7, tau_ps=TAU, seed=5, out=part)
    with pytest.raises(InputError, match="seed"):
        fm.sample((x0, v0), n_jumps=7, tau_ps=TAU, seed=6, out=part, resume=True)
    resumed = fm.sample((x0, v0), n_jumps=7, tau_ps=TAU, seed=5, out=part, resume=True, chunk_jumps=2)
    assert resumed.n_frames == 8
    np.testing.assert_array_equal(np.asarray(resumed.positions), np.asarray(full.positions))
    np.testing.assert_array_equal(np.asarray(resumed.velocities), np.asarray(full.velocities))
    full.close()
    resumed.close()


def test_pathwise_inputs_compose_the_recorded_path(files):
    """L^(0) of a composed interval is the Brownian increment over it: exactly the sum of the
    recorded pieces' L^(0) (an identity independent of the composition matrices)."""
    run, _ = files
    x0, v0, L = pathwise_inputs(run, tau_ps=0.012, n_jumps=4)
    with molflow.Trajectory(run) as t:
        rec = np.asarray(t.brownian, dtype=np.float64)
        np.testing.assert_array_equal(x0, np.asarray(t.positions[:, 0], dtype=np.float64))
    assert L.shape == (2, 4, 3, 22, 3)
    np.testing.assert_allclose(L[:, :, 0], rec[:, :12, 0].reshape(2, 4, 3, 22, 3).sum(2), atol=1e-5)
    with pytest.raises(InputError, match="whole multiple"):
        pathwise_inputs(run, tau_ps=0.006)
    with pytest.raises(InputError, match="enough for"):
        pathwise_inputs(run, tau_ps=0.008, n_jumps=51)  # 101 frames: 50 jumps


def test_guard_restarts_or_stops_a_replica_and_counts_it(files, monkeypatch, tmp_path):
    run, model = files
    fm = FlowMap.load(model, device="cpu")
    x0, v0 = start_states_from_run(run, 3)
    real = fm.model.forward
    calls = {"n": 0}

    def flaky(x, v, L, eps, tau):  # the first batch of the second jump: replica 1 blows up
        calls["n"] += 1
        xt, vt = real(x, v, L, eps, tau)
        if calls["n"] == 2:
            xt = xt.clone()
            xt[1, 0] = float("nan")
        return xt, vt

    monkeypatch.setattr(fm.model, "forward", flaky)
    out = fm.sample((x0, v0), n_jumps=3, tau_ps=TAU, seed=1)
    assert np.isfinite(out["positions"]).all()
    assert out["restarts_per_replica"].tolist() == [0, 1, 0]

    def broken_one(x, v, L, eps, tau):  # replica 1 explodes from the second jump on, whatever is drawn
        calls["n"] += 1
        xt, vt = real(x, v, L, eps, tau)
        if calls["n"] >= 2 and (len(x) == 1 or len(x) == 3):
            vt = vt.clone()
            vt[1 if len(x) == 3 else 0] *= 10.0  # kinetic temperature 100x the thermostat's
        return xt, vt

    calls["n"] = 0
    monkeypatch.setattr(fm.model, "forward", broken_one)
    with pytest.raises(SimulationError, match="every replica was stopped by the sampler.s guards.*temperature guard"):
        fm.sample((x0[:1], v0[:1]), n_jumps=3, tau_ps=TAU, seed=1, max_retries=2)
    calls["n"] = 0
    traj = fm.sample((x0, v0), n_jumps=3, tau_ps=TAU, seed=1, max_retries=2, out=tmp_path / "stop.h5")
    a = traj.attrs
    assert a["stopped_at_jump"] == [-1, 2, -1] and a["n_stopped"] == 1 and a["restarts_per_replica"][1] == 2
    pos = np.asarray(traj.positions)
    assert np.isfinite(pos[[0, 2]]).all() and np.isfinite(pos[1, :2]).all() and np.isnan(pos[1, 2:]).all()
    traj.close()
    m = molflow.evaluate(run, tmp_path / "stop.h5", tmp_path / "rep", progress=False)
    assert m["samples"]["n_replicas"] == 2 and "left out" in m["samples"]["evaluation_note"]
    # the default bond range: a structure stretched 1.6x is an explosion, the start states are not
    monkeypatch.setattr(sampling, "BOND_RANGE", (0.5, 1.5))
    guard = sampling._Rollout(fm, x0, TAU, 8, "sample", 1, None, 64, 1)
    assert not guard._bad(x0, v0).any() and guard._bad(1.6 * x0, v0).all()


def test_cli_sample_and_pathwise_evaluation(files, tmp_path):
    run, model = files
    free = tmp_path / "free.h5"
    assert main(["--quiet", "sample", str(model), "--from", str(run), "--out", str(free), "--replicas", "4",
                 "--jumps", "5", "--seed", "2"]) == 0
    with molflow.Trajectory(free) as t:
        assert (t.n_replicas, t.n_frames, t.attrs["tau_ps"]) == (4, 6, TAU)  # tau defaults to tau_max
    assert main(["--quiet", "sample", str(model), "--from", str(run), "--out", str(free)]) == 2  # exists
    assert main(["--quiet", "sample", str(model), "--system", "trialanine", "--out", str(tmp_path / "x.h5")]) == 2
    assert main(["--quiet", "sample", str(model), "--from", str(run), "--pathwise", "--tau-ps", "0.006",
                 "--out", str(tmp_path / "y.h5")]) == 2
    pw = tmp_path / "pw.h5"
    assert main(["--quiet", "sample", str(model), "--from", str(run), "--pathwise", "--mode", "mean",
                 "--jumps", "6", "--out", str(pw)]) == 0
    report = tmp_path / "report"
    assert main(["--quiet", "evaluate", "--reference", str(run), "--samples", str(pw), "--report", str(report)]) == 0
    m = json.loads((report / "metrics.json").read_text())
    p = m["pathwise"]
    assert p["jumps"] == [1, 2, 3, 4, 5, 6] and p["n_replicas"] == 2
    err = np.array(p["strong_error_heavy_rmsd_raw_nm"])
    # a force-blind map drifts away from the true path: the error is positive and grows with jumps
    assert (err > 0).all() and err[-1] > err[0]
    assert m["stationary"]["energy_w1_kj_mol"] is not None  # energies recomputed with OpenMM
    assert m["stationary"]["kinetic_temperature_k"]["samples"] > 0
    assert (report / "strong_error.png").stat().st_size > 5000
    # free-running samples against the same reference: no pathwise row, with the reason
    m2 = molflow.evaluate(run, free, tmp_path / "r2", progress=False)
    assert m2["pathwise"]["value"] is None and "free-running" in m2["pathwise"]["reason"]


def test_shipped_map_reuses_the_finish_forces_and_resumes_exactly(tmp_path, monkeypatch):
    """The shipped map has a torsion drive (it needs the force-field forces at each jump's start) and
    a finish (which ends with exactly those forces). After the first jump the sampler takes them
    from the finish instead of evaluating the force field again; a run resumed from its file (whose
    first jump evaluates them) must then equal an uncut run bit for bit."""
    from molflow.quickstart import pretrained_map
    from molflow.sampling import start_states_from_system

    fm = FlowMap.load(pretrained_map(), device="cpu")
    assert fm.model.needs_forces and fm.default_finish().n_steps > 0
    x0, v0 = start_states_from_system(fm.system, 3, seed=2)
    calls = []
    evaluate = fm.forces
    monkeypatch.setattr(fm, "forces", lambda p: (calls.append(len(p)), evaluate(p))[1])
    full = fm.sample((x0, v0), n_jumps=4, tau_ps=0.5, seed=9, out=tmp_path / "full.h5")
    assert calls == [3]  # the first jump only (restarts reuse the cached forces too)
    part = tmp_path / "part.h5"
    fm.sample((x0, v0), n_jumps=2, tau_ps=0.5, seed=9, out=part).close()
    resumed = fm.sample((x0, v0), n_jumps=4, tau_ps=0.5, seed=9, out=part, resume=True)
    np.testing.assert_array_equal(np.asarray(resumed.positions), np.asarray(full.positions))
    np.testing.assert_array_equal(np.asarray(resumed.velocities), np.asarray(full.velocities))
    full.close()
    resumed.close()


def test_a_non_finite_replica_does_not_fail_the_batch():
    """The torsion drive whitens each molecule's latents with a Cholesky factor; a replica with
    non-finite coordinates (a stopped replica is carried as NaN) has none, and once failed the whole
    batch: every later jump of the run. It must come out non-finite, while every other replica of the
    batch jumps exactly as it would beside a healthy one."""
    from molflow.quickstart import pretrained_map
    from molflow.sampling import start_states_from_system

    fm = FlowMap.load(pretrained_map(), device="cpu")
    x0, v0 = start_states_from_system(fm.system, 2, seed=4)
    x, v = (torch.as_tensor(a, dtype=torch.float32) for a in (x0, v0))
    L = 0.3 * torch.randn(2, fm.n_coefficients, fm.system.n_atoms, 3, generator=torch.Generator().manual_seed(0))
    forces = torch.as_tensor(fm.forces(x0), dtype=torch.float32)
    good = fm.jump(x, v, L, 0.5, generator=torch.Generator().manual_seed(1), forces=forces)
    x_bad, f_bad = x.clone(), forces.clone()
    x_bad[1] = float("nan")  # as a stopped replica is carried
    f_bad[1] = float("nan")
    out = fm.jump(x_bad, v, L, 0.5, generator=torch.Generator().manual_seed(1), forces=f_bad)
    assert not torch.isfinite(out[0][1]).all()
    torch.testing.assert_close(out[0][0], good[0][0], rtol=0, atol=0)
    torch.testing.assert_close(out[1][0], good[1][0], rtol=0, atol=0)
