"""Few-step sampling with a trained flow map (user story 3).

    >>> fm = molflow.FlowMap.load("model.pt")
    >>> x0, v0 = molflow.sampling.start_states_from_run("ref.h5", replicas=64)
    >>> out = fm.sample((x0, v0), n_jumps=100, tau_ps=1.0, seed=1)              # arrays in memory
    >>> traj = fm.sample((x0, v0), n_jumps=100, tau_ps=1.0, seed=1, out="s.h5")  # streamed to HDF5

Modes (DESIGN.md section 3.2): ``sample`` (fresh latent every jump: rollouts exact in law where the
model is) and ``mean`` (the latent averaged out over ``n_mean`` draws: the best pathwise estimate).
Free-running rollouts draw fresh path coefficients every jump from the exact law of the engine's
discrete path (tau/timestep steps); ``brownian`` (R, K, N, A, 3) feeds given coefficients instead
(:func:`pathwise_inputs` composes a reference run's recorded ones to tau, for pathwise runs).

Random numbers are a function of (seed, jump index[, replica, retry]) only, so a run is the same
whatever its chunking, and ``resume=True`` continues a killed run exactly as it would have gone on.

Guards: after every jump each replica is checked (non-finite numbers, a bond outside
[0.5, 1.5] x its start length, kinetic temperature above 5x the thermostat's, a stereocentre whose
handedness differs from the start's — MD at 300 K never inverts an alanine Calpha, a map can: the
shipped alanine-dipeptide map turned 3 of 64 replicas into D-alanine within 6.4 ns before this guard). A bad replica is
restarted from its last good state with fresh latents (and, free-running, fresh coefficients) up to
``max_retries`` times; each restart is counted (file attrs ``n_restarts``,
``restarts_per_replica``). A replica that still fails is stopped: its later frames are NaN, and
``stopped_at_jump`` records the jump (-1: never stopped) and ``n_stopped`` the count; the evaluator
leaves stopped replicas out. When every replica has stopped the run ends with a clear error, keeping
every complete frame.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .brownian import compose, sample_coefficients
from .errors import InputError, SimulationError
from .finish import FinishConfig, LangevinFinish
from .models.molecular import MapConfig, MolecularFlowMap, build_model
from .seeding import random_seed
from .systems import MolecularSystem, load_system, system_from_pdb_text
from .checkpoint import load_checkpoint
from .devices import device_description, resolve_device
from .units import kinetic_temperature

#: a bond shorter/longer than these multiples of its start length marks an exploded replica
#: (thermal bond fluctuations are ~3-5% of the length: 50% is > 10 standard deviations).
BOND_RANGE = (0.5, 1.5)
#: kinetic temperature of one replica above this multiple of the target marks an explosion
#: (a 22-atom molecule fluctuates by T*sqrt(2/(3A)) = 17% per frame: 5x is far beyond honest noise).
EXPLOSION_FACTOR = 5.0
#: settings that must match to resume a sampled run (``n_jumps`` may grow)
RESUME_KEYS = ("model_fingerprint", "fingerprint", "n_replicas", "tau_ps", "mode", "pathwise", "seed",
               "n_coefficients", "finish_steps", "finish_friction_per_ps")


# ----------------------------------------------------------------------------- start states


def start_states_from_run(path: str | os.PathLike, replicas: int, skip_fraction: float = 0.1,
                          system: MolecularSystem | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``replicas`` start states (x nm, v nm/ps; each (R, A, 3)) spread evenly over the replicas
    and frames of a run, skipping the first ``skip_fraction`` of every replica's frames. With
    ``system`` (the model's), a run of another molecule or other settings is refused, naming both."""
    from .trajectory import Trajectory

    with Trajectory(path) as t:
        if system is not None and t.attrs.get("fingerprint") != system.fingerprint:
            raise InputError(f"{path} is a run of {t.attrs.get('system')!r} (fingerprint {t.attrs.get('fingerprint')}), "
                             f"but the model was trained for {system.name!r} (fingerprint {system.fingerprint}): "
                             "atoms, bonds, force field or Langevin settings differ")
        R, F = t.n_replicas, t.n_frames
        if F < 1:
            raise InputError(f"{path} has no complete frame to start from")
        first = min(int(np.ceil(skip_fraction * F)), F - 1)
        pool = [(r, f) for r in range(R) for f in range(first, F)]
        pick = np.linspace(0, len(pool) - 1, int(replicas)).round().astype(int)
        x = np.stack([t.positions[pool[i][0], pool[i][1]] for i in pick])
        v = np.stack([t.velocities[pool[i][0], pool[i][1]] for i in pick])
    return x.astype(np.float64), v.astype(np.float64)


