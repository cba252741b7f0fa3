"""An exact finish for importance-weighted samples: annealed importance sampling (Neal 2001) with
Hamiltonian Monte Carlo moves under the real energy (issue 19, lever 3).

Samples x_0 ~ q with a known log density log q(x_0) (the Boltzmann map's exact Jacobian weight,
:mod:`.reweight`) are carried through targets in which a part V of the energy U (in kT; V = U, or
only the stiff bonded terms of a molecule) is tempered, gamma_j(x) = exp(-U(x) - (beta_j - 1) V(x)),
0 < beta_0 < ... < beta_J = 1:

    log w = -U(x_0) - (beta_0 - 1) V(x_0) - log q(x_0)
            + sum_{j=1..J} -(beta_j - beta_{j-1}) V(x_{j-1}),
    x_j ~ K_j(x_{j-1}, .)   (``n_moves`` HMC moves that leave gamma_j invariant),

and (x_J, w) is a properly weighted sample of exp(-U/kT): self-normalised averages are consistent
and E[w] is the partition-function ratio, whatever the map and however few moves (AIS's extended
space argument: the weights are exact, the moves only lower their variance). With beta_0 = 1 and
J = 0 it is plain importance sampling. Starting with V hotter (beta_0 < 1) lets a proposal whose
stiff coordinates are too wide (strained bonds) start from a target it matches, and the moves cool
those coordinates down. Temper only what the proposal gets too wide: a start target wider than the
proposal in any coordinate gives weights of infinite variance (measured on the toy: tempering the
whole energy when only the stiff coordinates were too wide lowered the ESS).

Everything here is generic: ``energy_fn(x) -> (U, grad U, V, grad V)`` (U, V in kT: (B,); grads
(B, D)) of flat float64 samples (B, D); ``inv_mass`` (D,) preconditions HMC (for molecules 1/mass per coordinate, so the
leapfrog step is a time step in ps with U in kT units and masses in amu scaled by kT). Cost is
counted in energy-and-gradient evaluations (``n_evaluations``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..errors import InputError
from ..evaluation.metrics import kish_ess
from ..md.integrator import state_array
from .reweight import self_normalise

#: what a molecular finish may temper (MolecularEnergy)
TEMPERED = ("bonded", "all")

EnergyFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


@dataclasses.dataclass
class AnnealSettings:
    """The finish: ``n_temperatures`` tempered targets from ``beta_start`` to 1 (geometric in beta;
    0 temperatures: no finish), ``n_moves`` HMC moves per target, each ``leapfrog_steps`` leapfrog
    steps of ``step_size`` (in the units of ``inv_mass``: ps for molecules), the step scaled by
    beta^-1/2 at hotter targets. ``tempered`` says which energy terms V a molecular finish tempers."""

    n_temperatures: int = 0
    beta_start: float = 1.0
    n_moves: int = 1
    leapfrog_steps: int = 10
    step_size: float = 0.1
    tempered: str = "bonded"  # on a molecule (MolecularEnergy): "bonded" (bonds, angles) or "all" terms

    def __post_init__(self):
        if self.n_temperatures < 0 or self.n_moves < 1 or self.leapfrog_steps < 1 or self.step_size <= 0:
            raise InputError("annealing: temperatures must be >= 0, and moves, leapfrog steps and the step "
                             "size positive")
        if not 0.0 < self.beta_start <= 1.0:
            raise InputError(f"annealing: beta_start must be in (0, 1], not {self.beta_start!r}")
        if self.tempered not in TEMPERED:
            raise InputError(f"annealing: tempered must be one of {TEMPERED}, not {self.tempered!r}")

    def betas(self) -> np.ndarray:
        """beta_0 .. beta_J (J = n_temperatures; beta_J = 1)."""
        if self.n_temperatures == 0:
            return np.ones(1)
        return np.geomspace(self.beta_start, 1.0, self.n_temperatures + 1)


@dataclasses.dataclass
class AnnealResult:
    x: np.ndarray  # (B, D) final samples
    log_weights: np.ndarray  # (B,) unnormalised log importance weights for exp(-U/kT)
    acceptance: np.ndarray  # (J,) mean HMC acceptance per target
    ess_fraction: np.ndarray  # (J+1,) Kish ESS / B of the running weights after each target
    n_evaluations: int  # energy-and-gradient evaluations per sample
    energies: tuple  # energy_fn(x) at the final samples (U, grad U, V, grad V)


def hmc_move(x: np.ndarray, e: tuple, energy_fn: EnergyFn, beta: float, step: float, n_leapfrog: int,
             inv_mass: np.ndarray, rng: np.random.Generator):
    """One HMC move per sample for exp(-U - (beta - 1) V) (``e`` = energy_fn(x)): fresh momenta
    p ~ N(0, M), ``n_leapfrog`` leapfrog steps, Metropolis test on the energy + p M^-1 p / 2.
    Returns the new x, its energy tuple and the acceptance flags (B,). Rejected or non-finite
    proposals keep x."""
    def pot(t):  # (energy (B,), gradient (B, D)) of the target at beta
        return t[0] + (beta - 1.0) * t[2], t[1] + (beta - 1.0) * t[3]

    p = rng.standard_normal(x.shape) / np.sqrt(inv_mass)
    h, g = pot(e)
    h0 = h + 0.5 * (p * p * inv_mass).sum(-1)
    xn, en = x, e
    p = p - 0.5 * step * g
    for k in range(n_leapfrog):
        xn = xn + step * inv_mass * p
        en = energy_fn(xn)
        h, g = pot(en)
        if k < n_leapfrog - 1:
            p = p - step * g
    p = p - 0.5 * step * g
    h1 = h + 0.5 * (p * p * inv_mass).sum(-1)
    log_acc = np.where(np.isfinite(h1) & np.isfinite(g).all(-1), h0 - h1, -np.inf)
    accept = np.log(rng.uniform(size=len(x))) < log_acc
    keep = lambda new, old: np.where(accept.reshape(-1, *[1] * (np.ndim(old) - 1)), new, old)  # noqa: E731
    return keep(xn, x), tuple(keep(a, b) for a, b in zip(en, e)), accept


def anneal(x0: np.ndarray, log_q: np.ndarray, energy_fn: EnergyFn, settings: AnnealSettings,
           inv_mass: np.ndarray | None = None, rng: np.random.Generator | None = None,
           keep: np.ndarray | None = None) -> AnnealResult:
    """Annealed importance sampling from samples ``x0`` (B, D) of a proposal with log density
    ``log_q`` (B,) to exp(-U/kT) (module docstring). ``keep`` (B,) False marks samples whose weight
    is zero already (e.g. failed invertibility): they are carried along with weight zero."""
    rng = rng or np.random.default_rng()
    x = np.array(x0, dtype=np.float64)
    inv_mass = np.ones(x.shape[1]) if inv_mass is None else np.broadcast_to(np.asarray(inv_mass, np.float64), x.shape[1:])
    betas = settings.betas()
    e = energy_fn(x)
    log_w = -e[0] - (betas[0] - 1.0) * e[2] - np.asarray(log_q, dtype=np.float64)
    if keep is not None:
        log_w = np.where(keep, log_w, -np.inf)
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    ess = [_ess_fraction(log_w)]
    acc = []
    n_eval = 1
    for j in range(1, len(betas)):
        log_w = log_w - (betas[j] - betas[j - 1]) * e[2]
        log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
        step = settings.step_size / np.sqrt(betas[j])
        a = []
        for _ in range(settings.n_moves):
            x, e, ok = hmc_move(x, e, energy_fn, float(betas[j]), step, settings.leapfrog_steps, inv_mass, rng)
            a.append(ok.mean())
            n_eval += settings.leapfrog_steps
        acc.append(float(np.mean(a)) if a else float("nan"))
        ess.append(_ess_fraction(log_w))
    return AnnealResult(x=x, log_weights=log_w, acceptance=np.asarray(acc), ess_fraction=np.asarray(ess),
                        n_evaluations=n_eval, energies=e)


def _ess_fraction(log_w: np.ndarray) -> float:
    return kish_ess(self_normalise(log_w)) / len(log_w)


#: the force-field terms an annealed finish tempers on a molecule: the stiff bonded ones (a map's
#: strain sits in its bond lengths and angles; torsions and non-bonded terms stay at full strength)
STIFF_FORCES = ("HarmonicBondForce", "HarmonicAngleForce")


class MolecularEnergy:
    """``energy_fn`` for :func:`anneal` on a molecule: flat centred positions (B, 3A) nm ->
    (U/kT, grad U/kT, V/kT, grad V/kT) with V the :data:`STIFF_FORCES` terms (``tempered="bonded"``)
    or V = U (``"all"``), from an OpenMM
    single-molecule NoCutoff context (the reference energy; one sample at a time). ``inv_mass`` is
    kT/m per coordinate, so a leapfrog step is a time step in ps (momenta in units of kT·ps/nm).
    The default platform is Reference: double precision keeps HMC's energy differences, and with
    them the Metropolis test, exact (single-precision forces fail a finite-difference check)."""

    def __init__(self, system, platform: str = "Reference", tempered: str = "bonded"):
        import openmm

        from ..md.engine import platform_object, platform_properties

        if tempered not in TEMPERED:
            raise InputError(f"tempered must be one of {TEMPERED}, not {tempered!r}")
        self.tempered = tempered

        omm = system.create_system("nocutoff")
        names = set()
        for f in omm.getForces():
            stiff = type(f).__name__ in STIFF_FORCES
            f.setForceGroup(1 if stiff else 0)
            names.add(type(f).__name__)
        if not names & set(STIFF_FORCES):
            raise ValueError("the force field has no harmonic bond or angle force to temper")
        self._ctx = openmm.Context(omm, openmm.VerletIntegrator(0.001), platform_object(platform),
                                   platform_properties(platform, 1, False))
        self.kT = float(system.kT_kj_mol)
        self.n_atoms = int(system.n_atoms)
        self.inv_mass = np.repeat(self.kT / np.asarray(system.masses_amu, dtype=np.float64), 3)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        B = len(x)
        u, v = np.full(B, np.inf), np.full(B, np.inf)
        gu, gv = np.zeros_like(x), np.zeros_like(x)
        for i in range(B):
            xi = x[i].reshape(self.n_atoms, 3)
            if not np.isfinite(xi).all():
                continue
            self._ctx.setPositions(xi)
            for groups, e, g in (((0, 1), u, gu), ((1,), v, gv))[: 1 if self.tempered == "all" else 2]:
                st = self._ctx.getState(getEnergy=True, getForces=True, groups=set(groups))
                e[i] = st.getPotentialEnergy()._value / self.kT
                g[i] = -state_array(st, "forces").ravel() / self.kT
        return (u, gu, u, gu) if self.tempered == "all" else (u, gu, v, gv)
