"""The physical finish: a few force-field Langevin steps at high friction after each flow-map jump.

A few-step map has to carry the slow, kinetically relevant motion (torsions, basin changes); the
stiff vibrations (bonds, bond angles: periods of 10-50 fs) carry no kinetics but dominate the
energy, and a network that gets them slightly wrong leaves the molecule strained (DESIGN.md 3.4:
bonds 1.5x too loose, +60 kJ/mol). The finish hands them back to the force field: after each jump,
``n_steps`` BAOAB Langevin steps of the system's own force field (single molecule, NoCutoff) at a
friction ``friction_per_ps`` far above the thermostat's. At friction gamma a harmonic mode of
angular frequency omega relaxes at rate ~omega^2/gamma when overdamped and ~gamma/2 when
underdamped, so gamma of a few hundred per ps relaxes bond and angle modes (omega ~ 100-600 / ps)
within a few fs, while a torsion moves over the same few fs about as far as it would in free
motion: the finish adds ``n_steps`` x timestep of (overdamped) dynamics to each jump and nothing
else. Langevin dynamics at any friction leaves the Boltzmann distribution invariant (up to the
integrator's timestep error, the same as the reference MD's), so the finish cannot bias the
stationary law; velocities leave it nearly Maxwell-Boltzmann (at tau >= 0.5 ps they are decorrelated
from the start anyway, DESIGN.md 3.1).

Its cost is ``n_steps`` force evaluations per replica and jump, counted in every speed figure
(``finish_force_evaluations`` in sampled files). Random numbers are drawn by the caller (numpy), so a
sampled run stays a function of (seed, jump, replica) and resumes bit for bit.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import InputError
from .evaluation.dihedrals import dihedral_angles
from .md.integrator import state_array


@dataclasses.dataclass(frozen=True)
class FinishConfig:
    """``n_steps`` Langevin steps (0: no finish) at ``friction_per_ps`` (1/ps): the first
    ``n_steps - settle_steps`` of ``timestep_fs`` (fs), the last ``settle_steps`` of
    ``settle_timestep_fs`` (fs).

    Longer bulk steps buy the same relaxation time (ps) for fewer force evaluations: at high friction
    BAOAB stays stable up to ~2/omega of the stiffest mode (C-H bonds: ~3.5 fs) and samples a harmonic
    mode's configurations exactly at any stable step. Its on-step velocities, though, read colder the
    longer the step (measured on alanine dipeptide: 276 K at 2 fs against 294 K at 1 fs), so a few
    closing steps at the reference MD's own step (1 fs) give the velocities that MD's law back: the
    kinetic energy keeps a share exp(-2 gamma t) of the bulk steps' deficit, so the settle steps may
    run at a friction of their own (``settle_friction_per_ps``; 300/ps: e^-6 after 10 fs).

    ``hold_torsions`` > 0 (kJ/mol/rad^2) adds, during the finish only, a harmonic restraint holding every
    backbone phi and psi at the value the jump produced: the finish then re-thermalises bonds and angles
    *given* the slow coordinates, which are the map's to set. Free (0), the finish measurably undoes part
    of a map's torsion change (a map that moves psi partly by straining the atoms defining it; issue 17)."""

    n_steps: int = 0
    friction_per_ps: float = 300.0
    timestep_fs: float = 1.0
    hold_torsions: float = 0.0  # kJ/mol/rad^2: hold backbone phi/psi at the jump's values (0: free)
    settle_steps: int = 0
    settle_timestep_fs: float = 1.0
    settle_friction_per_ps: float | None = None  # 1/ps; None: friction_per_ps

    def __post_init__(self):
        if int(self.n_steps) != self.n_steps or self.n_steps < 0:
            raise InputError(f"finish steps must be a whole number >= 0, not {self.n_steps!r}")
        if int(self.settle_steps) != self.settle_steps or not 0 <= self.settle_steps <= self.n_steps:
            raise InputError(f"finish settle steps must be a whole number in [0, {self.n_steps}], "
                             f"not {self.settle_steps!r}")
        if self.n_steps and (min(self.friction_per_ps, self.timestep_fs, self.settle_timestep_fs, self.settle_friction) <= 0):
            raise InputError("finish frictions (1/ps) and timesteps (fs) must be positive")
        if self.hold_torsions < 0:
            raise InputError("finish torsion hold (kJ/mol/rad^2) must be >= 0")

    @property
    def duration_ps(self) -> float:
        return ((self.n_steps - self.settle_steps) * self.timestep_fs + self.settle_steps * self.settle_timestep_fs) / 1000.0

    @property
    def settle_friction(self) -> float:
        """Friction of the settle steps (1/ps)."""
        return self.friction_per_ps if self.settle_friction_per_ps is None else float(self.settle_friction_per_ps)

    def segments(self) -> list[tuple[int, float, float]]:
        """[(steps, timestep in ps, friction in 1/ps)] in the order they run (empty segments left out)."""
        seg = [(int(self.n_steps - self.settle_steps), self.timestep_fs / 1000.0, float(self.friction_per_ps)),
               (int(self.settle_steps), self.settle_timestep_fs / 1000.0, self.settle_friction)]
        return [s for s in seg if s[0]]

    def to_attrs(self) -> dict[str, Any]:
        return {"finish_steps": int(self.n_steps), "finish_friction_per_ps": float(self.friction_per_ps),
                "finish_timestep_fs": float(self.timestep_fs), "finish_hold_torsions_kj_mol_rad2": float(self.hold_torsions),
                "finish_settle_steps": int(self.settle_steps), "finish_settle_timestep_fs": float(self.settle_timestep_fs),
                "finish_settle_friction_per_ps": self.settle_friction}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "FinishConfig":
        """The finish a sampled run's attributes (:meth:`to_attrs`) record (absent fields: defaults)."""
        keys = {"finish_steps": "n_steps", "finish_friction_per_ps": "friction_per_ps",
                "finish_timestep_fs": "timestep_fs", "finish_hold_torsions_kj_mol_rad2": "hold_torsions",
                "finish_settle_steps": "settle_steps", "finish_settle_timestep_fs": "settle_timestep_fs",
                "finish_settle_friction_per_ps": "settle_friction_per_ps"}
        kw = {v: attrs[k] for k, v in keys.items() if attrs.get(k) is not None}
        for k in ("n_steps", "settle_steps"):
            if k in kw:
                kw[k] = int(kw[k])
        return cls(**kw)


