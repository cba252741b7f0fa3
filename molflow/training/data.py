"""Training data: reference frames and their recorded path coefficients, read from the run files.

Items are jumps of k frame intervals (tau = k h0, h0 = the files' frame interval): the start state,
the recorded end state, and the path coefficients of the k intervals composed exactly into those of
the whole jump (:func:`molflow.brownian.composition_matrices`).

Streaming, memory bounded: the files stay open (read-only) and each batch reads only the frames
its items need (sorted by trajectory and frame, so neighbouring reads share HDF5 chunks); HDF5's
chunk cache (``cache_mb`` in all, shared over the files) keeps recently read chunks. Nothing else
is held, so memory does not grow with the data.

Every frame of every file is used: the trajectories are the files' replicas in order (file 0's
replicas, then file 1's, ...), each with its own number of complete frames, and a jump of k
intervals is drawn uniformly over all valid (trajectory, start frame) pairs of the split. The
last trajectory is held out for validation (with a single trajectory: its last 10% of frames).
Draws depend only on the generator passed in, so a resumed training run draws the same items.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..brownian import composition_matrices
from ..errors import InputError
from ..trajectory import Trajectory

#: HDF5 chunk cache over all files (MB); a file's chunks are 4-64 frames of one replica
DEFAULT_CACHE_MB = 64.0


@lru_cache(maxsize=64)
def _composition(k: int, n: int) -> np.ndarray:
    return np.stack(composition_matrices([1.0] * k, n)) if n else np.zeros((k, 0, 0))  # equal pieces


class FrameData:
    """Frames of one system from one or more run files, read on demand.

    Attributes: ``h0_ps`` the frame interval, ``n_coefficients`` N, ``system`` the MolecularSystem,
    ``n_atoms``, ``n_trajectories`` T (all replicas of all files), ``frames`` (T,) complete frames
    of each trajectory, ``sources`` (T, 2) its (file, replica), ``train_traj``/``val_traj`` the
    trajectories of each split and ``train_frames``/``val_frames`` the (start, stop) frame range
    used in every trajectory of that split (stop None: to the trajectory's end).

    ``max_frames`` caps the frames used per file (the first ones); ``cache_mb`` bounds the HDF5
    chunk cache. ``read_forces`` (default False; the trainer sets it for a map with a torsion drive):
    items also carry the recorded forces at their start, ``f0``.
    """

    read_forces: bool = False

    def __init__(self, paths: Sequence[str], n_coefficients: int | None = None, max_frames: int | None = None,
                 cache_mb: float = DEFAULT_CACHE_MB):
        if not paths:
            raise InputError("no training data: pass at least one --data file")
        self.paths = [str(p) for p in paths]
        self.cache_mb = float(cache_mb)
        meta, n_files, frames, sources = None, [], [], []
        for i, p in enumerate(self.paths):
            with Trajectory(p) as t:
                a = t.attrs
                if meta is None:
                    meta = a
                    self.system = t.system()
                    self.n_atoms = t.n_atoms
                for key in ("fingerprint", "frame_interval_fs"):
                    if a.get(key) != meta.get(key):
                        raise InputError(f"{p}: {key} {a.get(key)!r} differs from {paths[0]}'s {meta.get(key)!r}; "
                                         "training data must share the system and frame interval")
                n_file = t.n_coefficients
                n_files.append(n_file)
                F = t.n_frames if max_frames is None else min(t.n_frames, int(max_frames))
                if F < 2:
                    raise InputError(f"{p} has {t.n_frames} frame(s); training needs at least 2")
                for r in range(t.n_replicas):
                    frames.append(F)
                    sources.append((i, r))
        n = min(n_files) if n_coefficients is None else int(n_coefficients)
        for p, n_file in zip(self.paths, n_files):
            if n > n_file:
                raise InputError(f"{p} records {n_file} path coefficients; --coefficients {n} is more")
        self.n_coefficients = n  # the first n recorded coefficients are exact for any n
        self.frames = np.asarray(frames, dtype=np.int64)
        self.sources = np.asarray(sources, dtype=np.int64)
        self.n_trajectories = T = len(frames)
        self.h0_ps = float(meta["frame_interval_fs"]) / 1000.0
        if self.h0_ps > 0.020 + 1e-12:
            warnings.warn(f"frame interval {self.h0_ps * 1000:g} fs: record training data at 10-20 fs "
                          "(the local loss needs short base jumps)", stacklevel=2)
        if T >= 2:
            self.train_traj, self.val_traj = np.arange(T - 1), np.array([T - 1])
            self.train_frames = self.val_frames = (0, None)
        else:
            F = int(self.frames[0])
            cut = int(F * 0.9)
            self.train_traj = self.val_traj = np.array([0])
            self.train_frames, self.val_frames = (0, cut), (cut, F)
        self._files: list | None = None
        self._pid = None

    # ------------------------------------------------------------------ files
    def _open(self) -> list:
        """The open files (reopened in a new process: an h5py handle must not cross a fork)."""
        import h5py

        if self._files is None or self._pid != os.getpid():
            per_file = max(1, int(self.cache_mb * 2**20 / max(1, 3 * len(self.paths))))  # 3 datasets read
            self._files = [h5py.File(p, "r", locking=False, rdcc_nbytes=per_file, rdcc_nslots=10007)
                           for p in self.paths]
            self._pid = os.getpid()
        return self._files

    def close(self) -> None:
        for f in self._files or []:
            f.close()
        self._files = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = None, None
        return state

    # ------------------------------------------------------------------ splits and draws
    def _ranges(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(trajectories, first frame, stop frame) of a split."""
        traj = self.train_traj if split == "train" else self.val_traj
        lo, hi = self.train_frames if split == "train" else self.val_frames
        stop = self.frames[traj] if hi is None else np.minimum(self.frames[traj], hi)
        return traj, np.full(len(traj), lo, dtype=np.int64), stop

    @property
    def n_frames(self) -> int:
        """Frames of the longest trajectory (``frames`` has each one's)."""
        return int(self.frames.max())

    def max_jump(self) -> int:
        """The longest jump (in frame intervals) that both splits can draw."""
        spans = []
        for split in ("train", "val"):
            _, lo, hi = self._ranges(split)
            spans.append(int((hi - lo).max()))
        return max(1, min(spans) - 1)

    def draw(self, size: int, k: int, rng: np.random.Generator, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Trajectory and start-frame indices of ``size`` jumps of ``k`` frame intervals, uniform over
        every valid (trajectory, start) of the split (longer trajectories give more starts)."""
        traj, lo, hi = self._ranges(split)
        starts = np.maximum(hi - lo - k, 0)  # valid start frames per trajectory
        total = int(starts.sum())
        if total == 0:
            raise InputError(f"jumps of {k} frames need more than {k + 1} frames of data")
        u = rng.integers(0, total, size)
        which = np.searchsorted(np.cumsum(starts), u, side="right")
        before = np.concatenate([[0], np.cumsum(starts)[:-1]])
        return traj[which], lo[which] + (u - before[which])

    def batch(self, size: int, k: int, rng: np.random.Generator, split: str = "train",
              device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
        """``size`` jumps of ``k`` frame intervals: x0, v0, x1, v1 (B,A,3) (and f0 with ``read_forces``),
        L (B,N,A,3), tau (B,) ps."""
        return self.items(*self.draw(size, k, rng, split), k, device, dtype)

    # ------------------------------------------------------------------ reading
    def read(self, r: np.ndarray, f: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """Arrays of the items (r, f, k): x0, v0, x1, v1 (B, A, 3), with ``read_forces`` also the forces at
        x0, f0 (B, A, 3) kJ/mol/nm, and the k coefficient blocks
        ``blocks`` (B, k, N, A, 3), float32, read from the files in (trajectory, frame) order."""
        r, f = np.asarray(r, dtype=np.int64), np.asarray(f, dtype=np.int64)
        if np.any(f < 0) or np.any(f + k >= self.frames[r]):
            raise IndexError(f"a jump of {k} frames runs past the end of its trajectory")
        files = self._open()
        datasets = [(h5["positions"], h5["velocities"], h5["brownian"], h5["forces"] if self.read_forces else None)
                    for h5 in files]
        B, A, N = len(r), self.n_atoms, self.n_coefficients
        keys = ("x0", "v0", "x1", "v1", "f0") if self.read_forces else ("x0", "v0", "x1", "v1")
        out = {key: np.empty((B, A, 3), np.float32) for key in keys}
        blocks = np.empty((B, k, N, A, 3), np.float32)
        for i in np.lexsort((f, r)):
            fi, rep = self.sources[r[i]]
            (pos, vel, brownian, forces), s = datasets[fi], int(f[i])
            if self.read_forces:
                out["f0"][i] = forces[rep, s]
            if k <= 32:  # one contiguous read spans both ends (h5py: faster than two indexed reads)
                xs, vs = pos[rep, s:s + k + 1], vel[rep, s:s + k + 1]
                out["x0"][i], out["x1"][i], out["v0"][i], out["v1"][i] = xs[0], xs[k], vs[0], vs[k]
            else:
                out["x0"][i], out["x1"][i] = pos[rep, [s, s + k]]
                out["v0"][i], out["v1"][i] = vel[rep, [s, s + k]]
            if N:
                blocks[i] = brownian[rep, s:s + k, :N]
        out["blocks"] = blocks
        return out

    def items(self, r: np.ndarray, f: np.ndarray, k: int, device="cpu", dtype=torch.float32):
        """Tensors of the items: x0, v0, x1, v1 (f0) (B,A,3), L (B,N,A,3) composed over the k intervals, tau (B,)."""
        out = self.read(r, f, k)
        blocks = out.pop("blocks")
        # composition matrices are dimensionless and depend only on the pieces' relative lengths
        out["L"] = np.einsum("knm,bkmac->bnac", _composition(k, self.n_coefficients), blocks)
        t = {key: torch.as_tensor(np.ascontiguousarray(val), dtype=dtype, device=device) for key, val in out.items()}
        t["tau"] = torch.full((len(r),), k * self.h0_ps, dtype=dtype, device=device)
        return t

    def training_positions(self, max_frames: int = 20000, skip_ps: float = 0.0) -> np.ndarray:
        """(M, A, 3) float32 positions of at most ``max_frames`` training frames, evenly spaced over
        all training (trajectory, frame) pairs (for statistics such as internal-coordinate spreads),
        without each trajectory's first ``skip_ps`` ps (its equilibration from the start structure)."""
        traj, lo, hi = self._ranges("train")
        lo = np.minimum(lo + int(round(float(skip_ps) / self.h0_ps)), hi)
        if int((hi - lo).sum()) == 0:
            raise InputError(f"no training frames are left after skipping the first {skip_ps:g} ps of each run")
        counts = hi - lo
        total = int(counts.sum())
        pick = np.unique(np.linspace(0, total - 1, min(int(max_frames), total)).round().astype(np.int64))
        which = np.searchsorted(np.cumsum(counts), pick, side="right")
        frame = lo[which] + pick - np.concatenate([[0], np.cumsum(counts)[:-1]])[which]
        files = self._open()
        out = np.empty((len(pick), self.n_atoms, 3), np.float32)
        for t_idx in np.unique(which):
            rows = np.nonzero(which == t_idx)[0]
            fi, rep = self.sources[traj[t_idx]]
            out[rows] = files[fi]["positions"][rep, frame[rows]]  # increasing frames within a trajectory
        return out

    # ------------------------------------------------------------------ whole arrays (small data only)
    def _whole(self, name: str) -> np.ndarray:
        if len(set(self.frames.tolist())) != 1:
            raise InputError(f"FrameData.{name[0]}: the trajectories have different lengths; read items instead")
        warnings.warn(f"FrameData.{name[0]} loads every frame into memory; use items()/read()/training_positions()",
                      DeprecationWarning, stacklevel=3)
        F = int(self.frames[0])
        files = self._open()
        parts = []
        for fi, f in enumerate(files):
            ds = f[name]
            stop = F - 1 if name == "brownian" else F
            parts.append(ds[:, :stop, :self.n_coefficients] if name == "brownian" else ds[:, :stop])
        return np.concatenate(parts)

    @property
    def x(self) -> np.ndarray:
        """(T, F, A, 3) all positions, loaded now (deprecated: only for equal-length small data)."""
        return self._whole("positions")

    @property
    def v(self) -> np.ndarray:
        """(T, F, A, 3) all velocities, loaded now (deprecated, as ``x``)."""
        return self._whole("velocities")

    @property
    def L(self) -> np.ndarray:
        """(T, F-1, N, A, 3) all coefficient blocks, loaded now (deprecated, as ``x``)."""
        return self._whole("brownian")
