"""The engine end to end: file contract, reproducibility, multi-copy parity, crashes and resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import openmm
import pytest

import molflow
from molflow import InputError, SimulationError, Trajectory
from molflow.md.engine import EnergyEvaluator
from molflow.md.multicopy import make_layout, multicopy_system

DATASETS = ("positions", "velocities", "forces", "potential_energy", "brownian", "time")


def test_file_contract(small_run, ala2):
    with Trajectory(small_run) as t:
        R, F, A, N = 3, 21, 22, 3  # 2 ps at 100 fs -> 21 frames
        assert (t.n_replicas, t.n_frames, t.n_atoms) == (R, F, A)
        assert t.positions.shape == (R, F, A, 3) and t.positions.dtype == np.float32
        assert t.velocities.shape == (R, F, A, 3) and t.forces.shape == (R, F, A, 3)
        assert t.potential_energy.shape == (R, F) and t.potential_energy.dtype == np.float64
        assert t.brownian.shape == (R, F - 1, N, A, 3) and t.brownian.dtype == np.float32
        np.testing.assert_allclose(t.time, np.arange(F) * 0.1)
        a = t.attrs
        for key in ("molflow_version", "system", "pdb", "forcefield", "temperature_K", "friction_per_ps",
                    "timestep_fs", "frame_interval_fs", "n_coefficients", "seed", "platform",
                    "copies_per_context", "equilibration_ps", "hardware", "wall_clock_s"):
            assert key in a, key
        assert a["seed"] == 1234 and a["copies_per_context"] == 3 and a["wall_clock_s"] > 0
        assert a["forcefield"] == ["amber99sbildn.xml", "amber99_obc.xml"]
        # recorded energies are the single-molecule NoCutoff energies of each copy's frame
        energy = EnergyEvaluator(ala2, "Reference")
        x = np.asarray(t.positions[:, 5], dtype=np.float64)
        np.testing.assert_allclose(energy(x), t.potential_energy[:, 5], atol=0.05)  # float32 positions
        # replicas are independent trajectories
        assert not np.allclose(t.positions[0, -1], t.positions[1, -1], atol=1e-2)


def test_trajectory_api(small_run):
    with Trajectory(small_run) as t:
        md = t.to_mdtraj(1)
        assert md.n_frames == t.n_frames and md.n_atoms == 22
        np.testing.assert_array_equal(md.xyz, t.positions[1])
        seen = []
        for sl, chunk in t.iter_chunks(frames=8):
            seen.append(sl.stop - sl.start)
            assert chunk["positions"].shape[1] == sl.stop - sl.start
            assert chunk["brownian"].shape[1] == (sl.stop - sl.start) - (1 if sl.start == 0 else 0)
        assert seen == [8, 8, 5]
        assert t.positions[:, [3, 1]].shape == (3, 2, 22, 3)
        np.testing.assert_array_equal(t.positions[0, -1], t.positions[0, t.n_frames - 1])
        with pytest.raises(IndexError):
            t.positions[0, t.n_frames]
        assert "alanine_dipeptide" in repr(t)


def test_same_seed_same_layout_is_reproducible(tmp_path, small_run):
    again = molflow.simulate("alanine_dipeptide", tmp_path / "again.h5", replicas=3, time_ps=2.0,
                             frame_fs=100.0, n_coefficients=3, equilibrate_ps=0.5, seed=1234,
                             progress=False, platform="CPU", workers=1)
    with Trajectory(small_run) as ref:
        for name in DATASETS:
            np.testing.assert_array_equal(np.asarray(getattr(ref, name)), np.asarray(getattr(again, name)), name)
    again.close()


def test_multicopy_forces_and_energies_equal_single_molecule(ala2, small_run):
    """Each copy's forces equal the NoCutoff single-molecule forces; energies differ by a constant."""
    with Trajectory(small_run) as t:
        confs = np.asarray(t.positions[:, -1], dtype=np.float64)  # 3 different conformations
    C = len(confs)
    layout = make_layout(C, ala2.positions_nm, 1.5)
    ref = openmm.Platform.getPlatformByName("Reference")
    multi = openmm.Context(multicopy_system(ala2, C, 1.5), openmm.VerletIntegrator(0.001), ref)
    multi.setPositions(layout.to_context_frame(confs))
    s = multi.getState(getForces=True, getEnergy=True)
    f_multi = np.array(s.getForces(asNumpy=True)._value).reshape(C, 22, 3)
    single = EnergyEvaluator(ala2, "Reference")
    one_cut = openmm.Context(ala2.create_system("cutoff", 1.5), openmm.VerletIntegrator(0.001), ref)
    shifts = []
    for c in range(C):
        np.testing.assert_allclose(f_multi[c], single.forces(confs[c]), atol=1e-8, rtol=0)
        one_cut.setPositions(confs[c])
        shifts.append(one_cut.getState(getEnergy=True).getPotentialEnergy()._value - single(confs[c]))
    np.testing.assert_allclose(shifts, shifts[0], atol=1e-8)  # a constant, whatever the conformation
    assert abs(shifts[0]) > 1.0  # the reaction-field shift is real (DESIGN.md: -25.7 kJ/mol)
    e_multi = s.getPotentialEnergy()._value
    np.testing.assert_allclose(e_multi, sum(single(confs[c]) for c in range(C)) + C * shifts[0], atol=1e-6)


