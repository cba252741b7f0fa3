"""Run reference Langevin MD with the Brownian path recorded (user story 1).

A run is split into *groups*: each group is one OpenMM Context holding ``copies_per_context``
non-interacting copies (:mod:`molflow.md.multicopy`). On CUDA/OpenCL one process drives large
groups; on CPU/Reference small groups (<= 8 copies, one thread each) run in worker processes, one
per core (DESIGN.md section 4). All groups advance in lock step, one chunk of frames at a time; the
main process writes each chunk for all replicas, flushes, and keeps an OpenMM checkpoint per group
in ``<out>.ckpt/`` so ``resume=True`` continues bit-identically after a crash.

Python:

    >>> import molflow
    >>> traj = molflow.simulate("alanine_dipeptide", "run.h5", replicas=2, time_ps=10, frame_fs=100)
"""
from __future__ import annotations

import dataclasses
import gc
import math
import multiprocessing as mp
import os
import platform as _platform
import queue
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import __version__
from ..brownian import legendre_step_weights
from ..errors import InputError, SimulationError
from ..seeding import derive_seed, random_seed
from ..systems import MolecularSystem, load_system
from ..trajectory import Trajectory, TrajectoryWriter
from ..units import BOLTZMANN_KJ_MOL_K, kinetic_temperature
from .integrator import (HostNoise, choose_substeps, integrator_id, onstep_velocities, read_coefficients,
                         read_frame_outputs, recording_integrator, set_onstep_velocities, state_array, step_physical)
from .multicopy import CopyLayout, default_cutoff_nm, make_layout, multicopy_system

GPU_PLATFORMS = ("CUDA", "OpenCL", "HIP")
#: stream tags of the host noise (:class:`~molflow.md.integrator.HostNoise` keys end with one of them)
NOISE_EQUILIBRATION, NOISE_FRAMES = 1, 2


def host_noise_for(platform: str) -> bool:
    """Whether the engine draws the per-step Gaussians in numpy on ``platform`` (CPU, Reference).

    On the Reference platform that replaces the per-DOF computation drawing them and the coefficient
    accumulators (each ~2 us per step for 22 atoms) with one per-DOF variable set per step and a
    matrix product per frame (module docstring of :mod:`molflow.md.integrator`); on a GPU it would
    cost a host-to-device copy per call, so there OpenMM draws them and accumulates the coefficients.
    """
    return platform not in GPU_PLATFORMS


# On CPU-only hosts, `auto` runs molecules up to this size as one copy per Reference Context (one
# worker per core). Measured on 2 cores (AMD EPYC), 8 replicas, N = 3, aggregate ns/day:
# alanine dipeptide (22 atoms) Reference 1 copy/context 1854 vs CPU platform 4 copies/context 1455,
# 8/context 748; trialanine (42 atoms) Reference 565 vs CPU 624.
REFERENCE_MAX_ATOMS = 32
#: executors other than "local": name -> function with simulate's signature (less ``executor`` and
#: ``group_offset``). Modules that provide one register it (:func:`register_executor`); the engine never
#: imports them (``molflow.md.distributed`` registers "dask" when the ``molflow.md`` package loads).
EXECUTORS: dict[str, Callable[..., Trajectory]] = {}


def register_executor(name: str, run: Callable[..., Trajectory]) -> None:
    """Make ``simulate(..., executor=name)`` call ``run`` (same arguments as :func:`simulate`)."""
    EXECUTORS[name] = run


#: settings that must match for ``resume`` (``time_ps`` may grow).
RESUME_KEYS = ("system", "fingerprint", "n_replicas", "frame_interval_fs", "n_coefficients", "seed",
               "copies_per_context", "temperature_K", "friction_per_ps", "timestep_fs")
# kinetic temperature of one copy above this multiple of the target means the run exploded
# (a 22-atom copy fluctuates by ~T*sqrt(2/(3A)) = 17%: 5x is far beyond any honest fluctuation).
EXPLOSION_FACTOR = 5.0
#: with host noise, Group.run draws the Gaussians (and computes the coefficients) of up to this many
#: frames at once, at most NOISE_AHEAD_BYTES of them: the same numbers as one frame at a time, but the
#: numpy code runs warm instead of after every frame's OpenMM steps have evicted it from the CPU caches.
#: Measured on the Reference platform, 22 atoms, 20-fs frames: drawing 20 x 66 Gaussians costs ~31 us
#: between frames and ~13 us in a batch; the coefficient product ~16 us and ~3 us
NOISE_AHEAD_FRAMES = 16
NOISE_AHEAD_BYTES = 1 << 18


@dataclasses.dataclass
class RunSpec:
    """Everything a worker needs to build and drive its groups (picklable)."""

    pdb_text: str
    forcefield: tuple[str, ...]
    name: str
    temperature_K: float
    friction_per_ps: float
    timestep_fs: float
    steps_per_frame: int
    n_coefficients: int
    platform: str
    threads: int
    deterministic: bool
    cutoff_nm: float
    seed: int
    equilibration_steps: int
    start_positions_nm: np.ndarray  # (A, 3) minimised structure
    group_offset: int = 0  # index of this file's first group in the whole run (a Dask shard's place)

    def molecule(self) -> MolecularSystem:
        from ..systems import system_from_pdb_text

        return system_from_pdb_text(self.pdb_text, self.forcefield, self.temperature_K,
                                    self.friction_per_ps, self.timestep_fs, self.name)


@dataclasses.dataclass
class GroupStart:
    """How a group begins: fresh, from an OpenMM checkpoint, or from a recorded frame."""

    kind: str  # "fresh" | "checkpoint" | "state"
    checkpoint: bytes | None = None
    positions_nm: np.ndarray | None = None  # (C, A, 3) file frame
    velocities: np.ndarray | None = None
    restart: int = 0


# ----------------------------------------------------------------------------- one group