def start_states_from_system(system: MolecularSystem, replicas: int, seed: int | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The energy-minimised structure with Maxwell-Boltzmann velocities at the system's temperature
    (each (R, A, 3); nm, nm/ps)."""
    from .md.engine import minimise

    x = minimise(system)
    return np.repeat(x[None], int(replicas), 0), maxwell_boltzmann_velocities(system, replicas, np.random.default_rng(seed))


def maxwell_boltzmann_velocities(system: MolecularSystem, replicas: int, rng: np.random.Generator) -> np.ndarray:
    """Velocities (R, A, 3) nm/ps drawn from the Maxwell-Boltzmann law at the system's temperature."""
    shape = (int(replicas), system.n_atoms, 3)
    return rng.standard_normal(shape) * np.sqrt(system.kT_kj_mol / system.masses_amu)[None, :, None]


def pathwise_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """File attributes of a run driven by ``path``'s recorded path (the evaluator matches the seed)."""
    from .trajectory import Trajectory

    with Trajectory(path) as t:
        seed = t.attrs.get("seed")
    return {"brownian_from": str(path), "brownian_from_seed": seed,
            "start_from": f"frame 0 of every replica of {path}"}


def pathwise_inputs(path: str | os.PathLike, tau_ps: float, n_jumps: int | None = None,
                    n_coefficients: int | None = None, replicas: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame 0 of each replica of a recorded run and its coefficients composed to ``tau_ps``.

    Returns x0, v0 (R, A, 3) and brownian (R, K, N, A, 3) in sqrt(ps): jump k's coefficients are the
    exact composition of the m = tau/frame-interval recorded intervals [k m, (k+1) m). ``n_jumps``
    defaults to all the run holds; ``n_coefficients`` (default: all recorded) keeps the first ones.
    """
    from .trajectory import Trajectory

    with Trajectory(path) as t:
        dt = t.frame_interval_ps
        m = tau_ps / dt
        if m < 1 - 1e-9 or abs(m - round(m)) > 1e-6:
            raise InputError(f"--pathwise: tau {tau_ps} ps must be a whole multiple of the run's frame "
                             f"interval {dt * 1000:g} fs")
        m = int(round(m))
        n_rec = t.n_coefficients
        N = n_rec if n_coefficients is None else int(n_coefficients)
        if N > n_rec:
            raise InputError(f"--pathwise: the model takes {N} coefficients but {path} recorded {n_rec}")
        K_max = (t.n_frames - 1) // m
        K = K_max if n_jumps is None else int(n_jumps)
        if K > K_max:
            raise InputError(f"--pathwise: {path} holds {t.n_frames} frames, enough for {K_max} jumps of "
                             f"{tau_ps:g} ps, not {K}")
        R = t.n_replicas if replicas is None else int(replicas)
        if R > t.n_replicas:
            raise InputError(f"--pathwise: {path} has {t.n_replicas} replicas, not {R}")
        x0 = np.asarray(t.positions[:R, 0], dtype=np.float64)
        v0 = np.asarray(t.velocities[:R, 0], dtype=np.float64)
        rec = np.asarray(t.brownian[:R, : K * m, :N], dtype=np.float64)  # (R, K m, N, A, 3)
    A = x0.shape[1]
    pieces = rec.reshape(R, K, m, N, A, 3).transpose(2, 3, 0, 1, 4, 5)  # (m, N, R, K, A, 3)
    L = compose(pieces, [dt] * m) if m > 1 else pieces[0]
    return x0, v0, np.ascontiguousarray(L.transpose(1, 2, 0, 3, 4)).astype(np.float32)


# ----------------------------------------------------------------------------- the flow map


class FlowMap:
    """A trained molecular flow map with its system, ready to jump and sample."""

    def __init__(self, model: MolecularFlowMap, system: MolecularSystem, h0_ps: float,
                 metadata: dict[str, Any] | None = None):
        self.model = model.eval()
        self.system = system
        self.h0_ps = float(h0_ps)
        self.metadata = metadata or {}
        self._evaluator = None  # OpenMM force evaluator, made on first use (maps with a torsion drive)

    @property
    def device(self) -> torch.device:
        return self.model.v_th.device

    @property
    def n_coefficients(self) -> int:
        return self.model.config.n_coefficients

    @property
    def fingerprint(self) -> str:
        """A digest of the weights in use (recorded by sampled runs; resume refuses another model)."""
        from .checkpoint import weights_fingerprint

        return weights_fingerprint(self.model)

    @classmethod
    def load(cls, path: str | os.PathLike, system: str | MolecularSystem | None = None,
             device: str = "auto", weights: str = "ema") -> "FlowMap":
        """Load a checkpoint (safely). With ``system`` given, refuse a checkpoint made for another."""
        ck = load_checkpoint(path)
        s = ck["system_json"]
        mol = system_from_pdb_text(s["pdb"], s["forcefield"], s["temperature_K"], s["friction_per_ps"],
                                   s["timestep_fs"], s["name"])
        if system is not None:
            other = system if isinstance(system, MolecularSystem) else load_system(system)
            if other.fingerprint != s["fingerprint"]:
                raise InputError(f"{path} was trained for system {s['name']!r} (fingerprint {s['fingerprint']}), "
                                 f"not {other.name!r} (fingerprint {other.fingerprint}): atoms, bonds, force "
                                 "field or Langevin settings differ")
        model = build_model(mol, MapConfig.from_dict(ck["map_config_json"]))
        try:
            model.load_state_dict(ck[weights])
        except (KeyError, RuntimeError) as exc:
            raise InputError(f"{path}: model weights do not fit the recorded architecture ({exc})") from None
        dev = resolve_device(device)
        return cls(model.to(dev), mol, ck["h0_ps"], {"path": str(path), "step": ck.get("step"),
                                                      "fingerprint": s["fingerprint"],
                                                      "train_config": ck.get("train_config_json"),
                                                      "sample_finish": ck.get("sample_finish_json"),
                                                      "verdict": ck.get("verdict_json")})

    @property
    def tau_max_ps(self) -> float | None:
        """The longest jump the map was trained for (ps), when the checkpoint says."""
        cfg = self.metadata.get("train_config") or {}
        return cfg.get("tau_max_ps")

    def forces(self, positions_nm: np.ndarray) -> np.ndarray:
        """Force-field forces (B, A, 3) kJ/mol/nm at positions (B, A, 3) nm (the system's NoCutoff
        force field, Reference platform; the evaluator is made on first use)."""
        if self._evaluator is None:
            from .md.engine import EnergyEvaluator

            self._evaluator = EnergyEvaluator(self.system, platform="Reference")
        return np.stack([self._evaluator.forces(p) for p in np.asarray(positions_nm, dtype=np.float64)])

    def default_finish(self) -> FinishConfig:
        """The finish recorded with the map (``sample_finish`` in its checkpoint), else none."""
        rec = self.metadata.get("sample_finish")
        return FinishConfig(**rec) if rec else FinishConfig(n_steps=0)

    @torch.no_grad()
    def jump(self, x: torch.Tensor, v: torch.Tensor, L: torch.Tensor, tau_ps: float | torch.Tensor,
             mode: str = "sample", generator: torch.Generator | None = None, n_mean: int = 16,
             forces: torch.Tensor | None = None):
        """One jump of ``tau_ps`` for a batch: x (nm), v (nm/ps) (B,A,3), L (B,N,A,3) sqrt(ps) -> (x_t, v_t).

        A map with a torsion drive needs the force-field forces at x (B,A,3) kJ/mol/nm: pass them, or
        they are computed here (one force evaluation per molecule, OpenMM Reference platform)."""
        B = x.shape[0]
        tau = torch.as_tensor(tau_ps, dtype=x.dtype, device=x.device).expand(B).clone()
        extra = ()  # only a map that needs forces is called with them
        if self.model.needs_forces:
            if forces is None:
                forces = torch.as_tensor(self.forces(x.detach().double().cpu().numpy()), dtype=x.dtype, device=x.device)
            extra = (forces,)
        if mode == "sample":
            return self.model(x, v, L, self.model.sample_latent(B, generator).to(x.dtype), tau, *extra)
        if mode == "mean":
            xs, vs = torch.zeros_like(x), torch.zeros_like(v)
            for _ in range(n_mean):
                xt, vt = self.model(x, v, L, self.model.sample_latent(B, generator).to(x.dtype), tau, *extra)
                xs += xt / n_mean
                vs += vt / n_mean
            return xs, vs
        raise InputError(f"mode must be 'sample' or 'mean', not {mode!r}")

    def sample(self, initial_states: tuple[np.ndarray, np.ndarray], n_jumps: int, tau_ps: float,
               replicas: int | None = None, seed: int | None = None, mode: str = "sample",
               brownian: np.ndarray | None = None, out: str | os.PathLike | None = None,
               resume: bool = False, overwrite: bool = False, chunk_jumps: int | None = None,
               batch_size: int = 4096, max_retries: int = 10, progress: bool = False,
               attrs: dict[str, Any] | None = None, finish: FinishConfig | int | None = None,
               extrapolate: bool = False):
        """Roll out ``n_jumps`` jumps of ``tau_ps`` (ps) from ``initial_states`` = (x nm, v nm/ps),
        each (S, A, 3).

        ``replicas`` rollouts start from the states spread evenly (default: one per state).
        Without ``out``: returns a dict of arrays, positions/velocities (R, K+1, A, 3) and brownian
        (R, K, N, A, 3) (sqrt(ps)), plus ``restarts_per_replica`` (R,). With ``out``: streams chunks
        of ``chunk_jumps`` jumps to that HDF5 file (DESIGN.md section 5 layout, forces and energies
        omitted) and returns it as a :class:`~molflow.trajectory.Trajectory`; ``resume=True``
        continues it (``n_jumps`` is the total), ``overwrite=True`` replaces it.

        ``finish``: a :class:`~molflow.finish.FinishConfig` (or its number of steps) — force-field
        Langevin steps at high friction after every jump that hand bonds and angles back to the
        force field (:mod:`molflow.finish`); None: the checkpoint's recommended finish (none for
        maps that do not record one). A ``tau_ps`` above the map's trained ``tau_max`` is refused
        unless ``extrapolate=True``.
        """
        if mode not in ("sample", "mean"):
            raise InputError(f"mode must be 'sample' or 'mean', not {mode!r}")
        if n_jumps < 0:
            raise InputError("n_jumps must be >= 0")
        x0, v0 = (np.asarray(a, dtype=np.float64) for a in initial_states)
        if x0.ndim == 2:
            x0, v0 = x0[None], v0[None]
        A = self.system.n_atoms
        if x0.shape[1:] != (A, 3) or v0.shape != x0.shape:
            raise InputError(f"initial states must be (S, {A}, 3) positions and velocities, got "
                             f"{x0.shape} and {v0.shape}")
        R = int(replicas or len(x0))
        pick = np.linspace(0, len(x0) - 1, R).round().astype(int)
        x0, v0 = x0[pick], v0[pick]
        dt_ps = self.system.timestep_fs / 1000.0
        steps = tau_ps / dt_ps
        if tau_ps <= 0 or abs(steps - round(steps)) > 1e-6 or round(steps) < 1:
            raise InputError(f"tau {tau_ps} ps is not a positive whole number of {dt_ps} ps timesteps")
        tmax = self.tau_max_ps
        if tmax is not None and tau_ps > tmax * (1 + 1e-9):
            msg = (f"tau {tau_ps:g} ps is above the longest jump this map was trained for ({tmax:g} ps)")
            if not extrapolate:
                raise InputError(msg + ": sample at tau <= tau_max, or pass --extrapolate (extrapolate=True) "
                                 "to try anyway")
            print(f"molflow sample: warning: {msg}; extrapolating as asked", file=sys.stderr)
        finish = self.default_finish() if finish is None else (
            finish if isinstance(finish, FinishConfig) else FinishConfig(n_steps=int(finish)))
        N = self.n_coefficients
        if brownian is not None:
            brownian = np.asarray(brownian)
            if brownian.shape[:3] != (R, n_jumps, N) or brownian.shape[3:] != (A, 3):
                raise InputError(f"brownian must have shape ({R}, {n_jumps}, {N}, {A}, 3), not {brownian.shape}")
        seed = random_seed() if seed is None else int(seed)
        rollout = _Rollout(self, x0, tau_ps, int(round(steps)), mode, seed, brownian, batch_size, max_retries,
                           finish)
        if out is None:
            xs, vs, Ls = [x0.astype(np.float32)], [v0.astype(np.float32)], []
            for k in range(n_jumps):
                x0, v0, L = rollout.step(k, x0, v0)
                xs.append(x0.astype(np.float32))
                vs.append(v0.astype(np.float32))
                Ls.append(L)
            return {"positions": np.stack(xs, 1), "velocities": np.stack(vs, 1),
                    "brownian": np.stack(Ls, 1) if Ls else np.zeros((R, 0, N, A, 3), np.float32),
                    "restarts_per_replica": rollout.restarts, "stopped_at_jump": rollout.stopped_at,
                    "seed": seed}
        meta = {**(attrs or {}), "mode": mode, "pathwise": brownian is not None, "tau_ps": float(tau_ps),
                "n_replicas": R, "seed": seed, "n_coefficients": N, **finish.to_attrs()}
        return _sample_to_file(self, rollout, x0, v0, n_jumps, Path(out), meta, resume, overwrite,
                               chunk_jumps, progress)


class _Rollout:
    """Jump k of every replica, with the finish and the guards; random numbers depend on
    (seed, k, replica, retry). ``x0`` (R, A, 3): the start states; their mean bond lengths are the
    guard's reference."""

    def __init__(self, fm: FlowMap, x0: np.ndarray, tau_ps: float, n_steps: int, mode: str, seed: int,
                 brownian: np.ndarray | None, batch_size: int, max_retries: int,
                 finish: FinishConfig | None = None):
        self.fm, self.tau, self.n_steps, self.mode, self.seed = fm, float(tau_ps), n_steps, mode, seed
        self.brownian, self.batch_size, self.max_retries = brownian, int(batch_size), int(max_retries)
        self.finish_config = finish or FinishConfig()
        self.finish = LangevinFinish(fm.system, self.finish_config) if self.finish_config.n_steps else None
        R = len(x0)
        self.restarts = np.zeros(R, dtype=np.int64)
        self.stopped_at = np.full(R, -1, dtype=np.int64)  # jump (1-based) at which a replica stopped, -1 running
        self.last_failure = ""  # what the guard saw last (named in the error when every replica stops)
        self.bonds = np.asarray(fm.system.bonds, dtype=int).reshape(-1, 2)
        self.bond_ref = self._bond_lengths(x0).mean(0)
        from .boltzmann.geometry import signed_volumes, stereocentres

        self._signed_volumes = signed_volumes
        self.centres = stereocentres(fm.system.elements, self.bonds)
        self.handedness = np.sign(signed_volumes(x0, self.centres))  # (R, n_centres): each replica's own
        self._forces: tuple[np.ndarray, np.ndarray] | None = None  # (states, force-field forces there) from the last finish

    def _bond_lengths(self, x: np.ndarray) -> np.ndarray:
        b = self.bonds
        return np.linalg.norm(x[:, b[:, 0]] - x[:, b[:, 1]], axis=-1)

    def _coefficients(self, k: int, rng: np.random.Generator, R: int, replicas: np.ndarray) -> np.ndarray:
        fm = self.fm
        if self.brownian is not None:
            return np.asarray(self.brownian[replicas, k], dtype=np.float32)
        L = sample_coefficients(rng, fm.n_coefficients, self.tau, (R, fm.system.n_atoms, 3),
                                n_steps=self.n_steps, dt_ps=self.tau / self.n_steps)
        return np.moveaxis(L, 0, 1).astype(np.float32)

    def _jump(self, x: np.ndarray, v: np.ndarray, L: np.ndarray, gen: torch.Generator, rng: np.random.Generator,
              f: np.ndarray | None = None):
        """Network jump (batched) then the finish; the finish's noise comes from ``rng``. ``f``: the
        force-field forces at x when known (a torsion-drive map needs them; else computed). Returns
        (x', v', forces at x' or None): the finish leaves its final forces behind."""
        fm = self.fm
        outx, outv = [], []
        for s in range(0, len(x), self.batch_size):
            sl = slice(s, s + self.batch_size)
            t = [torch.as_tensor(a[sl], dtype=torch.float32, device=fm.device) for a in (x, v, L)]
            forces = None
            if fm.model.needs_forces:  # at the float64 state, as the finish leaves them
                forces = torch.as_tensor(fm.forces(x[sl]) if f is None else f[sl], dtype=torch.float32, device=fm.device)
            xt, vt = fm.jump(*t, self.tau, self.mode, gen, forces=forces)
            outx.append(xt.double().cpu().numpy())
            outv.append(vt.double().cpu().numpy())
        xn, vn = np.concatenate(outx), np.concatenate(outv)
        fn = None
        if self.finish is not None:
            noise = rng.standard_normal(self.finish.noise_shape(len(x)))
            # bonds and angles are harmonic in the force field, so the finish also repairs a stretched
            # bond; only non-finite states are kept from it (the guard after it judges the result)
            ok = np.isfinite(xn).all(axis=(1, 2)) & np.isfinite(vn).all(axis=(1, 2))
            fn = np.full_like(xn, np.nan)
            if ok.any():
                xn[ok], vn[ok], fn[ok] = self.finish(xn[ok], vn[ok], noise[ok], return_forces=True)
        return xn, vn, fn

    def _failures(self, x: np.ndarray, v: np.ndarray, replicas: np.ndarray | None = None) -> list[str]:
        """Per replica (``replicas``: their indices, default all): '' when healthy, else what the guard saw
        (which guard, which bond or stereocentre)."""
        replicas = np.arange(len(x)) if replicas is None else np.asarray(replicas)
        sys_ = self.fm.system
        out = []
        names = [f"{a.residue.name}{a.residue.index + 1}:{a.name}" for a in sys_.topology.atoms()]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            ratio = self._bond_lengths(x) / self.bond_ref
            t_kin = kinetic_temperature(np.where(np.isfinite(v), v, 0.0), sys_.masses_amu)
            flipped = np.sign(self._signed_volumes(x, self.centres)) != self.handedness[replicas]
        for i in range(len(x)):
            if not (np.isfinite(x[i]).all() and np.isfinite(v[i]).all()):
                out.append("non-finite positions or velocities")
                continue
            r = ratio[i]
            off = np.nonzero(~((r > BOND_RANGE[0]) & (r < BOND_RANGE[1])))[0]
            if len(off):
                j = off[np.argmax(np.abs(np.log(r[off])))]
                a, b = self.bonds[j]
                out.append(f"bond guard: {names[a]}-{names[b]} at {r[j]:.2f}x its start length "
                           f"(allowed {BOND_RANGE[0]:g}-{BOND_RANGE[1]:g}x)" + (f", {len(off) - 1} more bond(s)" if len(off) > 1 else ""))
            elif t_kin[i] > EXPLOSION_FACTOR * sys_.temperature_K:
                out.append(f"temperature guard: kinetic temperature {t_kin[i]:.0f} K "
                           f"(> {EXPLOSION_FACTOR:g}x the thermostat's {sys_.temperature_K:g} K)")
            elif flipped[i].any():
                c = self.centres[int(np.argmax(flipped[i]))][0]
                out.append(f"chirality guard: stereocentre {names[c]} inverted")
            else:
                out.append("")
        return out

    def _bad(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.array([bool(f) for f in self._failures(x, v)], dtype=bool)

    def _rngs(self, *key: int) -> tuple[np.random.Generator, torch.Generator, np.random.Generator]:
        """(coefficient rng, latent generator, finish rng) for one draw, from (seed, *key)."""
        rng = np.random.default_rng([self.seed, *key])
        gen = torch.Generator(device=self.fm.device).manual_seed(int(rng.integers(2**62)))
        return rng, gen, np.random.default_rng([self.seed, *key, 1])

    def step(self, k: int, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Jump ``k`` (0-based) of all replicas from (x, v) -> (x', v', coefficients used)."""
        R = len(x)
        rng, gen, frng = self._rngs(k)
        L = self._coefficients(k, rng, R, np.arange(R))
        # forces at x, when the last finish left them for exactly these states
        f = self._forces[1] if self._forces is not None and np.array_equal(self._forces[0], x, equal_nan=True) else None
        xn, vn, fn = self._jump(x, v, L, gen, frng, f)
        running = self.stopped_at < 0
        fails = self._failures(xn, vn)
        for i in np.nonzero(np.array([bool(f) for f in fails]) & running)[0]:
            why = fails[i]
            for retry in range(1, self.max_retries + 1):
                self.restarts[i] += 1
                rng_i, gen_i, frng_i = self._rngs(k, int(i), retry)
                Li = self._coefficients(k, rng_i, 1, np.array([i]))
                xi, vi, fi = self._jump(x[i:i + 1], v[i:i + 1], Li, gen_i, frng_i, None if f is None else f[i:i + 1])
                why = self._failures(xi, vi, np.array([i]))[0]
                if not why:
                    xn[i], vn[i], L[i] = xi[0], vi[0], Li[0]
                    if fn is not None:
                        fn[i] = fi[0]
                    break
            else:
                self.stopped_at[i] = k + 1
                self.last_failure = f"replica {i} at jump {k + 1}: {why}"
                xn[i] = vn[i] = np.nan
        xn[~running] = vn[~running] = np.nan
        self._forces = None if fn is None else (xn.copy(), fn)
        if (self.stopped_at >= 0).all():
            fm = self.fm
            tmax = fm.tau_max_ps
            trained = f"trained up to tau_max = {tmax:g} ps" if tmax else "trained tau_max unknown"
            advice = []
            if tmax and self.tau > tmax * (1 + 1e-9):
                advice.append(f"sample at --tau-ps <= {tmax:g} (the trained tau_max)")
            elif tmax and self.tau > fm.h0_ps * 1.5:
                advice.append(f"try a shorter --tau-ps (e.g. {max(fm.h0_ps, self.tau / 2):g})")
            if not self.finish_config.n_steps:
                advice.append("add a physical finish (--finish-steps 20)")
            advice.append("train longer (molflow train --resume --steps ...)")
            advice.append(f"check the map's verdict with `molflow info {fm.metadata.get('path', 'MODEL')}`")
            raise SimulationError(
                f"every replica was stopped by the sampler's guards after {self.max_retries} restarts each; "
                f"the last: {self.last_failure}. The map ({trained}) is not stable at tau = {self.tau:g} ps. "
                f"What can help: {'; '.join(advice)}")
        return xn, vn, L


def rollout_verdict(fm: "FlowMap", x0: np.ndarray, v0: np.ndarray, tau_ps: float, n_jumps: int,
                    reference_bond_std_nm: np.ndarray, seed: int = 0, finish: FinishConfig | None = None
                    ) -> dict[str, Any]:
    """Free-running rollouts of ``fm`` from (x0, v0) (R, A, 3): is the map stable at ``tau_ps``?

    Returns counts (restarts, stopped replicas), the ratio of each bond's spread over all sampled
    frames to ``reference_bond_std_nm`` (median and worst), the kinetic temperature (K) and a
    one-line ``line`` for people. "stable" means no replica stopped and at most one restart per
    10 jumps."""
    R = len(x0)
    try:
        out = fm.sample((x0, v0), n_jumps=n_jumps, tau_ps=tau_ps, seed=seed, finish=finish, max_retries=3,
                        extrapolate=True)
    except SimulationError:
        out = None
    if out is None:
        v = {"stable": False, "tau_ps": tau_ps, "replicas": R, "jumps": n_jumps, "stopped": R}
        v["line"] = (f"verdict: UNSTABLE at tau {tau_ps:g} ps — every one of {R} free-running replicas was stopped "
                     f"by the guards within {n_jumps} jumps; do not sample with this map yet (train longer)")
        return v
    x = out["positions"][:, 1:]
    vel = out["velocities"][:, 1:]
    keep = out["stopped_at_jump"] < 0
    b = np.asarray(fm.system.bonds, dtype=int).reshape(-1, 2)
    xs = x[keep].reshape(-1, *x.shape[2:]).astype(np.float64)
    lengths = np.linalg.norm(xs[:, b[:, 0]] - xs[:, b[:, 1]], axis=-1)
    ratio = lengths.std(0) / np.asarray(reference_bond_std_nm)
    t_kin = float(kinetic_temperature(vel[keep].reshape(-1, *vel.shape[2:]), fm.system.masses_amu).mean())
    restarts, stopped = int(out["restarts_per_replica"].sum()), int((~keep).sum())
    stable = stopped == 0 and restarts <= R * n_jumps / 10
    fin = finish or fm.default_finish()
    v = {"stable": bool(stable), "tau_ps": float(tau_ps), "replicas": R, "jumps": int(n_jumps),
         "restarts": restarts, "stopped": stopped, "bond_spread_ratio_median": float(np.median(ratio)),
         "bond_spread_ratio_max": float(ratio.max()), "kinetic_temperature_K": t_kin,
         "target_temperature_K": float(fm.system.temperature_K), "finish_steps": int(fin.n_steps)}
    v["line"] = (f"verdict: {'STABLE' if stable else 'UNSTABLE'} at tau {tau_ps:g} ps ({R} free-running replicas x "
                 f"{n_jumps} jumps, finish {fin.n_steps} steps): {restarts} restarts, {stopped} stopped; bond spread "
                 f"{v['bond_spread_ratio_median']:.2f}x reference (median; worst {v['bond_spread_ratio_max']:.2f}x); "
                 f"T_kin {t_kin:.0f} K (target {fm.system.temperature_K:g} K)")
    return v


def _sample_to_file(fm: FlowMap, rollout: _Rollout, x0: np.ndarray, v0: np.ndarray, n_jumps: int, out: Path,
                    meta: dict[str, Any], resume: bool, overwrite: bool, chunk_jumps: int | None,
                    progress: bool):
    from tqdm.auto import tqdm

    from .trajectory import Trajectory, TrajectoryWriter

    sys_ = fm.system
    R, A, N = len(x0), sys_.n_atoms, fm.n_coefficients
    attrs = {"molflow_version": __version__, "system": sys_.name, "fingerprint": sys_.fingerprint,
             "pdb": sys_.pdb_text, "forcefield": list(sys_.forcefield_files),
             "temperature_K": sys_.temperature_K, "friction_per_ps": sys_.friction_per_ps,
             "timestep_fs": sys_.timestep_fs, "frame_interval_fs": meta["tau_ps"] * 1000.0,
             "platform": f"torch {fm.device}", "hardware": device_description(fm.device),
             "kind": "flowmap_samples", "model_fingerprint": fm.fingerprint,
             "model_path": str(fm.metadata.get("path", "")), "model_step": int(fm.metadata.get("step") or 0),
             "n_jumps_requested": int(n_jumps), **meta}
    exists = out.exists()
    done, wall0 = 0, 0.0
    if exists and resume:
        with Trajectory(out) as old:
            a = old.attrs
            n_old = old.n_frames
            if n_old >= 1:
                a = {"finish_steps": 0, "finish_friction_per_ps": attrs["finish_friction_per_ps"], **dict(a)}
                diffs = [f"{k}: file has {a.get(k)!r}, asked {attrs[k]!r}" for k in RESUME_KEYS
                         if a.get(k) != attrs[k] and not (isinstance(attrs[k], float) and
                                                           np.isclose(a.get(k, np.nan), attrs[k]))]
                if diffs:
                    raise InputError(f"cannot resume {out}: settings differ ({'; '.join(diffs)})")
                exact = old.exact_state()  # full precision where kept (the float32 frame otherwise)
                x0, v0 = exact if exact is not None else (np.asarray(old.positions[:, -1], dtype=np.float64),
                                                          np.asarray(old.velocities[:, -1], dtype=np.float64))
                done = n_old - 1
                wall0 = float(a.get("wall_clock_s", 0.0))
                rollout.restarts = np.asarray(a.get("restarts_per_replica", [0] * R), dtype=np.int64)
                rollout.stopped_at = np.asarray(a.get("stopped_at_jump", [-1] * R), dtype=np.int64)
                rollout.bond_ref = np.asarray(a["bond_reference_nm"], dtype=np.float64).reshape(-1)
        if done == 0:
            exists = False  # nothing complete: start again
    elif exists and not overwrite:
        raise InputError(f"{out} exists: pass resume=True (--resume) to continue it or overwrite=True (--overwrite)")
    if exists and done > 0:
        writer = TrajectoryWriter.open_append(out)
        writer.set_attrs(n_jumps_requested=int(n_jumps))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = TrajectoryWriter.create(out, R, A, N, {**attrs, "status": "running", "n_restarts": 0,
                                                        "restarts_per_replica": [0] * R,
                                                        "n_stopped": 0, "stopped_at_jump": [-1] * R,
                                                        "wall_clock_s": 0.0},
                                         chunk_frames=chunk_jumps or 16, forces=False, energies=False)
        writer.append(np.array([0.0]), x0[:, None].astype(np.float32), v0[:, None].astype(np.float32),
                      np.zeros((R, 0, N, A, 3), np.float32))
    writer.set_attrs(bond_reference_nm=rollout.bond_ref.tolist())
    chunk = max(1, int(chunk_jumps or max(1, min(64, 2**22 // max(1, R * A * 3 * 4)))))
    tau = meta["tau_ps"]
    bar = tqdm(total=n_jumps, initial=min(done, n_jumps), disable=not progress, desc="sample", unit="jump",
               file=sys.stderr, dynamic_ncols=True)
    x, v = x0, v0
    buf: dict[str, list] = {"x": [], "v": [], "L": [], "t": []}
    t_start = time.perf_counter()

    def flush() -> None:
        counts = dict(n_restarts=int(rollout.restarts.sum()), n_stopped=int((rollout.stopped_at >= 0).sum()))
        if buf["t"]:
            writer.append(np.array(buf["t"]), np.stack(buf["x"], 1).astype(np.float32),
                          np.stack(buf["v"], 1).astype(np.float32), np.stack(buf["L"], 1),
                          wall_clock_s=wall0 + time.perf_counter() - t_start, **counts)
            writer.set_exact_state(buf["x"][-1], buf["v"][-1])
            for key in buf:
                buf[key].clear()
        # also with no frame pending: a run that ends with every replica stopped records its last restarts
        writer.set_attrs(**counts, restarts_per_replica=rollout.restarts.tolist(),
                         stopped_at_jump=rollout.stopped_at.tolist())

    status = "complete"
    try:
        for k in range(done, n_jumps):
            x, v, L = rollout.step(k, x, v)
            buf["x"].append(x)
            buf["v"].append(v)
            buf["L"].append(L)
            buf["t"].append((k + 1) * tau)
            bar.update(1)
            if len(buf["t"]) >= chunk:
                flush()
                bar.set_postfix(restarts=int(rollout.restarts.sum()), stopped=int((rollout.stopped_at >= 0).sum()))
    except SimulationError as exc:
        status = "failed: " + str(exc).split(". ")[0]
        raise SimulationError(f"{exc}. The {k} complete jump(s) are kept in {out} "
                              "(attribute status says it failed; the evaluator flags it)") from None
    except BaseException:
        status = "interrupted: continue it with --resume"
        raise
    finally:
        flush()  # whatever is complete is kept, also on an error or Ctrl-C
        writer.set_attrs(status=status)
        writer.close()
        bar.close()
    return Trajectory(out)