def test_recentring_keeps_file_positions_continuous(ala2):
    layout = make_layout(2, ala2.positions_nm, 1.5)
    x = layout.to_context_frame(np.stack([ala2.positions_nm, ala2.positions_nm]))
    x[:22] += np.array([0.8, -1.2, 0.1])  # copy 0 drifted
    before = layout.to_file_frame(x.copy())
    assert layout.check_and_recentre(x)
    np.testing.assert_allclose(layout.to_file_frame(x), before, atol=1e-12)
    dev = x[:22].mean(0) - layout.sites_nm[0]
    assert np.all(np.abs(dev) <= 0.5 + 1e-9)
    x[22:] *= 3.0  # copy 1 blows up past the margin
    with pytest.raises(SimulationError, match="copy 1 grew"):
        layout.check_and_recentre(x)


def test_explosion_stops_with_clear_error_and_keeps_good_frames(tmp_path):
    out = tmp_path / "boom.h5"
    with pytest.raises(SimulationError, match="exploded|blew up|grew") as err, \
            pytest.warns(UserWarning, match="only 2 independent coefficients"):
        molflow.simulate("alanine_dipeptide", out, replicas=2, time_ps=0.07, frame_fs=7, equilibrate_ps=0,
                         seed=3, timestep_fs=3.5, progress=False, workers=1)  # 3.5 fs: H atoms unstable
    assert "good frames" in str(err.value)
    with Trajectory(out) as t:
        assert 1 <= t.n_frames < 11
        assert np.all(np.isfinite(t.positions[...])) and np.all(np.isfinite(t.potential_energy[...]))


def test_existing_output_refused_and_resume_settings_checked(small_run, tmp_path):
    with pytest.raises(InputError, match="exists: pass --resume"):
        molflow.simulate("alanine_dipeptide", small_run, replicas=3, time_ps=2.0, progress=False)
    with pytest.raises(InputError, match="settings differ.*n_coefficients"):
        molflow.simulate("alanine_dipeptide", small_run, replicas=3, time_ps=2.0, frame_fs=100.0,
                         n_coefficients=4, equilibrate_ps=0.5, resume=True, progress=False,
                         platform="CPU", workers=1)
    with pytest.raises(InputError, match="whole multiple"):
        molflow.simulate("alanine_dipeptide", tmp_path / "x.h5", frame_fs=2.5, progress=False)


def test_no_recording(tmp_path):
    t = molflow.simulate("alanine_dipeptide", tmp_path / "n0.h5", replicas=2, time_ps=0.3, frame_fs=100,
                         n_coefficients=0, equilibrate_ps=0.1, seed=8, progress=False)
    assert t.brownian.shape == (2, 3, 0, 22, 3) and t.n_frames == 4
    t.close()


