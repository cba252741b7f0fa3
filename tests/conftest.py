"""Shared fixtures: small runs made once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def ala2():
    from molflow import load_system

    return load_system("alanine_dipeptide")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """3 replicas x 2 ps at 100 fs frames, N=3, one Context (CPU, deterministic seed)."""
    import molflow

    path = tmp_path_factory.mktemp("run") / "small.h5"
    traj = molflow.simulate("alanine_dipeptide", path, replicas=3, time_ps=2.0, frame_fs=100.0,
                            n_coefficients=3, equilibrate_ps=0.5, seed=1234, progress=False,
                            platform="CPU", workers=1)
    traj.close()
    return path


@pytest.fixture(scope="session")
def data20fs(tmp_path_factory):
    """Alanine dipeptide, 2 replicas x 2 ps at 20 fs frames (101 frames each), N = 3: training data."""
    import molflow

    path = tmp_path_factory.mktemp("train") / "data.h5"
    molflow.simulate("alanine_dipeptide", path, replicas=2, time_ps=2.0, frame_fs=20.0, n_coefficients=3,
                     equilibrate_ps=2.0, seed=5, progress=False).close()
    return path
