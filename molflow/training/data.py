"""Training data: reference frames and their recorded path coefficients, in memory.

Items are jumps of k frame intervals (tau = k h0, h0 = the files' frame interval): the start state,
the recorded end state, and the path coefficients of the k intervals composed exactly into those of
the whole jump (:func:`molflow.brownian.composition_matrices`). One replica (or, with a single
replica, the last 10% of frames) is held out for validation.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..brownian import composition_matrices
from ..errors import InputError
from ..trajectory import Trajectory


@lru_cache(maxsize=64)
def _composition(k: int, n: int) -> np.ndarray:
    return np.stack(composition_matrices([1.0] * k, n)) if n else np.zeros((k, 0, 0))  # equal pieces


class FrameData:
    """Frames of one system from one or more run files.

    Attributes: ``x``, ``v`` (T, F, A, 3) float32 (T trajectories), ``L`` (T, F-1, N, A, 3),
    ``h0_ps`` the frame interval, ``system`` the MolecularSystem, ``train_ids``/``val_ids`` the
    trajectories (or frame ranges) used for training and validation.
    """

    def __init__(self, paths: Sequence[str], n_coefficients: int | None = None, max_frames: int | None = None):
        if not paths:
            raise InputError("no training data: pass at least one --data file")
        xs, vs, Ls, meta = [], [], [], None
        for p in paths:
            with Trajectory(p) as t:
                a = t.attrs
                if meta is None:
                    meta = a
                    self.system = t.system()
                for key in ("fingerprint", "frame_interval_fs"):
                    if a.get(key) != meta.get(key):
                        raise InputError(f"{p}: {key} {a.get(key)!r} differs from {paths[0]}'s {meta.get(key)!r}; "
                                         "training data must share the system and frame interval")
                n_file = t.n_coefficients
                n = n_file if n_coefficients is None else int(n_coefficients)
                if n > n_file:
                    raise InputError(f"{p} records {n_file} path coefficients; --coefficients {n} is more")
                F = t.n_frames if max_frames is None else min(t.n_frames, max_frames)
                if F < 2:
                    raise InputError(f"{p} has {t.n_frames} frame(s); training needs at least 2")
                xs.append(np.asarray(t.positions[:, :F]))
                vs.append(np.asarray(t.velocities[:, :F]))
                Ls.append(np.asarray(t.brownian[:, : F - 1, :n]))  # the first n are exact
        F = min(x.shape[1] for x in xs)
        self.x = np.concatenate([x[:, :F] for x in xs])
        self.v = np.concatenate([v[:, :F] for v in vs])
        self.L = np.concatenate([L[:, : F - 1] for L in Ls])
        self.n_coefficients = self.L.shape[2]
        self.h0_ps = float(meta["frame_interval_fs"]) / 1000.0
        if self.h0_ps > 0.020 + 1e-12:
            warnings.warn(f"frame interval {self.h0_ps * 1000:g} fs: record training data at 10-20 fs "
                          "(the local loss needs short base jumps)", stacklevel=2)
        T = self.x.shape[0]
        if T >= 2:
            self.train_traj, self.val_traj = np.arange(T - 1), np.array([T - 1])
            self.train_frames = self.val_frames = (0, F)
        else:
            cut = int(F * 0.9)
            self.train_traj = self.val_traj = np.array([0])
            self.train_frames, self.val_frames = (0, cut), (cut, F)

    @property
    def n_frames(self) -> int:
        return self.x.shape[1]

    def max_jump(self) -> int:
        lo, hi = self.val_frames
        lo2, hi2 = self.train_frames
        return max(1, min(hi - lo, hi2 - lo2) - 1)

    def draw(self, size: int, k: int, rng: np.random.Generator, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Trajectory and start-frame indices of ``size`` random jumps of ``k`` frame intervals."""
        traj = self.train_traj if split == "train" else self.val_traj
        lo, hi = self.train_frames if split == "train" else self.val_frames
        if hi - lo <= k:
            raise InputError(f"jumps of {k} frames need more than {k + 1} frames of data")
        return rng.choice(traj, size), rng.integers(lo, hi - k, size)

    def batch(self, size: int, k: int, rng: np.random.Generator, split: str = "train",
              device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
        """``size`` jumps of ``k`` frame intervals: x0, v0, x1, v1 (B,A,3), L (B,N,A,3), tau (B,) ps."""
        return self.items(*self.draw(size, k, rng, split), k, device, dtype)

    def items(self, r: np.ndarray, f: np.ndarray, k: int, device="cpu", dtype=torch.float32):
        idx = f[:, None] + np.arange(k)[None, :]
        blocks = self.L[r[:, None], idx]  # (B, k, N, A, 3)
        # composition matrices are dimensionless and depend only on the pieces' relative lengths
        L = np.einsum("knm,bkmac->bnac", _composition(k, self.n_coefficients), blocks)
        out = {"x0": self.x[r, f], "v0": self.v[r, f], "x1": self.x[r, f + k], "v1": self.v[r, f + k], "L": L}
        t = {key: torch.as_tensor(np.ascontiguousarray(val), dtype=dtype, device=device) for key, val in out.items()}
        t["tau"] = torch.full((len(r),), k * self.h0_ps, dtype=dtype, device=device)
        return t
