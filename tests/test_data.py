"""Training data streamed from run files: every frame of every file, items equal to the files' content."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import molflow
from molflow import Trajectory
from molflow.brownian import compose
from molflow.training.data import FrameData


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A 1-replica run of 21 frames and a 2-replica run of 11 frames (20 fs frames, N = 3)."""
    d = tmp_path_factory.mktemp("data")
    long, short = d / "long.h5", d / "short.h5"
    molflow.simulate("alanine_dipeptide", long, replicas=1, time_ps=0.4, frame_fs=20.0, equilibrate_ps=0.1,
                     seed=3, progress=False, platform="Reference").close()
    molflow.simulate("alanine_dipeptide", short, replicas=2, time_ps=0.2, frame_fs=20.0, equilibrate_ps=0.1,
                     seed=4, progress=False, platform="Reference").close()
    return [str(long), str(short)]


def test_every_frame_of_files_of_different_lengths(two_runs):
    d = FrameData(two_runs)
    assert d.frames.tolist() == [21, 11, 11] and d.sources.tolist() == [[0, 0], [1, 0], [1, 1]]
    assert d.train_traj.tolist() == [0, 1] and d.val_traj.tolist() == [2]
    assert d.max_jump() == 10  # the held-out trajectory has 11 frames
    r, f = d.draw(3000, 1, np.random.default_rng(0))
    # starts uniform over the 20 + 10 valid (trajectory, start) pairs: the long file is not cut to 11 frames
    assert set(f[r == 0].tolist()) == set(range(20)) and set(f[r == 1].tolist()) == set(range(10))
    share = np.mean(r == 0)
    assert abs(share - 2 / 3) < 5 * np.sqrt(2 / 9 / 3000), share
    with pytest.raises(molflow.InputError, match="jumps of 11 frames"):
        d.draw(1, 11, np.random.default_rng(0), split="val")


@pytest.mark.parametrize("k", [3, 12])
def test_items_equal_the_files(two_runs, k):
    d = FrameData(two_runs)
    r = np.array([0, 0, 0, 0]) if k == 12 else np.array([2, 0, 1, 1])  # 12-frame jumps fit the long file only
    f = np.array([8, 0, 3, 5]) if k == 12 else np.array([7, 17, 0, 4])
    b = d.items(r, f, k, dtype=__import__("torch").float64)
    for i, (ri, fi) in enumerate(zip(r, f)):
        path, rep = two_runs[d.sources[ri][0]], d.sources[ri][1]
        with Trajectory(path) as t:
            np.testing.assert_array_equal(b["x0"][i].numpy(), t.positions[rep, fi])
            np.testing.assert_array_equal(b["x1"][i].numpy(), t.positions[rep, fi + k])
            np.testing.assert_array_equal(b["v0"][i].numpy(), t.velocities[rep, fi])
            np.testing.assert_array_equal(b["v1"][i].numpy(), t.velocities[rep, fi + k])
            direct = compose(np.asarray(t.brownian[rep, fi:fi + k], dtype=np.float64), [d.h0_ps] * k)
        np.testing.assert_allclose(b["L"][i].numpy(), direct, atol=1e-6)
    assert float(b["tau"][0]) == pytest.approx(k * 0.02)
    with pytest.raises(IndexError):
        d.items(np.array([1]), np.array([11 - k]), k)


def test_draws_are_deterministic_and_survive_pickling(two_runs):
    d = FrameData(two_runs)
    a = d.batch(8, 2, np.random.default_rng(5))
    e = pickle.loads(pickle.dumps(d))  # open files are not pickled; the copy reopens them
    b = e.batch(8, 2, np.random.default_rng(5))
    for key in a:
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key
    c = d.batch(8, 2, np.random.default_rng(6))
    assert not np.array_equal(a["x0"].numpy(), c["x0"].numpy())


def test_training_positions_are_evenly_spaced_training_frames(two_runs):
    d = FrameData(two_runs)
    with Trajectory(two_runs[0]) as t0, Trajectory(two_runs[1]) as t1:
        everything = np.concatenate([np.asarray(t0.positions[0]), np.asarray(t1.positions[0])])  # 21 + 11 frames
    np.testing.assert_array_equal(d.training_positions(), everything)  # all 32 training frames
    some = d.training_positions(max_frames=5)
    np.testing.assert_array_equal(some, everything[np.linspace(0, 31, 5).round().astype(int)])
    single = FrameData(two_runs[:1])  # one trajectory: its first 90% trains
    assert single.training_positions().shape == (int(21 * 0.9), 22, 3)
