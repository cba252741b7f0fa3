"""Reference MD on a Dask cluster (issue #6): a real LocalCluster of 2 worker processes.

One run has a worker process SIGKILLed mid-shard and must still end with every frame exactly once,
equal bit for bit to an uninterrupted local run (the Reference platform reloads OpenMM checkpoints
exactly); the virtual-dataset file over the shards must read like any run file.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import h5py
import numpy as np
import pytest

import molflow
from molflow import InputError, Trajectory
from molflow.cli import EXIT_INPUT, main
from molflow.md.distributed import shard_path

distributed = pytest.importorskip("distributed")

DATASETS = ("positions", "velocities", "forces", "potential_energy", "brownian", "time")
# 4 replicas on Reference, one copy per Context: 4 groups -> 4 shards; 3 ps at 20 fs = 151 frames
RUN = dict(replicas=4, time_ps=3.0, frame_fs=20.0, n_coefficients=3, equilibrate_ps=0.2, seed=2024,
           platform="Reference", copies_per_context=1)
TOTAL = 151


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c, distributed.Client(c) as client:
        yield c, client


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The same run on the local executor, each group in its own worker process.

    On Reference/CPU the engine draws each group's Gaussians from a stream keyed by the seed and the
    group's index (host noise), so a group's numbers depend on those only, as in a shard (with OpenMM's
    own noise they would come from one stream per process: one group per process kept them apart).
    """
    path = tmp_path_factory.mktemp("local") / "local.h5"
    molflow.simulate("alanine_dipeptide", path, workers=4, chunk_frames=10, progress=False, **RUN).close()
    return path


def _frames(path):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("n_frames", 0))
    except OSError:
        return 0


@pytest.fixture(scope="module")
def killed_run(cluster, tmp_path_factory):
    """A Dask run during which the worker process running a shard is SIGKILLed mid-shard."""
    c, client = cluster
    out = tmp_path_factory.mktemp("dask") / "run.h5"
    killed = {}

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for i in range(4):
                n = _frames(shard_path(out, i))
                if 20 <= n <= TOTAL - 40:  # two chunks written, well before the end
                    key = next((k for w, keys in client.processing().items() for k in keys
                                if f"molflow-shard-{i:04d}" in str(k)), None)
                    if key is None:
                        continue
                    worker = next(w for w, keys in client.processing().items() if key in keys)
                    pid = client.run(os.getpid, workers=[worker])[worker]
                    os.kill(pid, signal.SIGKILL)
                    killed.update(shard=i, frames=n, pid=pid)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    traj = molflow.simulate("alanine_dipeptide", out, executor="dask", scheduler=c.scheduler_address,
                            chunk_frames=10, progress=False, **RUN)
    thread.join(timeout=5)
    traj.close()
    assert killed, "the kill missed the run: lengthen it"
    return out, killed


def test_killed_worker_run_completes_with_every_frame_once(killed_run, local_run):
    out, killed = killed_run
    shard = shard_path(out, killed["shard"])
    with Trajectory(shard) as s:  # the killed shard was continued from its last complete frame, not redone
        resumed = s.attrs["resumed_at_frames"]
        assert len(resumed) == 1 and killed["frames"] <= resumed[0] < TOTAL, (killed, resumed)
        assert s.attrs["n_restarts"] == 0  # from the OpenMM checkpoint
    with h5py.File(shard, "r") as f:  # nothing written twice: every dataset holds exactly TOTAL frames
        assert f.attrs["n_frames"] == TOTAL and f["positions"].shape[1] == TOTAL
        assert f["brownian"].shape[1] == TOTAL - 1 and f["time"].shape == (TOTAL,)
    for i in range(4):
        with Trajectory(shard_path(out, i)) as s:
            np.testing.assert_allclose(np.diff(s.time), 0.02, rtol=1e-9)  # monotone, no duplicates, no gaps
            assert s.n_frames == TOTAL and s.attrs.get("group_offset", 0) == i and s.n_replicas == 1
    with Trajectory(out) as got, Trajectory(local_run) as ref:  # equal to an uninterrupted local run
        assert got.n_frames == ref.n_frames == TOTAL and got.n_replicas == 4
        for name in DATASETS:
            np.testing.assert_array_equal(np.asarray(getattr(ref, name)), np.asarray(getattr(got, name)), name)