MAX_STEPS_PER_CALL = 10


class LangevinFinish:
    """BAOAB at high friction with the molecule's force field, on OpenMM's Reference platform
    (fastest for one small molecule here); noise supplied per call: ``(R, n_steps, A, 3)`` standard
    normals.

    Merged kicks, as in the recording engine (:mod:`molflow.md.integrator`): the context's velocity
    holds u = v + h/2 f/m, and one BAOAB step of size h is two per-DOF computations,
    x <- x + h/2 (1 + a) u + h/2 b sqrt(kT/m) xi and u <- a u + b sqrt(kT/m) xi + hk f(x)/m
    (a = exp(-gamma h), b = sqrt(1 - a^2)), where hk = h inside a stretch of equal steps, (h + h')/2
    where the step changes to h' (the settle steps), and h/2 after the last step (the closing
    half-kick: on-step velocities); one half-kick opens the finish. Algebraically the BAOAB step;
    OpenMM's Reference ``CustomIntegrator`` costs per per-DOF computation and per per-DOF variable, so
    the noise goes in up to ``MAX_STEPS_PER_CALL`` steps at a time (measured once: 3.3 against 4.4 ms
    per replica for 60 steps, against one variable per step, in one process). The last call also
    leaves the forces at the final positions in ``xi0`` (one per-DOF copy instead of another force
    evaluation): ``return_forces=True`` hands them out (a torsion-drive map needs them for its next
    jump).
    """

    def __init__(self, system, config: FinishConfig, platform: str = "Reference"):
        import openmm

        self.config = config
        self.system = system
        seg = config.segments()
        g = int(np.gcd.reduce([n for n, _, _ in seg])) if seg else 1
        self.per_call = max(m for m in range(1, MAX_STEPS_PER_CALL + 1) if g % m == 0)
        integ = openmm.CustomIntegrator(seg[0][1] * self.per_call if seg else 0.001)  # OpenMM's own dt: unused
        for name in ("h", "a", "b", "c", "bh", "hk"):
            integ.addGlobalVariable(name, 0.0)
        for name, value in (("kT", float(system.kT_kj_mol)), ("first", 1.0), ("last", 1.0)):
            integ.addGlobalVariable(name, value)
        for j in range(self.per_call):
            integ.addPerDofVariable(f"xi{j}", 0.0)
        integ.beginIfBlock("first > 0")  # the opening half-kick: on-step v -> u
        integ.addComputePerDof("v", "v + 0.5*h*f/m")
        integ.endBlock()
        for j in range(self.per_call):
            integ.addComputePerDof("x", f"x + c*v + bh*sqrt(kT/m)*xi{j}")
            integ.addComputePerDof("v", f"a*v + b*sqrt(kT/m)*xi{j} + {'hk' if j == self.per_call - 1 else 'h'}*f/m")
        integ.beginIfBlock("last > 0")  # the forces at the final positions, for the caller
        integ.addComputePerDof("xi0", "f")
        integ.endBlock()
        self.integrator = integ
        # the calls' (step size ps, friction 1/ps), in order
        self.call_h = [(dt, gamma) for n, dt, gamma in seg for _ in range(n // self.per_call)]
        omm = system.create_system("nocutoff")
        self.hold = np.zeros((0, 4), dtype=int)
        if config.hold_torsions > 0:
            self.hold = system.backbone_torsions("phi_psi")
            for i, q in enumerate(self.hold):  # one force per torsion: its target is a global parameter
                f = openmm.CustomTorsionForce(f"0.5*k_hold*dd^2; dd = dt - 2*pi*floor(dt/(2*pi) + 0.5); "
                                              f"dt = theta - t0_{i}; pi = {np.pi!r}")
                f.addGlobalParameter("k_hold", float(config.hold_torsions))
                f.addGlobalParameter(f"t0_{i}", 0.0)
                f.addTorsion(*(int(a) for a in q), [])
                omm.addForce(f)
        self.context = openmm.Context(omm, integ, openmm.Platform.getPlatformByName(platform))

    def noise_shape(self, replicas: int) -> tuple[int, ...]:
        return (int(replicas), int(self.config.n_steps), self.system.n_atoms, 3)

    def _set_step(self, h: float, gamma: float, h_next: float) -> None:
        """Step size h (ps) and friction gamma (1/ps) of this call's substeps; the next call's step
        h_next (0: the finish ends)."""
        integ = self.integrator
        a = float(np.exp(-gamma * h))
        b = float(np.sqrt(-np.expm1(-2.0 * gamma * h)))
        for name, value in (("h", h), ("a", a), ("b", b), ("c", 0.5 * h * (1.0 + a)), ("bh", 0.5 * h * b),
                            ("hk", 0.5 * (h + h_next))):
            integ.setGlobalVariableByName(name, value)

    def __call__(self, x: np.ndarray, v: np.ndarray, noise: np.ndarray, return_forces: bool = False):
        """Finish each replica: x (R, A, 3) nm, v (R, A, 3) nm/ps, noise (R, n_steps, A, 3) -> (x, v),
        or (x, v, forces (R, A, 3) kJ/mol/nm at the final x) with ``return_forces``.
        Non-finite replicas are passed through untouched (their forces: NaN); the sampler's guard
        handles them."""
        if self.config.n_steps == 0:
            if return_forces:
                raise InputError("a finish of 0 steps computes no forces")
            return x, v
        xo, vo = np.array(x, dtype=np.float64), np.array(v, dtype=np.float64)
        fo = np.full_like(xo, np.nan)
        M, hs = self.per_call, self.call_h
        calls = len(hs)
        integ = self.integrator
        for r in range(len(x)):
            if not (np.isfinite(xo[r]).all() and np.isfinite(vo[r]).all()):
                continue
            self.context.setPositions(xo[r])
            self.context.setVelocities(vo[r])
            if len(self.hold):
                for i, t in enumerate(np.atleast_1d(dihedral_angles(xo[r], self.hold))):
                    self.context.setParameter(f"t0_{i}", float(t))
            prev = None
            for c in range(calls):
                step = (*hs[c], hs[c + 1][0] if c + 1 < calls else 0.0)
                if step != prev:
                    self._set_step(*step)
                    prev = step
                for j in range(M):
                    integ.setPerDofVariableByName(f"xi{j}", noise[r, c * M + j])
                integ.setGlobalVariableByName("first", 1.0 if c == 0 else 0.0)
                integ.setGlobalVariableByName("last", 1.0 if c == calls - 1 else 0.0)
                integ.step(1)
            st = self.context.getState(getPositions=True, getVelocities=True)
            xo[r] = state_array(st, "positions")
            vo[r] = state_array(st, "velocities")
            if return_forces:
                fo[r] = np.array(integ.getPerDofVariableByName("xi0"), dtype=np.float64)
        return (xo, vo, fo) if return_forces else (xo, vo)