def test_resume_of_missing_file_starts_fresh(tmp_path):
    t = molflow.simulate("alanine_dipeptide", tmp_path / "new.h5", replicas=1, time_ps=0.2, frame_fs=100,
                         equilibrate_ps=0.1, seed=8, resume=True, progress=False)
    assert t.n_frames == 3
    t.close()


RUNS = {  # Reference reloads an OpenMM checkpoint bit-exactly; the CPU platform to ~1e-7 nm
    "Reference": dict(replicas=2, time_ps=20.0, frame_fs=20.0, n_coefficients=3, equilibrate_ps=0.2, seed=77,
                      platform="Reference", copies_per_context=1, workers=1, chunk_frames=5),
    "CPU": dict(replicas=2, time_ps=20.0, frame_fs=20.0, n_coefficients=3, equilibrate_ps=0.2, seed=78,
                platform="CPU", workers=1, chunk_frames=5),
}
RUN = RUNS["Reference"]


def _launch(out, run):
    code = f"import molflow; molflow.simulate('alanine_dipeptide', {str(out)!r}, progress=False, **{run!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _frames(path):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("n_frames", 0))
    except OSError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = {}
    for name, run in RUNS.items():
        out[name] = tmp_path_factory.mktemp("resume") / f"full_{name}.h5"
        molflow.simulate("alanine_dipeptide", out[name], progress=False, **run).close()
    return out


