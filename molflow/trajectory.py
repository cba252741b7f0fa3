"""The trajectory file contract (DESIGN.md section 5): one HDF5 file per run.

Datasets (R replicas, F frames, A atoms, N coefficients)::

    positions          (R, F, A, 3)        float32  nm
    velocities         (R, F, A, 3)        float32  nm/ps
    forces             (R, F, A, 3)        float32  kJ/mol/nm   (optional for sampled runs)
    potential_energy   (R, F)              float64  kJ/mol      (optional for sampled runs)
    brownian           (R, F-1, N, A, 3)   float32  sqrt(ps): L^(0..N-1) of each frame interval
    time               (F,)                float64  ps

A sampled run (whose state between jumps is float64) also keeps ``exact_state`` (2, R, A, 3) float64:
the positions and velocities of its last complete frame at full precision (attribute
``exact_state_frame`` says which frame), so ``--resume`` continues bit for bit.

Files are written chunk by chunk and flushed after every chunk; the attribute ``n_frames``
is raised only after a chunk is complete, so a reader (and ``--resume``) trusts the first
``n_frames`` frames even when the writer was killed mid-chunk. No SWMR / ``libver='latest'``:
such files stay flagged open after a SIGKILL.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .errors import InputError

FRAME_DATASETS = ("positions", "velocities", "forces", "potential_energy")
FORMAT_NAME = "molflow-trajectory"
FORMAT_VERSION = 1


class LazyFrames:
    """A read-only view of an HDF5 dataset clipped to the complete frames (axis ``axis``).

    Indexing reads only what is asked for; ``np.asarray(view)`` reads everything.
    """

    def __init__(self, dataset: h5py.Dataset, n: int, axis: int):
        self._ds, self._n, self._axis = dataset, n, axis
        shape = list(dataset.shape)
        shape[axis] = n
        self.shape = tuple(shape)
        self.dtype = dataset.dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        key = key + (slice(None),) * (self.ndim - len(key))
        parts = list(key)
        k = parts[self._axis]
        n = self._n
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step < 0:
                return self[tuple(parts[:self._axis] + [slice(None)] + parts[self._axis + 1:])][
                    (slice(None),) * self._axis + (k,)]
            parts[self._axis] = slice(start, max(start, stop), step)
        elif np.ndim(k) == 0:
            k = int(k)
            if not -n <= k < n:
                raise IndexError(f"frame {k} out of range for {n} frames")
            parts[self._axis] = k % n
        else:
            idx = np.asarray(k)
            if idx.dtype == bool:
                idx = np.nonzero(idx)[0]
            idx = np.where(idx < 0, idx + n, idx)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise IndexError(f"frame index out of range for {n} frames")
            uniq, inverse = np.unique(idx, return_inverse=True)  # h5py wants increasing indices
            parts[self._axis] = uniq
            data = self._ds[tuple(parts)]
            n_int_before = sum(1 for p in parts[:self._axis] if np.ndim(p) == 0 and not isinstance(p, slice))
            return np.take(data, inverse, axis=self._axis - n_int_before)
        return self._ds[tuple(parts)]

    def __array__(self, dtype=None, copy=None):
        arr = self[...]
        return arr.astype(dtype) if dtype is not None else arr


class Trajectory:
    """A molflow run: an HDF5 trajectory file (or a sharded run's manifest) opened lazily.

        >>> traj = Trajectory("run.h5")
        >>> traj.positions[0, -1]      # replica 0, last frame, (A, 3) nm
        >>> md = traj.to_mdtraj(0)      # mdtraj.Trajectory of replica 0

    Array properties are lazy: indexing reads only the requested part of the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"no such trajectory file: {self.path}")
        try:
            # no file lock: a running simulation can be read; only complete frames are exposed
            self._file = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            raise InputError(f"{self.path} is not a readable HDF5 file ({exc})") from None
        if self._file.attrs.get("format") != FORMAT_NAME:
            self._file.close()
            raise InputError(f"{self.path} is not a molflow trajectory (no format='{FORMAT_NAME}' attribute)")

    # -- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes as plain Python values (settings, seed, hardware, wall_clock_s, ...)."""
        return {k: plain_attr(v) for k, v in self._file.attrs.items()}

    @property
    def n_frames(self) -> int:
        """Number of complete frames (frames of a chunk being written are not counted)."""
        n = int(self._file.attrs.get("n_frames", 0))
        return min([n] + [self._file[k].shape[1] for k in ("positions", "velocities") if k in self._file])

    def exact_state(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(positions nm, velocities nm/ps), each (R, A, 3) float64, of the last complete frame at full
        precision, when the file keeps them for that frame (sampled runs); else None."""
        if "exact_state" not in self._file or int(self._file.attrs.get("exact_state_frame", -1)) != self.n_frames - 1:
            return None
        st = np.asarray(self._file["exact_state"], dtype=np.float64)
        return st[0], st[1]

    @property
    def n_replicas(self) -> int:
        return int(self._file["positions"].shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self._file["positions"].shape[2])

    @property
    def n_coefficients(self) -> int:
        return int(self._file.attrs.get("n_coefficients", 0))

    @property
    def frame_interval_ps(self) -> float:
        return float(self._file.attrs["frame_interval_fs"]) / 1000.0

    # -- arrays
    def _frames(self, name: str, offset: int = 0) -> LazyFrames | None:
        if name not in self._file:
            return None
        return LazyFrames(self._file[name], max(self.n_frames - offset, 0), axis=1 if name != "time" else 0)

    @property
    def positions(self) -> LazyFrames:
        """(R, F, A, 3) positions in nm (float32), each replica in its own frame of reference."""
        return self._frames("positions")

    @property
    def velocities(self) -> LazyFrames:
        """(R, F, A, 3) on-step velocities in nm/ps (float32)."""
        return self._frames("velocities")

    @property
    def forces(self) -> LazyFrames | None:
        """(R, F, A, 3) forces in kJ/mol/nm (float32), or None if not recorded."""
        return self._frames("forces")

    @property
    def potential_energy(self) -> LazyFrames | None:
        """(R, F) single-molecule NoCutoff potential energy in kJ/mol, or None."""
        return self._frames("potential_energy")

    @property
    def brownian(self) -> LazyFrames | None:
        """(R, F-1, N, A, 3) path coefficients L^(0..N-1) of each frame interval, sqrt(ps)."""
        return self._frames("brownian", offset=1)

    @property
    def time(self) -> np.ndarray:
        """(F,) time of each frame in ps (frame 0 = start state after equilibration)."""
        return self._file["time"][: self.n_frames]

    # -- conveniences
    def iter_chunks(self, frames: int = 1000) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Yield ``(frame_slice, arrays)`` for consecutive blocks of ``frames`` frames.

        ``arrays`` holds positions, velocities (and forces, potential_energy when present) of all
        replicas for those frames, and ``brownian`` for the intervals ending at those frames.
        """
        for start in range(0, self.n_frames, frames):
            sl = slice(start, min(start + frames, self.n_frames))
            out = {name: self._frames(name)[:, sl] for name in FRAME_DATASETS if name in self._file}
            if "brownian" in self._file:
                out["brownian"] = self._file["brownian"][:, max(sl.start - 1, 0): sl.stop - 1]
            out["time"] = self._file["time"][sl]
            yield sl, out

    def pdb_text(self) -> str:
        return str(self._file.attrs["pdb"])

    def openmm_topology(self):
        import io

        from openmm import app

        return app.PDBFile(io.StringIO(self.pdb_text())).topology

    def to_mdtraj(self, replica: int = 0):
        """An ``mdtraj.Trajectory`` of one replica (positions nm, time ps)."""
        import mdtraj

        top = mdtraj.Topology.from_openmm(self.openmm_topology())
        return mdtraj.Trajectory(np.asarray(self.positions[replica]), top, time=self.time)

    def system(self):
        """The :class:`~molflow.systems.MolecularSystem` this file was made with."""
        from .systems import system_from_pdb_text

        a = self.attrs
        return system_from_pdb_text(a["pdb"], a["forcefield"], a["temperature_K"],
                                    a["friction_per_ps"], a["timestep_fs"], a["system"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Trajectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        a = self._file.attrs
        return (f"Trajectory({str(self.path)!r}: system={a.get('system')!r}, replicas={self.n_replicas}, "
                f"frames={self.n_frames}, atoms={self.n_atoms}, frame_interval_fs={a.get('frame_interval_fs')}, "
                f"n_coefficients={a.get('n_coefficients')})")


def plain_attr(value: Any) -> Any:
    """An HDF5 attribute value as plain Python: text decoded, JSON lists/dicts parsed, numpy
    scalars and arrays as Python numbers and lists (what ``Trajectory.attrs`` returns)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class TrajectoryWriter:
    """Appends chunks of frames to a trajectory file, crash-safely (see module docstring).

    Create a new file with :meth:`create`, reopen one for appending with :meth:`open_append`.
    """

    def __init__(self, file: h5py.File):
        self._file = file

    @classmethod
    def create(cls, path: str | os.PathLike, n_replicas: int, n_atoms: int, n_coefficients: int,
               attrs: dict[str, Any], chunk_frames: int = 16, forces: bool = True,
               energies: bool = True) -> "TrajectoryWriter":
        f = h5py.File(path, "w")  # default libver: readable after a crash, no SWMR
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (list, dict, tuple)) else value
        f.attrs["n_frames"] = 0
        R, A, N = n_replicas, n_atoms, n_coefficients
        c = max(1, int(chunk_frames))
        vec = dict(shape=(R, 0, A, 3), maxshape=(R, None, A, 3), dtype="f4", chunks=(1, c, A, 3))
        f.create_dataset("positions", **vec)
        f.create_dataset("velocities", **vec)
        if forces:
            f.create_dataset("forces", **vec)
        if energies:
            f.create_dataset("potential_energy", shape=(R, 0), maxshape=(R, None), dtype="f8",
                             chunks=(R, max(c, 64)))
        # N = 0 (nothing recorded): HDF5 chunks need every extent >= 1, so that axis stays resizable
        f.create_dataset("brownian", shape=(R, 0, N, A, 3), maxshape=(R, None, N if N else None, A, 3),
                         dtype="f4", chunks=(1, c, max(N, 1), A, 3))
        f.create_dataset("time", shape=(0,), maxshape=(None,), dtype="f8", chunks=(max(c, 256),))
        f.flush()
        return cls(f)

    @classmethod
    def open_append(cls, path: str | os.PathLike) -> "TrajectoryWriter":
        """Reopen for appending; drops any partly written chunk beyond ``n_frames``."""
        f = h5py.File(path, "r+")
        n = int(f.attrs.get("n_frames", 0))
        for name in FRAME_DATASETS + ("time",):
            if name in f:
                _resize(f[name], n, axis=0 if name == "time" else 1)
        _resize(f["brownian"], max(n - 1, 0), axis=1)
        f.flush()
        return cls(f)

    @property
    def n_frames(self) -> int:
        return int(self._file.attrs["n_frames"])

    def set_attrs(self, **attrs: Any) -> None:
        for key, value in attrs.items():
            self._file.attrs[key] = json.dumps(value) if isinstance(value, (list, dict, tuple)) else value

    def append(self, time_ps: np.ndarray, positions: np.ndarray, velocities: np.ndarray,
               brownian: np.ndarray, forces: np.ndarray | None = None,
               potential_energy: np.ndarray | None = None, **attrs: Any) -> None:
        """Append f frames for all replicas, then flush and count them as complete.

        Shapes: positions/velocities/forces (R, f, A, 3); potential_energy (R, f);
        time_ps (f,); brownian (R, f', N, A, 3) with f' = f, or f - 1 when the first
        appended frame is frame 0 (frame 0 has no preceding interval).
        """
        f = self._file
        n0 = self.n_frames
        k = len(time_ps)
        arrays = {"positions": positions, "velocities": velocities, "forces": forces,
                  "potential_energy": potential_energy}
        for name, data in arrays.items():
            if name in f:
                if data is None:
                    raise ValueError(f"this file records {name}; pass it")
                _resize(f[name], n0 + k, axis=1)
                f[name][:, n0:n0 + k] = data
        nb = k - (1 if n0 == 0 else 0)
        if brownian.shape[1] != nb:
            raise ValueError(f"expected {nb} coefficient blocks for {k} frames, got {brownian.shape[1]}")
        b0 = max(n0 - 1, 0)
        _resize(f["brownian"], b0 + nb, axis=1)
        if nb:
            f["brownian"][:, b0:b0 + nb] = brownian
        _resize(f["time"], n0 + k, axis=0)
        f["time"][n0:n0 + k] = time_ps
        f.flush()  # data first ...
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["n_frames"] = n0 + k
        f.flush()  # ... then the count that makes it visible

    def set_exact_state(self, positions: np.ndarray, velocities: np.ndarray) -> None:
        """Keep the last complete frame's positions and velocities (R, A, 3) at full precision (float64),
        for an exact resume; call right after :meth:`append`. Written before the frame index that
        validates it, so a crash in between leaves the float32 frame to resume from."""
        f = self._file
        st = np.stack([positions, velocities]).astype(np.float64)
        if "exact_state" not in f:
            f.create_dataset("exact_state", data=st)
        else:
            f["exact_state"][...] = st
        f.flush()
        f.attrs["exact_state_frame"] = self.n_frames - 1
        f.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.flush()
            self._file.close()


def _resize(ds: h5py.Dataset, n: int, axis: int) -> None:
    if ds.shape[axis] != n:
        ds.resize(n, axis=axis)


_plain = plain_attr  # the old private name, kept while cli.py, evaluation/report.py, boltzmann/sampler.py move