class EnergyEvaluator:
    """Single-molecule NoCutoff potential energies of copies (kJ/mol), off the multi-copy context."""

    def __init__(self, molecule: MolecularSystem, platform: str = "CPU"):
        import openmm

        self._context = openmm.Context(molecule.create_system("nocutoff"), openmm.VerletIntegrator(0.001),
                                       platform_object(platform), platform_properties(platform, 1, False))

    def __call__(self, positions_nm: np.ndarray) -> np.ndarray:
        """positions (..., A, 3) nm -> energies (...) kJ/mol."""
        flat = positions_nm.reshape(-1, *positions_nm.shape[-2:])
        out = np.empty(len(flat))
        for i, x in enumerate(flat):
            self._context.setPositions(x)
            out[i] = self._context.getState(getEnergy=True).getPotentialEnergy()._value
        return out.reshape(positions_nm.shape[:-2])

    def forces(self, positions_nm: np.ndarray) -> np.ndarray:
        """positions (A, 3) nm -> forces (A, 3) kJ/mol/nm."""
        self._context.setPositions(positions_nm)
        return np.asarray(self._context.getState(getForces=True).getForces(asNumpy=True)._value)


class Group:
    """One OpenMM Context of ``n_copies`` copies, advanced a frame at a time.

    With host noise (:func:`host_noise_for`) the Gaussians of frame ``f`` are a function of (the run's
    seed, the group's index in the run, the restart, ``f``) only (:class:`HostNoise`; equilibration
    has its own stream), the coefficients of a frame are ``legendre_step_weights(N, K, dt) @ xi``,
    and :meth:`checkpoint` carries the stream's position in the OpenMM checkpoint, so a run resumed
    from one draws what an uninterrupted run would. Otherwise OpenMM draws them from its integrator
    seed and the integrator accumulates the coefficients.
    """

    def __init__(self, spec: RunSpec, index: int, n_copies: int, molecule: MolecularSystem | None = None,
                 energies: EnergyEvaluator | None = None, host_noise: bool | None = None):
        """``host_noise``: None picks it by platform (:func:`host_noise_for`); True/False force it (tests,
        benchmarks)."""
        import openmm

        self.spec, self.index, self.n_copies = spec, index, n_copies
        # seeds follow the group's index in the whole run, so a shard of a Dask run draws the same
        # numbers as the same group of a local run
        self.seed_index = spec.group_offset + index
        mol = molecule or spec.molecule()
        self.n_atoms = mol.n_atoms
        self.layout: CopyLayout = make_layout(n_copies, spec.start_positions_nm, spec.cutoff_nm)
        self.masses = np.tile(mol.masses_amu, n_copies)
        system = multicopy_system(mol, n_copies, spec.cutoff_nm)
        self.dt_ps = spec.timestep_fs / 1000.0
        self.substeps = choose_substeps(spec.steps_per_frame, spec.equilibration_steps)
        # frame outputs (forces, and the energy of a lone copy) come from the integrator's last call
        # of each frame instead of a second force evaluation; on a GPU they would cost a host sync
        # per call, so there the frame is read with getState and the energy evaluator as before
        self.fast_frames = spec.platform not in GPU_PLATFORMS
        self.context_energy = self.fast_frames and n_copies == 1  # the context is the NoCutoff molecule
        self.host_noise = host_noise_for(spec.platform) if host_noise is None else bool(host_noise)
        self.integrator = recording_integrator(spec.temperature_K, spec.friction_per_ps, spec.timestep_fs,
                                               spec.steps_per_frame, spec.n_coefficients,
                                               derive_seed(spec.seed, self.seed_index), substeps=self.substeps,
                                               frame_forces=self.fast_frames, frame_energy=self.context_energy,
                                               host_noise=self.host_noise)
        self.noise = HostNoise(self.integrator, n_copies * self.n_atoms) if self.host_noise else None
        self._weights = legendre_step_weights(spec.n_coefficients, spec.steps_per_frame, self.dt_ps)
        self._restart, self._next_frame = 0, 0  # the host noise's stream (restart) and next frame in it
        self._coefficients: np.ndarray | None = None  # (N, C*A, 3) of the last frame run, with host noise
        self.context = openmm.Context(system, self.integrator, platform_object(spec.platform),
                                      platform_properties(spec.platform, spec.threads, spec.deterministic))
        self.energies = None if self.context_energy else \
            (energies or EnergyEvaluator(mol, "CPU" if spec.platform in GPU_PLATFORMS else spec.platform))
        self.kT = BOLTZMANN_KJ_MOL_K * spec.temperature_K
        # per-frame constants of _guard (masses per DOF, made once)
        self._m3 = np.repeat(np.asarray(mol.masses_amu, dtype=np.float64), 3)  # (A*3,) one copy's mass per DOF
        self._mass_dof = np.repeat(np.asarray(self.masses, dtype=np.float64)[:, None], 3, axis=1)  # (C*A, 3)
        # sum of m v^2 of one copy at EXPLOSION_FACTOR x the target temperature, less 1e-9 so rounding
        # never hides a copy the exact check (_check_velocities) would stop
        self._mv2_max = EXPLOSION_FACTOR * spec.temperature_K * 3 * self.n_atoms * BOLTZMANN_KJ_MOL_K * (1 - 1e-9)

    # -- starting
    def start(self, how: GroupStart) -> dict[str, np.ndarray] | None:
        """Begin the group; a fresh start equilibrates and returns frame 0."""
        if how.kind == "checkpoint":
            try:
                self.context.loadCheckpoint(how.checkpoint)
            except Exception as exc:  # noqa: BLE001 - OpenMM raises a bare Exception for a foreign checkpoint
                if how.velocities is None:
                    raise SimulationError(f"cannot load the OpenMM checkpoint of group {self.index}: {exc}") from exc
                warnings.warn(f"group {self.index}: the OpenMM checkpoint does not load here ({exc}); "
                              "continuing from the last frame's state instead", stacklevel=2)
                return self.start(dataclasses.replace(how, kind="state"))
            if self.noise is not None:  # the stream continues where the checkpoint left it
                self._select_frames(*self.noise.saved())
            x = self._state(positions=True)["x"]
            mean_diff = how.positions_nm.mean(1) - x.reshape(self.n_copies, self.n_atoms, 3).mean(1)
            self.layout.offsets_nm = np.round(mean_diff)
            return None
        if how.kind == "state":
            centroid = how.positions_nm.mean(1)
            self.layout.offsets_nm = np.round(centroid - self.layout.sites_nm)
            self.context.setPositions(self.layout.to_context_frame(how.positions_nm.astype(np.float64)))
            set_onstep_velocities(self.context, how.velocities.reshape(-1, 3), self.masses, self.dt_ps)
            self.integrator.setRandomNumberSeed(derive_seed(self.spec.seed, self.seed_index, 1000 + how.restart))
            self.integrator.setGlobalVariableByName("kstep", 0)
            self._select_frames(how.restart, 0)
            return None
        # fresh: every copy starts from the minimised structure with its own velocities
        start = np.broadcast_to(self.spec.start_positions_nm, (self.n_copies, self.n_atoms, 3))
        self.context.setPositions(self.layout.to_context_frame(start))
        self.context.setVelocitiesToTemperature(self.spec.temperature_K, derive_seed(self.spec.seed, self.seed_index, 1))
        set_onstep_velocities(self.context, self._state(velocities=True)["u"], self.masses, self.dt_ps)
        remaining, piece = self.spec.equilibration_steps, 0
        if self.noise is not None:
            self.noise.select(*self._noise_key(0, NOISE_EQUILIBRATION))
        while remaining > 0:  # equilibrate frame by frame so the margin guard sees it
            n = min(remaining, self.spec.steps_per_frame)
            if self.noise is None:
                step_physical(self.integrator, n)
            else:
                self.noise.run(self.noise.draw(piece, n))
            remaining, piece = remaining - n, piece + 1
            self._guard(self._state(positions=True, velocities=True, forces=True))
        self.integrator.setGlobalVariableByName("kstep", 0)
        self._select_frames(0, 0)
        return self.read_frame(with_coefficients=False)

    def _noise_key(self, restart: int, phase: int) -> tuple[int, ...]:
        return (int(self.spec.seed) & 0xFFFFFFFF, int(self.seed_index), int(restart), phase)

    def _select_frames(self, restart: int, next_frame: int) -> None:
        """Draw the coming frames' host noise from frame ``next_frame`` of the stream of ``restart``."""
        self._restart, self._next_frame = int(restart), int(next_frame)
        if self.noise is not None:
            self.noise.select(*self._noise_key(restart, NOISE_FRAMES))

    # -- running
    def run(self, n_frames: int) -> Iterator[dict[str, np.ndarray]]:
        """Advance ``n_frames`` frames, yielding each. With host noise the Gaussians and coefficients of up
        to NOISE_AHEAD_FRAMES coming frames (of these ``n_frames``) are made at once: frame ``f`` still
        gets stretch ``f`` of the stream selected, and ``_next_frame`` counts the frames run."""
        K = self.spec.steps_per_frame
        if self.noise is None:
            for _ in range(n_frames):
                step_physical(self.integrator, K)
                yield self.read_frame(with_coefficients=True, after_full_frame=True)
            return
        ahead = max(1, min(NOISE_AHEAD_FRAMES, NOISE_AHEAD_BYTES // (K * self.noise.n_particles * 3 * 8)))
        left = int(n_frames)
        while left > 0:
            batch = self.noise.draw_many(self._next_frame, min(ahead, left), K)  # (b, K, C*A, 3)
            coefficients = [self._frame_coefficients(xi) for xi in batch]
            left -= len(batch)
            for xi, L in zip(batch, coefficients):
                self._next_frame += 1
                self.noise.run(xi)
                self._coefficients = L
                yield self.read_frame(with_coefficients=True, after_full_frame=True)

    def _frame_coefficients(self, xi: np.ndarray) -> np.ndarray:
        """(N, C*A, 3) coefficients of a frame driven by the Gaussians ``xi`` (K, C*A, 3)."""
        return (self._weights @ xi.reshape(len(xi), -1)).reshape(len(self._weights), *xi.shape[1:])

    def read_frame(self, with_coefficients: bool, after_full_frame: bool = False) -> dict[str, np.ndarray]:
        """The current frame; ``after_full_frame``: right after a whole frame of steps (frame outputs valid)."""
        C, A = self.n_copies, self.n_atoms
        if after_full_frame and self.fast_frames:
            st = self.context.getState(getPositions=True, getVelocities=True)
            s = {"x": state_array(st, "positions"), "u": state_array(st, "velocities")}
            s["f"], energy = read_frame_outputs(self.integrator, self.context_energy)
        else:
            s = self._state(positions=True, velocities=True, forces=True, energy=self.context_energy)
            energy = s.get("e")
        s["v"] = v = onstep_velocities(s["u"], s["f"], self.masses, self.dt_ps)
        self._guard(s)
        x_file = self.layout.to_file_frame(s["x"])
        frame = {"positions": x_file, "velocities": v.reshape(C, A, 3), "forces": s["f"].reshape(C, A, 3),
                 "potential_energy": np.array([energy]) if self.context_energy else self.energies(x_file)}
        if not (math.isfinite(energy) if self.context_energy else np.isfinite(frame["potential_energy"]).all()):
            raise SimulationError("non-finite potential energy (the run blew up)")
        if with_coefficients:
            L = read_coefficients(self.integrator, self.spec.n_coefficients) if self.noise is None \
                else self._coefficients  # (N, C*A, 3) of the last frame run
            frame["brownian"] = L.reshape(-1, C, A, 3).transpose(1, 0, 2, 3)
        return frame

    def _state(self, positions=False, velocities=False, forces=False, energy=False) -> dict[str, np.ndarray]:
        """Context state; ``u`` is the context's (half-kicked) velocity variable."""
        st = self.context.getState(getPositions=positions, getVelocities=velocities, getForces=forces,
                                   getEnergy=energy)
        out = {}
        if positions:
            out["x"] = state_array(st, "positions")
        if velocities:
            out["u"] = state_array(st, "velocities")
        if forces:
            out["f"] = state_array(st, "forces")
        if energy:
            out["e"] = float(st.getPotentialEnergy()._value)
        return out

    def _guard(self, s: dict[str, np.ndarray]) -> None:
        """Stop a run that blew up: non-finite velocities or positions, or a copy past EXPLOSION_FACTOR x the
        target kinetic temperature; with several copies, guard the cutoff margin (and recentre).

        Once per frame, so the common case is a few numpy calls: the largest sum of m v^2 over the
        copies is below the limit (NaN and inf are not), and a lone copy's positions sum to a finite
        number; only otherwise do the exact checks run, and they decide."""
        if "u" in s:
            v = s["v"] if "v" in s else onstep_velocities(s["u"], s["f"], self.masses, self.dt_ps)
            if self.n_copies == 1:
                mv2 = np.vdot(v, self._mass_dof * v)
            else:
                vf = v.reshape(self.n_copies, -1)
                mv2 = ((vf * vf) @ self._m3).max()
            if not mv2 < self._mv2_max:
                self._check_velocities(v)
        if self.n_copies == 1:
            # a lone copy is the NoCutoff molecule: no cutoff margin to guard and no neighbour to drift
            # towards (recentring would only move it by whole nm, which the file frame undoes)
            if not math.isfinite(s["x"].sum()) and not np.isfinite(s["x"]).all():
                raise SimulationError("non-finite positions in copy/copies [0] (the run blew up)")
        elif self.layout.check_and_recentre(s["x"]):
            self.context.setPositions(s["x"])

    def _check_velocities(self, v: np.ndarray) -> None:
        """The exact velocity checks of :meth:`_guard` (on-step velocities (C*A, 3))."""
        v = v.reshape(self.n_copies, self.n_atoms, 3)
        if not np.isfinite(v).all():
            raise SimulationError("non-finite velocities (the run blew up)")
        t_kin = kinetic_temperature(v, self.masses.reshape(self.n_copies, self.n_atoms))
        if (t_kin > EXPLOSION_FACTOR * self.spec.temperature_K).any():
            c = int(np.argmax(t_kin))
            raise SimulationError(f"copy {c} reached kinetic temperature {t_kin[c]:.0f} K "
                                  f"(target {self.spec.temperature_K:.0f} K): the run exploded")

    def checkpoint(self) -> bytes:
        """An OpenMM checkpoint of the context; with host noise it carries the noise stream's position."""
        if self.noise is not None:
            self.noise.save(self._restart, self._next_frame)
        return self.context.createCheckpoint()


# ----------------------------------------------------------------------------- workers


def _drive_groups(spec: RunSpec, groups: list[tuple[int, int, GroupStart]], frames_per_chunk: list[int]):
    """Generator driving several groups in lock step: yields (group, chunk, frames, checkpoint, error)."""
    mol = spec.molecule()
    energies = EnergyEvaluator(mol, "CPU" if spec.platform in GPU_PLATFORMS else spec.platform)
    live: list[Group] = []
    for index, n_copies, how in groups:
        g = Group(spec, index, n_copies, mol, energies)
        try:
            first = g.start(how)
        except SimulationError as exc:
            yield index, -1, [], None, str(exc)
            return
        live.append(g)
        if first is not None:
            yield index, -1, [first], g.checkpoint(), None
    for chunk, n in enumerate(frames_per_chunk):
        for g in live:
            frames = []
            try:
                for fr in g.run(n):
                    frames.append(fr)
            except SimulationError as exc:
                yield g.index, chunk, frames, None, str(exc)
                return
            yield g.index, chunk, frames, g.checkpoint(), None


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when the main process dies (SIGKILL included), on Linux via prctl."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(spec, groups, frames_per_chunk, out_q, parent_pid):  # pragma: no cover - subprocess
    _die_with_parent(parent_pid)
    try:
        for item in _drive_groups(spec, groups, frames_per_chunk):
            out_q.put(item)
    except BaseException as exc:  # report anything else as a failure of the first group
        out_q.put((groups[0][0], -2, [], None, f"worker crashed: {type(exc).__name__}: {exc}"))


# ----------------------------------------------------------------------------- public entry point


def simulate(system: str | MolecularSystem, out: str | os.PathLike, replicas: int = 1,
             time_ps: float = 100.0, frame_fs: float = 100.0, n_coefficients: int = 3,
             equilibrate_ps: float = 10.0, platform: str = "auto", seed: int | None = None,
             resume: bool = False, overwrite: bool = False, copies_per_context: int | None = None,
             workers: int | None = None, chunk_frames: int | None = None, deterministic: bool = False,
             cutoff_nm: float | None = None, progress: bool = True, executor: str | Callable = "local",
             scheduler: str | None = None, group_offset: int = 0, **overrides: Any) -> Trajectory:
    """Simulate ``replicas`` independent Langevin trajectories and record their Brownian paths.

    Parameters
    ----------
    system: a built-in name, a PDB path, or a :class:`~molflow.systems.MolecularSystem`.
    out: the HDF5 file to write (DESIGN.md section 5). Refused if it exists, unless
        ``resume`` (continue it) or ``overwrite``.
    replicas: number of independent trajectories R.
    time_ps: simulated time per replica after equilibration (ps); F = time_ps*1000/frame_fs + 1.
    frame_fs: interval between saved frames (fs), a multiple of the timestep.
    n_coefficients: Legendre path coefficients N recorded per interval (0..8).
    equilibrate_ps: equilibration after minimisation, before frame 0 (ps).
    platform: ``auto`` (CUDA if usable, else CPU), ``Reference``, ``CPU``, ``CUDA``, ``OpenCL``.
    seed: master seed; random (printed and recorded) if None.
    copies_per_context: replicas per OpenMM Context (default: all on a GPU, <= 8 on a CPU).
    workers: CPU worker processes (default: one per core, at most one per group).
    chunk_frames: frames per written chunk (default: about 2 s of compute, at most 100 frames).
    deterministic: ask CUDA for deterministic forces.
    cutoff_nm: multi-copy nonbonded cutoff (default: from the molecule's size, >= 1.5 nm).
    executor: ``local`` (this machine: worker processes or one GPU), a registered name
        (:data:`EXECUTORS`) or a function with this signature. ``dask``: each group of
        replicas is a Dask task writing its own shard ``<out>.shards/shard-XXXX.h5``, and ``out``
        becomes an HDF5 file of virtual datasets over them (:mod:`molflow.md.distributed`).
    scheduler: Dask scheduler address (``tcp://host:8786``) for ``executor="dask"``; without it a
        LocalCluster of ``workers`` (default: one per core) single-threaded worker processes.
    group_offset: index of the first group (seeds follow it); set by the Dask executor for shards.
    overrides: ``temperature_K``, ``friction_per_ps``, ``timestep_fs``, ``forcefield``.

    Returns the :class:`~molflow.trajectory.Trajectory` written.
    """
    if callable(executor) or executor != "local":
        run = executor if callable(executor) else EXECUTORS.get(executor)
        if run is None:
            raise InputError(f"executor must be one of {['local', *sorted(EXECUTORS)]}, got {executor!r}")
        return run(system, out, replicas=replicas, time_ps=time_ps, frame_fs=frame_fs,
                             n_coefficients=n_coefficients, equilibrate_ps=equilibrate_ps, platform=platform,
                             seed=seed, resume=resume, overwrite=overwrite, copies_per_context=copies_per_context,
                             workers=workers, chunk_frames=chunk_frames, deterministic=deterministic,
                             cutoff_nm=cutoff_nm, progress=progress, scheduler=scheduler, **overrides)
    if scheduler:
        raise InputError("a scheduler address needs executor='dask' (--executor dask)")
    t_start = time.perf_counter()
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    if resume and out.exists() and _executor_of(out) == "dask":
        raise InputError(f"{out} is a sharded Dask run: resume it with --executor dask")
    if resume and copies_per_context is None and out.exists() and complete_frames(out) > 0:
        copies_per_context = int(resume_settings(out)["copies_per_context"])  # keep the file's layout
    mol = system if isinstance(system, MolecularSystem) else load_system(system, **overrides)
    if isinstance(system, MolecularSystem) and overrides:
        raise InputError("pass overrides to load_system, not with a MolecularSystem")
    replicas, n_coefficients = int(replicas), int(n_coefficients)
    steps_per_frame, n_total_frames = check_settings(mol, replicas, time_ps, frame_fs, n_coefficients,
                                                     equilibrate_ps)
    platform_name, cpc = plan_layout(mol, replicas, platform, resolve_platform(platform), copies_per_context,
                                     workers or os.cpu_count() or 1)
    on_gpu = platform_name in GPU_PLATFORMS
    cutoff = float(cutoff_nm or default_cutoff_nm(mol.positions_nm))
    group_sizes = [min(cpc, replicas - s) for s in range(0, replicas, cpc)]

    ckpt_dir = out.with_name(out.name + ".ckpt")
    existing = out.exists()
    if existing and not (resume or overwrite):
        raise InputError(f"{out} exists: pass --resume to continue it or --overwrite to replace it")
    if resume and existing:
        try:
            with Trajectory(out) as old:
                a, n_old = old.attrs, old.n_frames
        except InputError as exc:
            raise InputError(f"cannot resume: {exc}; use --overwrite to start again") from None
        if seed is None and "seed" in a:
            seed = int(a["seed"])  # keep the recorded seed, also when no frame was complete
        if n_old == 0:
            existing = False  # no complete frame: start fresh (same seed)
            if progress:
                print(f"molflow simulate: {out} has no complete frame; starting it again", file=sys.stderr)
    seed = random_seed() if seed is None else int(seed)
    if seed <= 0:
        raise InputError("seed must be a positive integer")

    attrs = run_attrs(mol, frame_fs, n_coefficients, replicas, seed, platform_name, cpc, equilibrate_ps, cutoff,
                      hardware_description(platform_name), time_ps)
    if group_offset:
        attrs["group_offset"] = int(group_offset)
    if progress:
        print(f"molflow simulate: system={mol.name} replicas={replicas} seed={seed} platform={platform_name} "
              f"copies_per_context={cpc}", file=sys.stderr)

    if resume and existing:
        with Trajectory(out) as old:
            a = old.attrs
            diffs = [f"{k}: file has {a.get(k)!r}, asked {attrs[k]!r}" for k in RESUME_KEYS
                     if settings_differ(a.get(k), attrs[k])]
            if int(a.get("group_offset", 0)) != int(group_offset):
                diffs.append(f"group_offset: file has {a.get('group_offset', 0)}, asked {group_offset}")
            if diffs:
                raise InputError(f"cannot resume {out}: settings differ ({'; '.join(diffs)})")
            n_done = old.n_frames
            last_x = np.asarray(old.positions[:, n_done - 1], dtype=np.float64)
            last_v = np.asarray(old.velocities[:, n_done - 1], dtype=np.float64)
            wall_before = float(a.get("wall_clock_s", 0.0))
            restarts = int(a.get("n_restarts", 0))
        writer = TrajectoryWriter.open_append(out)
        starts, used_state = [], False
        for g, (s, size) in enumerate(zip(_starts(group_sizes), group_sizes)):
            ck = ckpt_dir / f"group{g:05d}_frame{n_done - 1}.chk"
            # an OpenMM checkpoint holds the integrator's variables: reuse it only with the same platform
            # and the same integrator program (older files recorded on-step velocities in it)
            if ck.exists() and a.get("platform") == platform_name and a.get("integrator") == attrs["integrator"]:
                starts.append(GroupStart("checkpoint", checkpoint=ck.read_bytes(), positions_nm=last_x[s:s + size],
                                         velocities=last_v[s:s + size], restart=restarts + 1))
            else:
                used_state = True
                starts.append(GroupStart("state", positions_nm=last_x[s:s + size], velocities=last_v[s:s + size],
                                         restart=restarts + 1))
        if used_state:
            restarts += 1
            writer.set_attrs(n_restarts=restarts)
        if progress:
            how = "its last frame's state (no usable checkpoint)" if used_state else "the OpenMM checkpoint"
            print(f"molflow simulate: resuming {out} at frame {n_done} from {how}", file=sys.stderr)
        writer.set_attrs(time_ps_requested=max(float(time_ps), float(a.get("time_ps_requested", 0))),
                         platform=platform_name, hardware=attrs["hardware"], integrator=attrs["integrator"],
                         noise=attrs["noise"])
        start_positions = mol.positions_nm
    else:
        if existing:
            out.unlink()
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if overwrite:
            shutil.rmtree(out.with_name(out.name + ".shards"), ignore_errors=True)  # a replaced Dask run's shards
        n_done, wall_before, restarts = 0, 0.0, 0
        start_positions = minimise(mol)
        attrs["n_restarts"] = 0
        writer = TrajectoryWriter.create(out, replicas, mol.n_atoms, n_coefficients, attrs,
                                         chunk_frames=min(chunk_frames or 16, 64))
        starts = [GroupStart("fresh") for _ in group_sizes]
    ckpt_dir.mkdir(exist_ok=True)

    spec = RunSpec(pdb_text=mol.pdb_text, forcefield=tuple(mol.forcefield_files), name=mol.name,
                   temperature_K=mol.temperature_K, friction_per_ps=mol.friction_per_ps,
                   timestep_fs=mol.timestep_fs, steps_per_frame=steps_per_frame, n_coefficients=n_coefficients,
                   platform=platform_name, threads=1, deterministic=deterministic, cutoff_nm=cutoff, seed=seed,
                   equilibration_steps=int(round(equilibrate_ps * 1000.0 / mol.timestep_fs)),
                   start_positions_nm=start_positions, group_offset=int(group_offset))
    remaining = max(n_total_frames - max(n_done, 1), 0)
    if chunk_frames is None:  # ~2 s of compute per chunk (80 us per copy-step on one CPU core)
        per_frame_s = 8e-5 * steps_per_frame * cpc * (0.05 if on_gpu else 1.0)
        chunk_frames = int(np.clip(2.0 / max(per_frame_s, 1e-9), 1, 100))
    chunks = [min(chunk_frames, remaining - s) for s in range(0, remaining, chunk_frames)]
    if resume and n_done and not chunks:
        writer.close()
        if progress:
            print(f"molflow simulate: nothing to do, {out} already holds {n_done} frames "
                  f"({(n_done - 1) * frame_fs / 1000:g} ps)", file=sys.stderr)
        return Trajectory(out)
    if resume and n_done:  # where each session took over: shows a killed run was continued, not redone
        writer.set_attrs(resumed_at_frames=list(a.get("resumed_at_frames", [])) + [int(n_done)])
    dt_frame_ps = frame_fs / 1000.0

    n_workers = 1 if on_gpu else max(1, min(workers or (os.cpu_count() or 1), len(group_sizes)))
    assignment = [[(g, size, starts[g]) for g, size in enumerate(group_sizes) if g % n_workers == w]
                  for w in range(n_workers)]
    try:
        results = _run_workers(spec, assignment, chunks, n_workers)
        _consume(results, writer, out, ckpt_dir, group_sizes, replicas, n_done, dt_frame_ps, chunks,
                 wall_before, t_start, progress, mol.name, steps_per_frame * mol.timestep_fs / 1e6)
    finally:
        writer.close()
    _prune_checkpoints(ckpt_dir, keep=None)
    return Trajectory(out)


def check_settings(mol: MolecularSystem, replicas: int, time_ps: float, frame_fs: float, n_coefficients: int,
                   equilibrate_ps: float) -> tuple[int, int]:
    """Validate run settings; returns (steps per frame, total frames)."""
    if replicas < 1:
        raise InputError("replicas must be >= 1")
    if not 0 <= n_coefficients <= 8:
        raise InputError("coefficients must be between 0 and 8")
    if time_ps < 0 or equilibrate_ps < 0:
        raise InputError("time and equilibration must be >= 0 ps")
    if not frame_fs > 0:
        raise InputError(f"the frame interval must be positive, got {frame_fs:g} fs")
    steps_per_frame = _ratio(frame_fs, mol.timestep_fs, "frame interval", "timestep")
    if n_coefficients > steps_per_frame:
        warnings.warn(f"{n_coefficients} coefficients over {steps_per_frame} steps per frame: a path of "
                      f"{steps_per_frame} steps has only {steps_per_frame} independent coefficients; the "
                      "rest are zero or dependent (record more steps per frame)", stacklevel=3)
    return steps_per_frame, _ratio(time_ps * 1000.0, frame_fs, "run time", "frame interval") + 1


def plan_layout(mol: MolecularSystem, replicas: int, platform: str, platform_name: str,
                copies_per_context: int | None, n_cores: int) -> tuple[str, int]:
    """(platform, copies per context) for ``replicas`` on ``n_cores`` CPU cores (or a GPU).

    ``platform`` is what was asked (``auto`` ...), ``platform_name`` what it resolved to.
    """
    if platform == "auto" and platform_name == "CPU" and mol.n_atoms <= REFERENCE_MAX_ATOMS \
            and copies_per_context in (None, 1):
        platform_name = "Reference"  # measured faster for small molecules: see REFERENCE_MAX_ATOMS
    if copies_per_context:
        cpc = int(copies_per_context)
    elif platform_name in GPU_PLATFORMS:
        cpc = min(replicas, 1024)
    elif platform_name == "Reference":
        cpc = 1  # Reference evaluates a multi-copy cutoff system slowly; one copy per Context
    else:  # spread replicas over the cores first, then fill groups up to 8 copies
        cpc = int(min(8, -(-replicas // min(replicas, max(1, n_cores)))))
    return platform_name, cpc


def run_attrs(mol: MolecularSystem, frame_fs: float, n_coefficients: int, replicas: int, seed: int,
              platform_name: str, cpc: int, equilibrate_ps: float, cutoff: float, hardware: str,
              time_ps: float) -> dict[str, Any]:
    """The settings attributes of a run file (DESIGN.md section 5), plus the integrator program and
    ``noise``: "host" where numpy draws the per-step Gaussians (CPU, Reference), "openmm" on a GPU."""
    return {
        "molflow_version": __version__, "system": mol.name, "fingerprint": mol.fingerprint,
        "pdb": mol.pdb_text, "forcefield": list(mol.forcefield_files),
        "temperature_K": mol.temperature_K, "friction_per_ps": mol.friction_per_ps,
        "timestep_fs": mol.timestep_fs, "frame_interval_fs": float(frame_fs),
        "n_coefficients": n_coefficients, "n_replicas": replicas, "seed": seed,
        "platform": platform_name, "copies_per_context": cpc, "equilibration_ps": float(equilibrate_ps),
        "cutoff_nm": cutoff, "hardware": hardware, "integrator": integrator_id(host_noise_for(platform_name)),
        "noise": "host" if host_noise_for(platform_name) else "openmm",
        "time_ps_requested": float(time_ps), "kind": "reference_md",
    }


def _run_workers(spec, assignment, chunks, n_workers):
    """Yield worker items; in-process for one worker, else spawned processes feeding a queue."""
    if n_workers == 1:
        yield from _drive_groups(spec, assignment[0], chunks)
        return
    # fork where available: spawn would re-import the caller's __main__ (a script without an
    # `if __name__ == "__main__"` guard would run again in every worker). The engine holds no OpenMM
    # Context and no threads of its own here, but a long-lived caller may (a FlowMap's force evaluator,
    # unreachable finish contexts): a forked worker whose garbage collector destroyed such an inherited
    # Context crashed (seen once in CI). So collect the parent's garbage first and freeze what is left
    # (gc.freeze: the children never collect the inherited objects), unfreezing once they have started.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    q = ctx.Queue(maxsize=4 * sum(len(a) for a in assignment))
    procs = [ctx.Process(target=_worker_main, args=(spec, a, chunks, q, os.getpid()), daemon=True)
             for a in assignment]
    gc.collect()
    gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()
    try:
        while True:
            try:
                yield q.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    try:
                        while True:
                            yield q.get(timeout=0.5)
                    except queue.Empty:
                        return
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)


def _consume(results, writer, out, ckpt_dir, group_sizes, replicas, n_done, dt_frame_ps, chunks,
             wall_before, t_start, progress, name, frame_ns_per_copy):
    """Gather each chunk from every group, write it for all replicas, checkpoint, flush."""
    from tqdm.auto import tqdm

    n_groups = len(group_sizes)
    offsets = _starts(group_sizes)
    pending: dict[int, dict[int, tuple]] = {}
    order = ([-1] if n_done == 0 else []) + list(range(len(chunks)))
    total_frames = (1 if n_done == 0 else 0) + sum(chunks)
    bar = tqdm(total=total_frames, unit="frame", disable=not progress, desc=f"simulate {name}",
               dynamic_ncols=True, file=sys.stderr)
    t_steady, f_steady = None, n_done
    next_frame = n_done
    error: str | None = None
    for want in order:
        while len(pending.get(want, {})) < n_groups and error is None:
            try:
                g, chunk, frames, ck, err = next(results)
            except StopIteration:
                error = error or "a worker stopped before finishing (killed or crashed)"
                break
            if chunk == -2:
                error = err
                break
            pending.setdefault(chunk, {})[g] = (frames, ck, err)
            if err is not None:
                error = err
        got = pending.pop(want, {})
        n_good = min([len(got[g][0]) if g in got else 0 for g in range(n_groups)])
        if n_good:
            complete = n_good == (1 if want == -1 else chunks[want]) and all(got[g][1] for g in range(n_groups))
            last = next_frame + n_good - 1
            if complete:  # checkpoints first: when the frames become visible, their checkpoint exists
                for g in range(n_groups):
                    _atomic_write(ckpt_dir / f"group{g:05d}_frame{last}.chk", got[g][1])
            writer.set_attrs(wall_clock_s=wall_before + time.perf_counter() - t_start)
            _write_chunk(writer, got, offsets, group_sizes, n_good, next_frame, dt_frame_ps)
            if complete:
                _prune_checkpoints(ckpt_dir, keep=last)
            next_frame += n_good
            bar.update(n_good)
            now = time.perf_counter()
            if t_steady is None:  # steady state starts once the first chunk is written
                t_steady, f_steady = now, next_frame
            elif next_frame > f_steady:
                sim_ns = (next_frame - f_steady) * frame_ns_per_copy * replicas
                rate = sim_ns / max(now - t_steady, 1e-9) * 86400
                writer.set_attrs(throughput_ns_per_day=rate)
                bar.set_postfix_str(f"{rate:.1f} ns/day aggregate")
        if error is not None:
            bar.close()
            raise SimulationError(f"{error}; kept {next_frame} good frames in {out}")
    bar.close()


def _write_chunk(writer, got, offsets, group_sizes, n_good, first_frame, dt_frame_ps):
    names = ["positions", "velocities", "forces", "potential_energy"]
    data = {k: np.concatenate([np.stack([fr[k] for fr in got[g][0][:n_good]], 1)
                               for g in range(len(group_sizes))]) for k in names}
    frames_with_b = [fr for fr in got[0][0][:n_good] if "brownian" in fr]
    if frames_with_b:
        brownian = np.concatenate([np.stack([fr["brownian"] for fr in got[g][0][:n_good]], 1)
                                   for g in range(len(group_sizes))])
    else:
        n_atoms = data["positions"].shape[2]
        brownian = np.zeros((data["positions"].shape[0], 0, writer._file["brownian"].shape[2], n_atoms, 3))
    t = (first_frame + np.arange(n_good)) * dt_frame_ps
    writer.append(t, data["positions"].astype(np.float32), data["velocities"].astype(np.float32),
                  brownian.astype(np.float32), forces=data["forces"].astype(np.float32),
                  potential_energy=data["potential_energy"])


# ----------------------------------------------------------------------------- helpers


def minimise(mol: MolecularSystem, platform: str = "Reference") -> np.ndarray:
    """Energy-minimised single-molecule positions (nm), deterministic (Reference platform)."""
    import openmm

    ctx = openmm.Context(mol.create_system("nocutoff"), openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(mol.positions_nm)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1.0, 2000)
    x = np.array(ctx.getState(getPositions=True).getPositions(asNumpy=True)._value)
    e = ctx.getState(getEnergy=True).getPotentialEnergy()._value
    if not np.isfinite(e):
        raise InputError(f"{mol.name}: minimisation failed (energy {e}); check the structure")
    return x


def available_platforms() -> list[str]:
    import openmm

    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def resolve_platform(platform: str) -> str:
    """``auto`` -> CUDA when OpenMM can use it, else CPU; explicit names are checked."""
    names = available_platforms()
    if platform == "auto":
        failures = []
        for gpu in ("CUDA", "HIP"):
            if gpu in names:
                error = platform_error(gpu)
                if error is None:
                    return gpu
                failures.append(f"{gpu}: {error}")
        if failures or _nvidia_present():
            why = f" ({'; '.join(failures)})" if failures else " (no CUDA platform in this OpenMM)"
            print(f"molflow: a GPU is present but OpenMM cannot use it{why}; install molflow[cuda], i.e. "
                  "openmm-cuda-13, or check the driver; running on the CPU platform", file=sys.stderr)
        return "CPU" if "CPU" in names else "Reference"
    if platform not in names:
        raise InputError(f"OpenMM platform {platform!r} is not available here (available: {names})")
    return platform


def hardware_description(platform: str) -> str:
    if platform in GPU_PLATFORMS:
        import subprocess

        try:
            name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
            return f"{name} (OpenMM {platform} platform)"
        except (OSError, subprocess.SubprocessError, IndexError):
            return platform
    return f"{cpu_description()} (OpenMM {platform} platform)"


def cpu_description() -> str:
    """CPU model and core count, e.g. 'AMD EPYC, 2 cores'."""
    cpu = _platform.processor() or _platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def platform_error(name: str) -> str | None:
    """None if OpenMM can make a Context on platform ``name``, else OpenMM's error, as text."""
    import openmm

    try:
        sys_ = openmm.System()
        sys_.addParticle(1.0)
        openmm.Context(sys_, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(name))
    except Exception as exc:  # noqa: BLE001 - OpenMM raises plain Exceptions; the text is what matters
        return f"{type(exc).__name__}: {str(exc).strip() or 'no message'}"
    return None


def _nvidia_present() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def platform_object(name: str):
    """The OpenMM ``Platform`` called ``name``."""
    import openmm

    return openmm.Platform.getPlatformByName(name)


def platform_properties(name: str, threads: int, deterministic: bool) -> dict[str, str]:
    """Context properties molflow uses on ``name``: one thread per CPU context, mixed precision on GPUs."""
    if name == "CPU":
        return {"Threads": str(threads)}
    if name == "CUDA":
        props = {"Precision": "mixed"}
        if deterministic:
            props["DeterministicForces"] = "true"
        return props
    if name == "OpenCL":
        return {"Precision": "mixed"}
    return {}


def _ratio(a: float, b: float, what_a: str, what_b: str) -> int:
    r = a / b
    if abs(r - round(r)) > 1e-6 or round(r) < (0 if "time" in what_a else 1):
        raise InputError(f"the {what_a} ({a:g} fs) must be a whole multiple of the {what_b} ({b:g} fs)")
    return int(round(r))


def _starts(sizes: list[int]) -> list[int]:
    return list(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int))


def settings_differ(a, b) -> bool:
    """Whether two recorded settings differ (floats to 1e-9)."""
    if isinstance(b, float) or isinstance(a, float):
        try:
            return abs(float(a) - float(b)) > 1e-9
        except (TypeError, ValueError):
            return True
    return a != b


def complete_frames(path: str | os.PathLike) -> int:
    """Complete frames of a run file (0 if it cannot be read as one)."""
    try:
        with Trajectory(path) as t:
            return t.n_frames
    except InputError:
        return 0


def _executor_of(path: Path) -> str | None:
    try:
        with Trajectory(path) as t:
            return t.attrs.get("executor")
    except InputError:
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _prune_checkpoints(ckpt_dir: Path, keep: int | None) -> None:
    """Delete checkpoints of frames other than ``keep`` (all but the newest frame if None)."""
    if not ckpt_dir.is_dir():
        return
    files = list(ckpt_dir.glob("group*_frame*.chk"))
    frames = {int(f.stem.split("_frame")[1]) for f in files}
    if keep is None and frames:
        keep = max(frames)
    for f in files:
        if int(f.stem.split("_frame")[1]) != keep:
            f.unlink(missing_ok=True)


def resume_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The run settings recorded in ``path``, as :func:`simulate` keyword values (for ``--resume``)."""
    with Trajectory(path) as t:
        a = t.attrs
    return {"replicas": int(a["n_replicas"]), "frame_fs": float(a["frame_interval_fs"]),
            "n_coefficients": int(a["n_coefficients"]), "time_ps": float(a["time_ps_requested"]),
            "equilibrate_ps": float(a["equilibration_ps"]), "seed": int(a["seed"]),
            "copies_per_context": int(a["copies_per_context"])}


# old private names, kept while other modules move to the public ones (noise_floor.py, cli.py)
_platform_obj, _platform_props, _complete_frames = platform_object, platform_properties, complete_frames