@pytest.mark.parametrize("platform,kill_seed", [("Reference", 0), ("Reference", 1), ("CPU", 2)])
def test_sigkill_then_resume(tmp_path, uninterrupted, platform, kill_seed):
    """Kill a run at a random moment (SIGKILL) and resume it.

    Frames written before the kill stay bit-identical; the file is valid at every moment; on
    Reference the resumed run equals the uninterrupted one bit for bit, on CPU to float rounding
    at the first resumed frames (chaos amplifies the 1e-7 nm reload difference later on).
    """
    run = RUNS[platform]
    rng = np.random.default_rng(kill_seed)
    out = tmp_path / "killed.h5"
    proc = _launch(out, run)
    # the kill lands at a random frame in the run's first third (plus up to 50 ms), whatever the
    # machine's speed: a fixed delay missed the whole run on a faster machine
    total = int(run["time_ps"] * 1000 / run["frame_fs"]) + 1
    target = int(rng.integers(2, total // 3))
    deadline = time.time() + 120
    while _frames(out) < target and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _frames(out)
    with Trajectory(out) as t:  # the file opens and its complete frames are readable
        assert t.n_frames == killed_at and np.all(np.isfinite(t.positions[...]))
        before = {name: np.asarray(getattr(t, name)) for name in DATASETS}
    assert 2 <= killed_at < total, "the kill missed the run: adjust its length"
    resumed = molflow.simulate("alanine_dipeptide", out, resume=True, progress=False, **run)
    assert resumed.attrs["n_restarts"] == 0  # continued from the OpenMM checkpoint
    with Trajectory(uninterrupted[platform]) as ref:
        assert resumed.n_frames == ref.n_frames == total
        for name in DATASETS:
            full, got = np.asarray(getattr(ref, name)), np.asarray(getattr(resumed, name))
            k = before[name].shape[0 if name == "time" else 1]
            np.testing.assert_array_equal(before[name], (got[:k] if name == "time" else got[:, :k]), name)
            if platform == "Reference":
                np.testing.assert_array_equal(full, got, name)
        if platform == "CPU":
            np.testing.assert_allclose(resumed.positions[:, killed_at], ref.positions[:, killed_at], atol=1e-5)
    resumed.close()


def test_resume_without_checkpoint_continues_from_last_frame(tmp_path, uninterrupted):
    out = tmp_path / "partial.h5"
    short = {**RUN, "time_ps": 1.0}
    molflow.simulate("alanine_dipeptide", out, progress=False, **short).close()
    import shutil

    shutil.rmtree(str(out) + ".ckpt")  # e.g. a checkpoint from another OpenMM version/platform
    resumed = molflow.simulate("alanine_dipeptide", out, resume=True, progress=False, **RUN)
    n_short = int(1000 / RUN["frame_fs"]) + 1
    with Trajectory(uninterrupted["Reference"]) as ref:
        assert resumed.n_frames == ref.n_frames
        np.testing.assert_array_equal(ref.positions[:, :n_short], resumed.positions[:, :n_short])
        # later frames continue from the last frame's state with a derived seed: a different path
        assert not np.array_equal(ref.positions[:, -1], resumed.positions[:, -1])
        # continuous across the restart: the step over the restart is no larger than the largest
        # step between consecutive frames of the uninterrupted run (same 20 fs spacing)
        steps = np.abs(np.diff(np.asarray(ref.positions), axis=1)).max()
    assert resumed.attrs["n_restarts"] == 1
    x = np.asarray(resumed.positions[:, n_short - 1: n_short + 1])
    assert np.abs(x[:, 1] - x[:, 0]).max() <= steps
    resumed.close()


def test_script_without_main_guard_runs_with_worker_processes(tmp_path):
    """Workers must not re-run the user's script (spawn would, and its overwrite=True would
    truncate the run file under the parent)."""
    script = tmp_path / "noguard.py"
    script.write_text("import molflow\nprint('BODY')\n"
                      "molflow.simulate('alanine_dipeptide', 'ng.h5', replicas=2, time_ps=0.2, frame_fs=50,\n"
                      "                 equilibrate_ps=0.05, seed=3, workers=2, overwrite=True, progress=False)\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("BODY") == 1
    with Trajectory(tmp_path / "ng.h5") as t:
        assert t.n_frames == 5 and t.n_replicas == 2


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find worker processes")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_workers_never_outlive_the_main_process(tmp_path, sig):
    out = tmp_path / "w.h5"
    proc = subprocess.Popen([sys.executable, "-m", "molflow", "--quiet", "simulate", "alanine_dipeptide",
                             "--out", str(out), "--replicas", "4", "--workers", "2", "--time-ps", "50",
                             "--equilibrate-ps", "0.1", "--seed", "4"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    kids = []
    while time.time() < deadline and (_frames(out) < 1 or len(kids) < 2):
        kids = _children(proc.pid)
        time.sleep(0.05)
    assert len(kids) >= 2, "no worker processes seen"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "continue with --resume" in proc.stderr.read()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.1)
    assert not any(_alive(k) for k in kids), "worker processes outlived the main process"
    with Trajectory(out) as t:  # and the file is valid
        assert t.n_frames >= 1


def test_resume_refuses_unreadable_file_and_keeps_seed_of_empty_one(tmp_path, small_run):
    bad = tmp_path / "trunc.h5"
    bad.write_bytes(Path(small_run).read_bytes()[:5000])
    with pytest.raises(InputError, match="cannot resume.*--overwrite"):
        molflow.simulate("alanine_dipeptide", bad, time_ps=0.2, resume=True, progress=False)
    from molflow.trajectory import TrajectoryWriter

    empty = tmp_path / "empty.h5"
    TrajectoryWriter.create(empty, 1, 22, 3, {"seed": 4242}).close()
    t = molflow.simulate("alanine_dipeptide", empty, time_ps=0.2, equilibrate_ps=0.05, resume=True, progress=False)
    assert t.attrs["seed"] == 4242 and t.n_frames == 3
    t.close()


def test_fast_frame_read_equals_a_fresh_evaluation(ala2):
    """A frame read from the integrator's frame outputs (no second force evaluation) equals one read
    with OpenMM's own forces and energy at the same state; velocities are on-step (v = u - dt/2 f/m)."""
    from molflow.md.engine import Group, GroupStart, RunSpec, minimise

    spec = RunSpec(pdb_text=ala2.pdb_text, forcefield=tuple(ala2.forcefield_files), name=ala2.name,
                   temperature_K=300.0, friction_per_ps=1.0, timestep_fs=1.0, steps_per_frame=20, n_coefficients=3,
                   platform="Reference", threads=1, deterministic=False, cutoff_nm=1.5, seed=5,
                   equilibration_steps=100, start_positions_nm=minimise(ala2))
    g = Group(spec, 0, 1, ala2)
    g.start(GroupStart("fresh"))
    assert g.substeps == 10 and g.context_energy
    fast = next(g.run(1))
    slow = g.read_frame(with_coefficients=True)
    for key in ("positions", "velocities", "forces", "brownian"):
        np.testing.assert_array_equal(fast[key], slow[key], key)
    assert fast["potential_energy"][0] == pytest.approx(slow["potential_energy"][0], abs=1e-9)
    u = np.array(g.context.getState(getVelocities=True).getVelocities(asNumpy=True)._value)
    np.testing.assert_allclose(fast["velocities"][0], u - 0.0005 * fast["forces"][0] / ala2.masses_amu[:, None])
    assert np.abs(fast["velocities"][0] - u).max() > 1e-3  # the half kick is visible at this precision


def _group_spec(ala2, steps_per_frame=20, n_coefficients=3, equilibration_steps=100):
    from molflow.md.engine import RunSpec, minimise

    return RunSpec(pdb_text=ala2.pdb_text, forcefield=tuple(ala2.forcefield_files), name=ala2.name,
                   temperature_K=300.0, friction_per_ps=1.0, timestep_fs=1.0, steps_per_frame=steps_per_frame,
                   n_coefficients=n_coefficients, platform="Reference", threads=1, deterministic=False, cutoff_nm=1.5,
                   seed=5, equilibration_steps=equilibration_steps, start_positions_nm=minimise(ala2))


def test_host_noise_coefficients_are_those_of_the_noise_used_and_a_checkpoint_resumes_exactly(ala2):
    """On CPU platforms the Group draws the Gaussians (HostNoise): each frame's recorded coefficients are
    the weights applied to the Gaussians the integrator was given (it still holds the last call's); a
    Group started from a checkpoint taken after 3 frames runs the next frames bit for bit as the
    uninterrupted one (the noise stream's position travels in the OpenMM checkpoint)."""
    from molflow.brownian import coefficients_from_noise
    from molflow.md.engine import Group, GroupStart
    from molflow.md.integrator import read_noise

    spec = _group_spec(ala2)
    g = Group(spec, 0, 1, ala2)
    assert g.host_noise and g.substeps == 10
    g.start(GroupStart("fresh"))
    frames, xis = [], []
    run = g.run(10 ** 6)
    for i in range(6):
        frames.append(next(run))
        xis.append(g.noise.last.copy())
        if i == 2:
            ck = g.checkpoint()
    for fr, xi in zip(frames, xis):
        np.testing.assert_allclose(fr["brownian"][0], coefficients_from_noise(xi, 3, 0.001), atol=1e-12, rtol=0)
    np.testing.assert_array_equal(read_noise(g.integrator)[1:], xis[-1][-9:])  # xi0 holds the frame's forces
    assert not np.array_equal(xis[0], xis[1])
    g2 = Group(spec, 0, 1, ala2)
    g2.start(GroupStart("checkpoint", checkpoint=ck, positions_nm=frames[2]["positions"],
                        velocities=frames[2]["velocities"]))
    for a, b in zip(frames[3:], g2.run(3)):
        for key in ("positions", "velocities", "forces", "potential_energy", "brownian"):
            np.testing.assert_array_equal(a[key], b[key], key)


def test_host_noise_coefficient_law(ala2):
    """The engine's recorded coefficients (host noise) have the exact discrete law N(0, dt w w^T) (DESIGN.md
    section 2): 100 frames x 66 DOF = 6600 iid draws per coefficient; a covariance entry estimated from n
    draws has standard error sqrt((S_ii S_jj + S_ij^2)/n); we allow 5 SE."""
    from molflow.brownian import discrete_covariance
    from molflow.md.engine import Group, GroupStart

    K, N, frames = 100, 4, 100
    g = Group(_group_spec(ala2, steps_per_frame=K, n_coefficients=N), 0, 1, ala2)
    g.start(GroupStart("fresh"))
    L = np.concatenate([fr["brownian"][0].reshape(N, -1) for fr in g.run(frames)], axis=1)
    n = L.shape[1]
    emp, exact = L @ L.T / n, discrete_covariance(N, K, 0.001)
    se = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact**2) / n)
    assert np.all(np.abs(emp - exact) < 5 * se), (emp, exact)


def test_openmm_noise_path_of_the_group_records_its_accumulators(ala2):
    """The GPU program (OpenMM draws the Gaussians, the integrator accumulates the coefficients), forced
    on Reference: the Group records what the integrator accumulated, and the run file names it."""
    from molflow.md import engine
    from molflow.md.integrator import INTEGRATOR_ID, read_coefficients

    for platform, noise in (("CUDA", "openmm"), ("Reference", "host"), ("CPU", "host")):
        attrs = engine.run_attrs(ala2, 20.0, 3, 1, 5, platform, 1, 0.1, 1.5, "here", 1.0)
        assert attrs["noise"] == noise and (attrs["integrator"] == INTEGRATOR_ID) == (noise == "openmm")
    g = engine.Group(_group_spec(ala2), 0, 1, ala2, host_noise=False)
    assert g.noise is None
    g.start(engine.GroupStart("fresh"))
    for fr in g.run(2):
        np.testing.assert_array_equal(fr["brownian"][0], read_coefficients(g.integrator, 3))
        assert np.abs(fr["brownian"]).max() > 0


def test_resume_of_a_file_from_another_integrator_ignores_its_checkpoint(tmp_path):
    """An OpenMM checkpoint holds the integrator's variables: one written by another integrator program
    (attribute ``integrator``) is not loaded; the run continues from the last frame's state."""
    out = tmp_path / "old.h5"
    molflow.simulate("alanine_dipeptide", out, progress=False, **{**RUN, "time_ps": 1.0}).close()
    with h5py.File(out, "r+") as f:
        f.attrs["integrator"] = "an older molflow"
    assert any(Path(str(out) + ".ckpt").iterdir())
    resumed = molflow.simulate("alanine_dipeptide", out, resume=True, progress=False, **{**RUN, "time_ps": 1.2})
    assert resumed.attrs["n_restarts"] == 1 and resumed.n_frames == 61
    from molflow.md.integrator import HOST_NOISE_INTEGRATOR_ID

    assert resumed.attrs["integrator"] == HOST_NOISE_INTEGRATOR_ID and resumed.attrs["noise"] == "host"
    resumed.close()


def test_platform_failure_shows_openmm_error():
    from molflow.md.engine import platform_error

    assert platform_error("Reference") is None
    assert "NoSuchPlatform" in platform_error("NoSuchPlatform")


def test_engine_imports_no_executor_and_dispatches_through_the_registry(tmp_path):
    """Imports run one way: engine.py imports neither molflow.md.distributed nor any module importing it;
    executors reach the engine through its registry (or are passed in)."""
    import ast

    import molflow.md.engine as engine

    tree = ast.parse(Path(engine.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "distributed" in m], imported
    assert "dask" in engine.EXECUTORS  # registered by molflow.md.distributed when the package loads
    seen = {}

    def fake(system, out, **kw):
        seen.update(kw, system=system)
        return "ran"

    assert molflow.simulate("alanine_dipeptide", tmp_path / "x.h5", replicas=2, executor=fake) == "ran"
    assert seen["system"] == "alanine_dipeptide" and seen["replicas"] == 2
    with pytest.raises(InputError, match="executor must be one of.*dask"):
        molflow.simulate("alanine_dipeptide", tmp_path / "y.h5", executor="nope")
