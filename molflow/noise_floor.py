"""The irreducible error of a flow map fed N path coefficients (DESIGN.md section 3.1).

A flow map sees the start state z_0 = (x, v) and the N Legendre coefficients L^(0..N-1) of the
Brownian path on [0, τ]. Whatever the rest of the path does is invisible to it, so even a perfect
map cannot beat the spread of z_τ given (z_0, L). This module measures that floor directly:
pairs of BAOAB trajectories of the system (its own timestep, friction and temperature) that start
from the same equilibrated state, share the N coefficients of [0, τ] and are otherwise independent
(the partner's per-step noise is ξ' = :func:`molflow.brownian.conditional_noise` (ξ, N, dt): exact
Gaussian conditioning of the iid steps on the shared coefficients). N = 0 shares only the start.

Protocol: ``starts`` independent equilibrated states (replicas of :func:`molflow.simulate`, each
minimised, given Maxwell-Boltzmann velocities and equilibrated for ``equilibrate_ps``; frame 0 of
each replica). For every τ and start one reference noise ξ (K = τ/dt steps, A atoms, 3) is drawn
and integrated once; for every N a partner ξ' is drawn and integrated; the pair is compared at τ.

Integration: the BAOAB update of the engine (B A O A B, a = exp(-γ dt), b = sqrt(1 - a²),
v <- a v + b sqrt(kT/m) ξ) is done in float64 numpy for all trajectories of a τ at once, with
forces from OpenMM: one ``setPositions`` + ``getState(getForces=True)`` per step and Context. On
CPU the trajectories sit as non-interacting copies in multi-copy Contexts of
``CPU_COPIES_PER_CONTEXT`` copies (CPU platform, one thread; each copy gets exactly the
single-molecule forces, :mod:`molflow.md.multicopy`); on a GPU all in one Context; on Reference one
single-molecule Context per trajectory. Measured on 2 shared CPU cores (AMD EPYC), alanine
dipeptide, per copy-step including the Python round trip (medians of repeated runs on a busy
machine, +-20%): numpy BAOAB + CPU multi-copy Contexts of 8 copies 111 µs (4: ~100, 16: ~100,
32: 120-170, one Context of 128: 455 -- the cutoff GB force scales badly); a CustomIntegrator on
the same 8-copy Contexts with the per-step noise written into a per-DOF variable before every
``step(1)`` 105 µs -- the same within the noise (both are bound by the force evaluation, ~80 µs
per copy-step), so the simpler numpy update (float64 state, nothing to read back) is used;
Reference single-molecule Contexts 120-175 µs. CPU-platform forces are single precision: two
copies of the same configuration at different sites differ by ~4e-4 kJ/mol/nm rms (3e-3 max),
which moves a 20-step trajectory by ~1e-9 nm, far below every floor in the table.

Metrics at τ, per pair, then root-mean-square over the starts (with the delta-method standard error
SE(rms) = SE(mean of squares) / (2 rms) beside each):

- ``heavy_rmsd_raw_nm``: RMS over heavy atoms of |x' - x|;
- ``heavy_rmsd_aligned_nm``: the same after optimal superposition of the heavy atoms (centroids
  matched, then the best proper rotation by Kabsch; no reflection);
- ``dv_over_vthermal``: sqrt(mean over atoms and axes of (v' - v)² m / kT); two independent
  Maxwell-Boltzmann velocities give √2;
- ``dphi_deg``, ``dpsi_deg``: the wrapped difference of the central residue's φ and ψ (degrees).

    >>> from molflow import floor
    >>> table = floor("alanine_dipeptide", tau_ps=[0.02, 0.1], n_coefficients=[0, 3, 8], starts=32,
    ...               seed=1, out="floor.json")
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .brownian import conditional_noise
from .errors import InputError, SimulationError
from .seeding import derive_seed, random_seed
from .systems import MolecularSystem, load_system

#: copies per multi-copy Context on the CPU platform (measured fastest above; DESIGN.md section 4).
CPU_COPIES_PER_CONTEXT = 8
#: noise arrays of one batch (reference + partners, float64) are kept under this many bytes; the
#: N values of a τ are split into several batches (sharing the reference end state) beyond it.
MAX_BATCH_NOISE_BYTES = 512 * 2**20
#: steps between checks of the copies' cutoff margin and drift (molflow.md.multicopy).
GUARD_EVERY = 100
METRICS = ("heavy_rmsd_raw_nm", "heavy_rmsd_aligned_nm", "dv_over_vthermal", "dphi_deg", "dpsi_deg")
_SEED_START, _SEED_REF, _SEED_PARTNER = 1, 2, 3  # keys of the derived seeds


# ----------------------------------------------------------------------------- public entry point


def floor(system: str | os.PathLike | MolecularSystem, tau_ps: Sequence[float] | float,
          n_coefficients: Sequence[int] | int, starts: int = 32, seed: int | None = None,
          equilibrate_ps: float = 10.0, platform: str = "auto", out: str | os.PathLike | None = None,
          progress: bool = True, *, copies_per_context: int | None = None,
          cutoff_nm: float | None = None) -> dict[str, Any]:
    """Measure the irreducible error of a flow map fed N path coefficients (DESIGN.md 3.1).

    Parameters
    ----------
    system: a built-in name, a PDB path, or a :class:`~molflow.systems.MolecularSystem`.
    tau_ps: jump lengths τ (ps), each a positive whole multiple of the system's timestep.
    n_coefficients: numbers N of shared Legendre coefficients, each in 0..8 (0: only the start).
    starts: independent equilibrated start states (>= 2); one pair per start, τ and N.
    seed: master seed; random (printed and recorded) if None. Starts, reference noise and partner
        noise come from seeds derived from it (:func:`molflow.seeding.derive_seed`), the noise of
        (τ, N) depending only on (seed, τ/dt, N), not on the other τ and N asked for.
    equilibrate_ps: equilibration of each start after minimisation (ps).
    platform: OpenMM platform: ``auto`` (CUDA/HIP when OpenMM can use it, else CPU), ``CPU``,
        ``Reference``, ``CUDA``, ``OpenCL``. The starts are equilibrated by :func:`molflow.simulate`
        with the same choice (its ``auto`` picks Reference for small molecules on CPU hosts).
    out: JSON file to write (optional; its folder must exist).
    progress: progress bar and a header line on stderr.
    copies_per_context: trajectories per OpenMM Context (default: 8 on CPU, all on a GPU, 1 on
        Reference).
    cutoff_nm: multi-copy nonbonded cutoff (default: from the molecule's size, >= 1.5 nm).

    Returns
    -------
    ``{"system": name, "settings": {...}, "rows": [{"tau_ps", "n_coefficients", "n_starts",
    <metric>, <metric>_se, ...}]}`` with one row per (τ, N) in the order given (τ outer); the
    metrics are listed in the module docstring. The same dict is written to ``out`` as JSON.

    Raises
    ------
    InputError: bad τ, N, starts, seed, equilibration, platform, system or output folder.
    SimulationError: a trajectory blew up.
    """
    t_start = time.perf_counter()
    mol = system if isinstance(system, MolecularSystem) else load_system(system)
    dt_ps = mol.timestep_fs / 1000.0
    taus, steps = _check_taus(tau_ps, mol.timestep_fs)
    ns = _check_ns(n_coefficients)
    starts = _check_int(starts, "starts", minimum=2)
    if not (np.isfinite(equilibrate_ps) and equilibrate_ps >= 0):
        raise InputError(f"equilibrate_ps must be >= 0, got {equilibrate_ps!r}")
    if copies_per_context is not None:
        copies_per_context = _check_int(copies_per_context, "copies_per_context", minimum=1)
    if seed is not None:
        seed = _check_int(seed, "seed", minimum=1)
    out_path = Path(out) if out is not None else None
    if out_path is not None and not out_path.parent.is_dir():
        raise InputError(f"output folder {out_path.parent} does not exist")
    if out_path is not None and out_path.is_dir():
        raise InputError(f"output {out_path} is a folder; give a JSON file name")

    from .md.engine import GPU_PLATFORMS, hardware_description, resolve_platform
    from .md.multicopy import default_cutoff_nm

    pair_platform = resolve_platform(platform)
    if pair_platform == "Reference":
        cpc = 1
    elif copies_per_context is not None:
        cpc = copies_per_context
    elif pair_platform in GPU_PLATFORMS:
        cpc = starts * (1 + len(ns))
    else:
        cpc = CPU_COPIES_PER_CONTEXT
    cutoff = float(cutoff_nm or default_cutoff_nm(mol.positions_nm))
    seed_was_random = seed is None
    seed = random_seed() if seed is None else seed
    if progress or seed_was_random:
        print(f"molflow floor: system={mol.name} seed={seed} starts={starts} "
              f"tau_ps={','.join(f'{t:g}' for t in taus)} coefficients={','.join(map(str, ns))} "
              f"platform={pair_platform} copies_per_context={cpc}", file=sys.stderr)

    # --- start states
    t_eq = time.perf_counter()
    x0, v0, eq_platform = _equilibrated_starts(mol, starts, equilibrate_ps, platform,
                                               derive_seed(seed, _SEED_START), progress)
    eq_wall = time.perf_counter() - t_eq

    # --- pairs
    heavy = mol.heavy_atoms
    try:
        quads = mol.central_dihedrals()
    except InputError:
        quads = None  # no backbone phi/psi (e.g. a single zwitterionic residue): dihedrals null
    forces = _ForcePool(mol, pair_platform, cpc, cutoff)
    batches = [(i, k, group) for i, k in enumerate(steps) for group in _batches(k, starts, mol.n_atoms, ns)]
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    t_pairs, copy_steps = time.perf_counter(), 0
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(k for _, k, _ in batches), unit="step", disable=not progress,
               desc=f"floor {mol.name}", dynamic_ncols=True, file=sys.stderr)
    ref_end: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    try:
        for i_tau, k, group in batches:
            bar.set_postfix_str(f"tau={taus[i_tau]:g} ps N={','.join(map(str, group))}")
            xi = np.random.default_rng(derive_seed(seed, _SEED_REF, k)).standard_normal((k, starts, mol.n_atoms, 3))
            noises = [] if i_tau in ref_end else [xi]
            for n in group:
                rng = np.random.default_rng(derive_seed(seed, _SEED_PARTNER, k, n))
                noises.append(conditional_noise(xi, n, dt_ps, rng))
            del xi
            x_end, v_end = _integrate(mol, forces, x0, v0, noises, dt_ps, bar)
            copy_steps += k * starts * len(noises)
            del noises
            if i_tau not in ref_end:
                ref_end[i_tau] = (x_end[0], v_end[0])
                x_end, v_end = x_end[1:], v_end[1:]
            x_ref, v_ref = ref_end[i_tau]
            for j, n in enumerate(group):
                rows[(i_tau, n)] = _row(taus[i_tau], n, _pair_metrics(x_ref, v_ref, x_end[j], v_end[j],
                                                                   mol, heavy, quads))
    finally:
        bar.close()
    pairs_wall = time.perf_counter() - t_pairs

    settings = {
        "seed": seed, "starts": starts, "tau_ps": taus, "n_coefficients": ns,
        "equilibrate_ps": float(equilibrate_ps),
        "timestep_fs": float(mol.timestep_fs), "friction_per_ps": float(mol.friction_per_ps),
        "temperature_K": float(mol.temperature_K), "forcefield": list(mol.forcefield_files),
        "fingerprint": mol.fingerprint, "n_atoms": mol.n_atoms, "n_heavy_atoms": int(len(heavy)),
        "dihedrals": None if quads is None else {"phi": quads[0].tolist(), "psi": quads[1].tolist()},
        "platform": pair_platform, "equilibration_platform": eq_platform, "copies_per_context": cpc,
        "cutoff_nm": cutoff, "hardware": hardware_description(pair_platform),
        "method": "pairs of float64 numpy BAOAB trajectories with OpenMM forces from the same start, "
                  "partner noise = conditional_noise(reference noise, N, dt)",
        "molflow_version": __version__, "copy_steps": int(copy_steps),
        "us_per_copy_step": float(pairs_wall / max(copy_steps, 1) * 1e6),
        "equilibration_wall_s": float(eq_wall), "pairs_wall_s": float(pairs_wall),
        "wall_clock_s": float(time.perf_counter() - t_start),
    }
    result = {"system": mol.name, "settings": settings,
              "rows": [rows[(i, n)] for i in range(len(taus)) for n in ns]}
    if out_path is not None:
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out_path)
    return result


# ----------------------------------------------------------------------------- input checks


def _check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    try:
        ok = float(value) == int(value)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        rng = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise InputError(f"{name} must be {rng}, got {v}")
    return v


def _as_list(values: Any, name: str) -> list:
    if isinstance(values, (str, bytes)):
        raise InputError(f"{name} must be a number or a sequence of numbers, got {values!r}")
    out = list(values) if np.ndim(values) > 0 else [values]
    if not out:
        raise InputError(f"{name}: give at least one value")
    return out


def _check_taus(tau_ps: Any, timestep_fs: float) -> tuple[list[float], list[int]]:
    taus, steps = [], []
    for t in _as_list(tau_ps, "tau_ps"):
        try:
            t = float(t)
        except (TypeError, ValueError):
            raise InputError(f"tau_ps must be numbers, got {t!r}") from None
        if not (np.isfinite(t) and t > 0):
            raise InputError(f"tau_ps must be positive, got {t:g} ps")
        r = t * 1000.0 / timestep_fs
        k = int(round(r))
        if k < 1 or abs(r - k) > 1e-6 * max(1.0, r):
            raise InputError(f"tau_ps {t:g} ps is not a whole multiple of the timestep "
                             f"({timestep_fs:g} fs)")
        if k not in steps:  # a repeated tau adds nothing
            taus.append(t)
            steps.append(k)
    return taus, steps


def _check_ns(n_coefficients: Any) -> list[int]:
    ns: list[int] = []
    for n in _as_list(n_coefficients, "n_coefficients"):
        n = _check_int(n, "n_coefficients", minimum=0, maximum=8)
        if n not in ns:
            ns.append(n)
    return ns


# ----------------------------------------------------------------------------- start states


def _equilibrated_starts(mol: MolecularSystem, starts: int, equilibrate_ps: float, platform: str,
                         seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(S, A, 3) positions and velocities of ``starts`` independently equilibrated replicas."""
    from .md.engine import simulate
    from .trajectory import Trajectory

    spf = max(1, int(round(100.0 / mol.timestep_fs)))  # ~100 fs "frames" for the margin guard
    eq_steps = int(round(equilibrate_ps * 1000.0 / mol.timestep_fs))
    # worker processes cost a few seconds to spawn: only worth it for long equilibrations
    # (~100 us per copy-step on one core)
    workers = None if starts * eq_steps * 1e-4 > 30.0 else 1
    with tempfile.TemporaryDirectory(prefix="molflow-floor-") as tmp:
        path = Path(tmp) / "starts.h5"
        traj = simulate(mol, path, replicas=starts, time_ps=0.0, frame_fs=spf * mol.timestep_fs,
                        n_coefficients=0, equilibrate_ps=equilibrate_ps, platform=platform, seed=seed,
                        workers=workers, progress=progress, cutoff_nm=None)
        try:
            x = np.asarray(traj.positions[:, 0], dtype=np.float64)
            v = np.asarray(traj.velocities[:, 0], dtype=np.float64)
            used = str(traj.attrs.get("platform", platform))
        finally:
            traj.close()
    return x, v, used


# ----------------------------------------------------------------------------- integration


def _batches(k: int, starts: int, n_atoms: int, ns: list[int]) -> list[list[int]]:
    """Split the N values of one τ so that a batch's noise arrays stay under the memory budget."""
    per_array = k * starts * n_atoms * 3 * 8
    per_batch = max(1, int(MAX_BATCH_NOISE_BYTES // per_array) - 1)  # minus the reference
    return [ns[i:i + per_batch] for i in range(0, len(ns), per_batch)]


class _ForcePool:
    """OpenMM forces of many independent copies of one molecule, in file frames (nm, kJ/mol/nm).

    Contexts of ``copies_per_context`` copies each (:func:`molflow.md.multicopy.multicopy_system`;
    one copy is the exact NoCutoff single-molecule system), built once per batch size and reused.
    """

    def __init__(self, mol: MolecularSystem, platform: str, copies_per_context: int, cutoff_nm: float):
        self.mol, self.platform, self.cpc, self.cutoff = mol, platform, copies_per_context, cutoff_nm
        self._built: dict[int, list[tuple[slice, Any, Any]]] = {}

    def groups(self, n: int):
        if n not in self._built:
            import openmm

            from .md.engine import platform_object, platform_properties
            from .md.multicopy import make_layout, multicopy_system

            groups = []
            for s in range(0, n, self.cpc):
                c = min(self.cpc, n - s)
                ctx = openmm.Context(multicopy_system(self.mol, c, self.cutoff),
                                     openmm.VerletIntegrator(self.mol.timestep_fs / 1000.0),
                                     platform_object(self.platform), platform_properties(self.platform, 1, False))
                groups.append((slice(s, s + c), ctx, make_layout(c, self.mol.positions_nm, self.cutoff)))
            self._built[n] = groups
        return self._built[n]

    def place(self, x: np.ndarray) -> None:
        """Put each copy's centroid at its site (whole-nm offsets: exact, forces unchanged)."""
        for sl, _, layout in self.groups(len(x)):
            layout.offsets_nm = np.round(x[sl].mean(1)) - layout.sites_nm

    def guard(self, x: np.ndarray) -> None:
        """Recentre drifting copies; SimulationError if a copy blew up or outgrew the cutoff."""
        for sl, _, layout in self.groups(len(x)):
            layout.check_and_recentre(layout.to_context_frame(x[sl]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        f = np.empty_like(x)
        for sl, ctx, layout in self.groups(len(x)):
            ctx.setPositions(layout.to_context_frame(x[sl]))
            f[sl] = np.asarray(ctx.getState(getForces=True).getForces(asNumpy=True)._value).reshape(f[sl].shape)
        return f


def _integrate(mol: MolecularSystem, forces: _ForcePool, x0: np.ndarray, v0: np.ndarray,
               noises: list[np.ndarray], dt_ps: float, bar) -> tuple[np.ndarray, np.ndarray]:
    """BAOAB from (x0, v0) (S, A, 3) with each of the (K, S, A, 3) noises; ends (J, S, A, 3)."""
    j, k = len(noises), noises[0].shape[0]
    s, a_atoms = x0.shape[:2]
    m = mol.masses_amu[:, None]
    kT = mol.kT_kj_mol
    a = float(np.exp(-mol.friction_per_ps * dt_ps))
    b = float(np.sqrt(-np.expm1(-2.0 * mol.friction_per_ps * dt_ps)))
    half_dt_over_m = 0.5 * dt_ps / m
    sigma = b * np.sqrt(kT / m)
    x = np.tile(x0, (j, 1, 1)).astype(np.float64)  # trajectory index = noise index * S + start
    v = np.tile(v0, (j, 1, 1)).astype(np.float64)
    forces.place(x)
    f = forces(x)
    xi = np.empty_like(x)
    for step in range(k):
        for i, noise in enumerate(noises):
            xi[i * s:(i + 1) * s] = noise[step]
        v += half_dt_over_m * f
        x += 0.5 * dt_ps * v
        v *= a
        v += sigma * xi
        x += 0.5 * dt_ps * v
        f = forces(x)
        v += half_dt_over_m * f
        if (step + 1) % GUARD_EVERY == 0 or step + 1 == k:
            if not (np.all(np.isfinite(v)) and np.all(np.isfinite(f))):
                raise SimulationError("non-finite velocities or forces in a floor trajectory (it blew up)")
            forces.guard(x)
            bar.update(GUARD_EVERY if (step + 1) % GUARD_EVERY == 0 else (step + 1) % GUARD_EVERY)
    return x.reshape(j, s, a_atoms, 3), v.reshape(j, s, a_atoms, 3)


# ----------------------------------------------------------------------------- metrics


def _pair_metrics(x_ref, v_ref, x, v, mol: MolecularSystem, heavy, quads) -> dict[str, np.ndarray]:
    """Per-start values (S,) of each metric for pairs (x_ref, v_ref) vs (x, v), each (S, A, 3)."""
    from .evaluation.dihedrals import dihedral_angles
    from .evaluation.structure import angle_difference, kabsch_rmsd, rmsd

    out = {
        "heavy_rmsd_raw_nm": rmsd(x[:, heavy], x_ref[:, heavy]),
        "heavy_rmsd_aligned_nm": kabsch_rmsd(x[:, heavy], x_ref[:, heavy]),
        "dv_over_vthermal": np.sqrt(((v - v_ref) ** 2 * mol.masses_amu[:, None]).mean((-1, -2))
                                    / (mol.kT_kj_mol)),
    }
    for name, q in zip(("dphi_deg", "dpsi_deg"), quads if quads is not None else (None, None)):
        if q is None:
            out[name] = None
            continue
        out[name] = np.degrees(angle_difference(dihedral_angles(x, q), dihedral_angles(x_ref, q)))
    return out


def rms_and_se(values: np.ndarray) -> tuple[float, float]:
    """Root mean square over starts and its standard error by the delta method.

    SE(rms) = SE(mean of squares) / (2 rms), SE(mean of squares) = std(values², ddof=1)/sqrt(n).
    Returns (rms, se); se is 0 when rms is 0.
    """
    sq = np.asarray(values, dtype=np.float64) ** 2
    ms = float(sq.mean())
    rms = float(np.sqrt(ms))
    se_ms = float(sq.std(ddof=1) / np.sqrt(len(sq))) if len(sq) > 1 else float("nan")
    return rms, (se_ms / (2.0 * rms) if rms > 0 else 0.0)


def _row(tau: float, n: int, per_start: dict[str, np.ndarray | None]) -> dict[str, Any]:
    row: dict[str, Any] = {"tau_ps": float(tau), "n_coefficients": int(n),
                           "n_starts": int(len(per_start["heavy_rmsd_raw_nm"]))}
    for name in METRICS:
        vals = per_start[name]
        if vals is None:
            row[name], row[f"{name}_se"] = None, None
        else:
            row[name], row[f"{name}_se"] = rms_and_se(vals)
    return row
