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
    """``n_steps`` Langevin steps (0: no finish) of ``timestep_fs`` at ``friction_per_ps`` (1/ps).

    ``hold_torsions`` > 0 (kJ/mol/rad^2) adds, during the finish only, a harmonic restraint holding every
    backbone phi and psi at the value the jump produced: the finish then re-thermalises bonds and angles
    *given* the slow coordinates, which are the map's to set. Free (0), the finish measurably undoes part
    of a map's torsion change (a map that moves psi partly by straining the atoms defining it; issue 17)."""

    n_steps: int = 0
    friction_per_ps: float = 300.0
    timestep_fs: float = 1.0
    hold_torsions: float = 0.0  # kJ/mol/rad^2: hold backbone phi/psi at the jump's values (0: free)

    def __post_init__(self):
        if int(self.n_steps) != self.n_steps or self.n_steps < 0:
            raise InputError(f"finish steps must be a whole number >= 0, not {self.n_steps!r}")
        if self.n_steps and (self.friction_per_ps <= 0 or self.timestep_fs <= 0):
            raise InputError("finish friction (1/ps) and timestep (fs) must be positive")
        if self.hold_torsions < 0:
            raise InputError("finish torsion hold (kJ/mol/rad^2) must be >= 0")

    @property
    def duration_ps(self) -> float:
        return self.n_steps * self.timestep_fs / 1000.0

    def to_attrs(self) -> dict[str, Any]:
        return {"finish_steps": int(self.n_steps), "finish_friction_per_ps": float(self.friction_per_ps),
                "finish_timestep_fs": float(self.timestep_fs), "finish_hold_torsions_kj_mol_rad2": float(self.hold_torsions)}


MAX_STEPS_PER_CALL = 10


class LangevinFinish:
    """BAOAB at high friction with the molecule's force field, on OpenMM's Reference platform
    (fastest for one small molecule here); noise supplied per call: ``(R, n_steps, A, 3)`` standard
    normals.

    Merged kicks, as in the recording engine (:mod:`molflow.md.integrator`): the context's velocity
    holds u = v + dt/2 f/m, and one BAOAB step is two per-DOF computations,
    x <- x + dt/2 (1 + a) u + dt/2 b sqrt(kT/m) xi and u <- a u + b sqrt(kT/m) xi + dt f(x)/m
    (a = exp(-gamma dt), b = sqrt(1 - a^2)); one half-kick opens the finish and one closes it.
    Algebraically the BAOAB step; OpenMM's Reference ``CustomIntegrator`` costs per per-DOF
    computation and per per-DOF variable, so the noise goes in ``MAX_STEPS_PER_CALL`` steps at a
    time (measured once: 3.3 against 4.4 ms per replica for 60 steps, against this class at commit
    05d3652 with one variable per step, in one process).
    """

    def __init__(self, system, config: FinishConfig, platform: str = "Reference"):
        import openmm

        self.config = config
        self.system = system
        n, dt = int(config.n_steps), config.timestep_fs / 1000.0
        self.per_call = max(m for m in range(1, MAX_STEPS_PER_CALL + 1) if n % m == 0) if n else 1
        a = float(np.exp(-config.friction_per_ps * dt))
        b = float(np.sqrt(-np.expm1(-2.0 * config.friction_per_ps * dt)))
        integ = openmm.CustomIntegrator(dt * self.per_call)
        for name, value in (("h", dt), ("a", a), ("b", b), ("c", 0.5 * dt * (1.0 + a)), ("bh", 0.5 * dt * b),
                            ("kT", float(system.kT_kj_mol)), ("first", 1.0), ("last", 1.0)):
            integ.addGlobalVariable(name, value)
        for j in range(self.per_call):
            integ.addPerDofVariable(f"xi{j}", 0.0)
        integ.beginIfBlock("first > 0")  # the opening half-kick: on-step v -> u
        integ.addComputePerDof("v", "v + 0.5*h*f/m")
        integ.endBlock()
        for j in range(self.per_call):
            integ.addComputePerDof("x", f"x + c*v + bh*sqrt(kT/m)*xi{j}")
            integ.addComputePerDof("v", f"a*v + b*sqrt(kT/m)*xi{j} + h*f/m")
        integ.beginIfBlock("last > 0")  # the closing half-kick: u -> on-step v
        integ.addComputePerDof("v", "v - 0.5*h*f/m")
        integ.endBlock()
        self.integrator = integ
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

    def __call__(self, x: np.ndarray, v: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Finish each replica: x (R, A, 3) nm, v (R, A, 3) nm/ps, noise (R, n_steps, A, 3) -> (x, v).
        Non-finite replicas are passed through untouched (the sampler's guard handles them)."""
        if self.config.n_steps == 0:
            return x, v
        xo, vo = np.array(x, dtype=np.float64), np.array(v, dtype=np.float64)
        M, calls = self.per_call, self.config.n_steps // self.per_call
        integ = self.integrator
        for r in range(len(x)):
            if not (np.isfinite(xo[r]).all() and np.isfinite(vo[r]).all()):
                continue
            self.context.setPositions(xo[r])
            self.context.setVelocities(vo[r])
            if len(self.hold):
                for i, t in enumerate(np.atleast_1d(dihedral_angles(xo[r], self.hold))):
                    self.context.setParameter(f"t0_{i}", float(t))
            for c in range(calls):
                for j in range(M):
                    integ.setPerDofVariableByName(f"xi{j}", noise[r, c * M + j])
                integ.setGlobalVariableByName("first", 1.0 if c == 0 else 0.0)
                integ.setGlobalVariableByName("last", 1.0 if c == calls - 1 else 0.0)
                integ.step(1)
            st = self.context.getState(getPositions=True, getVelocities=True)
            xo[r] = state_array(st, "positions")
            vo[r] = state_array(st, "velocities")
        return xo, vo