def test_virtual_dataset_file_reads_as_one_run(killed_run, local_run, tmp_path, monkeypatch, capsys):
    src, _ = killed_run
    moved = tmp_path / "moved"  # relative source paths: the run folder can move
    shutil.copytree(src.parent, moved)
    out = moved / "run.h5"
    monkeypatch.chdir(tmp_path)
    shards = [shard_path(out, i) for i in range(4)]
    with h5py.File(out, "r") as f:  # plain h5py, default file locking
        assert f.attrs["executor"] == "dask"
        assert json.loads(f.attrs["shards"]) == [f"run.h5.shards/shard-{i:04d}.h5" for i in range(4)]
        for name in DATASETS:
            assert f[name].is_virtual, name
            parts = []
            for p in shards:
                with h5py.File(p, "r") as g:
                    parts.append(g[name][...])
            want = parts[0] if name == "time" else np.concatenate(parts)
            np.testing.assert_array_equal(f[name][...], want, name)
    with Trajectory(out) as t:
        a = t.attrs
        assert (t.n_replicas, t.n_frames, t.n_atoms, t.n_coefficients) == (4, TOTAL, 22, 3)
        assert a["shard_frames"] == [TOTAL] * 4 and a["seed"] == RUN["seed"] and a["copies_per_context"] == 1
        walls = []
        for p in shards:
            with Trajectory(p) as s:
                walls.append(s.attrs["wall_clock_s"])
        assert a["wall_clock_s"] == pytest.approx(sum(walls))
        with Trajectory(local_run) as ref:
            for key in ("fingerprint", "pdb", "frame_interval_fs", "n_coefficients", "temperature_K", "system"):
                assert a[key] == ref.attrs[key], key
        np.testing.assert_array_equal(t.to_mdtraj(2).xyz, t.positions[2])
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["replicas"] == 4 and info["frames"] == TOTAL and info["datasets"]["brownian"] == [4, TOTAL - 1, 3, 22, 3]
    from molflow.evaluation.report import load_run  # how `molflow evaluate` reads a run
    from molflow.training.data import FrameData  # how `molflow train` reads its data

    system = molflow.load_system("alanine_dipeptide")
    ev_got, ev_ref = load_run(out, system, "dask"), load_run(local_run, system, "local")
    np.testing.assert_array_equal(ev_got.phi, ev_ref.phi)
    got, ref = FrameData([str(out)]), FrameData([str(local_run)])
    np.testing.assert_array_equal(got.frames, ref.frames)
    np.testing.assert_array_equal(got.training_positions(), ref.training_positions())
    r = np.repeat(np.arange(got.n_trajectories), 3)
    f = np.tile([0, 1, int(got.frames.min()) - 3], got.n_trajectories)
    a, b = got.read(r, f, 2), ref.read(r, f, 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], k)


def test_resume_continues_each_shard_and_skips_complete_ones(cluster, local_run, tmp_path, capsys):
    c, _ = cluster
    out = tmp_path / "cli.h5"
    args = ["--quiet", "simulate", "alanine_dipeptide", "--out", str(out), "--executor", "dask",
            "--scheduler", c.scheduler_address]
    first = ["--replicas", "4", "--time-ps", "1.5", "--frame-fs", "20", "--coefficients", "3",
             "--equilibrate-ps", "0.2", "--seed", str(RUN["seed"]), "--platform", "Reference"]
    assert main(args + first) == 0
    assert _frames(out) == 76
    assert main(args + ["--resume", "--time-ps", "3", "--platform", "Reference"]) == 0  # settings from the file
    with Trajectory(out) as got, Trajectory(local_run) as ref:
        for name in DATASETS:  # continued from each shard's checkpoint: the uninterrupted run, bit for bit
            np.testing.assert_array_equal(np.asarray(getattr(ref, name)), np.asarray(getattr(got, name)), name)
    for i in range(4):
        with Trajectory(shard_path(out, i)) as s:
            assert s.attrs["resumed_at_frames"] == [76]
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.with_name("cli.h5.shards").glob("*.h5")}
    assert main(["simulate", "alanine_dipeptide", "--out", str(out), "--executor", "dask", "--scheduler",
                 c.scheduler_address, "--resume", "--platform", "Reference"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stamps} == stamps  # complete shards not rerun
    # executors do not resume each other's runs
    with pytest.raises(InputError, match="resume it with --executor dask"):
        molflow.simulate("alanine_dipeptide", out, resume=True, progress=False, **RUN)
    with pytest.raises(InputError, match="resume it with --executor local"):
        molflow.simulate("alanine_dipeptide", local_run, resume=True, executor="dask", progress=False, **RUN)
    with pytest.raises(InputError, match="settings differ.*n_coefficients"):
        molflow.simulate("alanine_dipeptide", out, resume=True, executor="dask", scheduler=c.scheduler_address,
                         progress=False, **{**RUN, "n_coefficients": 2})


def test_clear_errors_without_dask_or_scheduler(tmp_path, monkeypatch, capsys):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code = main(["--quiet", "simulate", "alanine_dipeptide", "--out", str(tmp_path / "x.h5"),
                     "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)  # as if Dask were not installed
    code = main(["--quiet", "simulate", "alanine_dipeptide", "--out", str(tmp_path / "x.h5"), "--executor", "dask"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT and 'pip install "molflow[dask]"' in err and len(err.splitlines()) == 1
