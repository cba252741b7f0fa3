"""The physical finish (molflow/finish.py) on a toy: it hands a disturbed stiff bond back to its
Boltzmann law, leaves the slow coordinate's law alone, and does not move the slow coordinate's
transition rate beyond its counting error (issue 17).

The toy: a "carbon" (12 amu) in a 1-D double well along x (barrier 2 kT, minima at +-0.1 nm,
harmonic in y and z) carrying a "hydrogen" (1.008 amu) on an amber C-H bond (r0 0.109 nm,
k 284512 kJ/mol/nm^2; period ~11 fs, as stiff as alanine dipeptide's stiffest modes).
"""
from __future__ import annotations

import numpy as np
import openmm

from molflow.finish import FinishConfig, LangevinFinish
from molflow.units import BOLTZMANN_KJ_MOL_K

T = 300.0
KT = BOLTZMANN_KJ_MOL_K * T
EB, A, KC = 2 * KT, 0.1, 500.0  # barrier (kJ/mol), well position (nm), y/z spring (kJ/mol/nm^2)
R0, KB = 0.109, 284512.0
MASSES = (12.0, 1.008)


class Toy:
    """What LangevinFinish needs of a molecular system."""

    n_atoms = 2
    kT_kj_mol = KT

    def create_system(self, kind: str = "nocutoff") -> openmm.System:
        s = openmm.System()
        for m in MASSES:
            s.addParticle(m)
        well = openmm.CustomExternalForce(f"{EB}*((x/{A})^2-1)^2 + 0.5*{KC}*(y^2+z^2)")
        well.addParticle(0, [])
        s.addForce(well)
        bond = openmm.HarmonicBondForce()
        bond.addBond(0, 1, R0, KB)
        s.addForce(bond)
        return s


def _exact_x(n: int, rng) -> np.ndarray:
    """n exact draws of the carbon's x from exp(-V(x)/kT) (inverse CDF on a fine grid)."""
    g = np.linspace(-0.25, 0.25, 20001)
    p = np.exp(-EB * ((g / A) ** 2 - 1) ** 2 / KT)
    c = np.cumsum(p)
    return np.interp(rng.random(n), c / c[-1], g)


def _exact_bond_moments() -> tuple[float, float]:
    """Mean and std (nm) of the bond length under p(r) ~ r^2 exp(-KB (r - R0)^2 / 2kT)."""
    r = np.linspace(R0 - 0.03, R0 + 0.03, 20001)
    p = r ** 2 * np.exp(-KB * (r - R0) ** 2 / (2 * KT))
    p /= p.sum()
    m = (r * p).sum()
    return float(m), float(np.sqrt(((r - m) ** 2 * p).sum()))


def _states(n: int, rng, stretch: float) -> tuple[np.ndarray, np.ndarray]:
    """Carbon at equilibrium, hydrogen at ``stretch`` x R0 in a random direction, Maxwell-Boltzmann v."""
    x = np.zeros((n, 2, 3))
    x[:, 0, 0] = _exact_x(n, rng)
    x[:, 0, 1:] = rng.normal(0, np.sqrt(KT / KC), (n, 2))
    u = rng.normal(size=(n, 3))
    x[:, 1] = x[:, 0] + stretch * R0 * u / np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.normal(size=(n, 2, 3)) * np.sqrt(KT / np.array(MASSES))[None, :, None]
    return x, v


def test_finish_restores_a_stretched_bond_and_leaves_the_slow_coordinate_alone():
    n = 1000
    rng = np.random.default_rng(11)
    x, v = _states(n, rng, stretch=1.1)  # 10% too long: what a loose map leaves behind
    fin = LangevinFinish(Toy(), FinishConfig(n_steps=20, friction_per_ps=300.0))
    xf, vf = fin(x, v, rng.normal(size=fin.noise_shape(n)))
    r = np.linalg.norm(xf[:, 1] - xf[:, 0], axis=1)
    mean, std = _exact_bond_moments()
    # tolerances: 4 standard errors of n independent draws (se of a mean std/sqrt(n), of a std
    # ~ std/sqrt(2n)); at gamma = 300/ps the 0.011 nm excess decays as exp(-gamma t / 2) = e^-3 in
    # 20 fs to ~0.0005 nm of amplitude, which adds < 2% to the 0.003 nm thermal spread
    assert abs(r.mean() - mean) < 4 * std / np.sqrt(n)
    assert abs(r.std() / std - 1) < 4 / np.sqrt(2 * n) + 0.02
    assert abs(np.linalg.norm(x[:, 1] - x[:, 0], axis=1).mean() - mean) > 30 * std / np.sqrt(n)  # it was off
    # kinetic energy per degree of freedom back to kT/2 (velocities re-drawn: e^{-6} memory left)
    ke = 0.5 * (np.array(MASSES)[None, :, None] * vf ** 2).sum(axis=(1, 2)) / 6
    assert abs(ke.mean() / (0.5 * KT) - 1) < 4 * np.sqrt(2 / 6) / np.sqrt(n)
    # the slow coordinate: 20 fs moves the carbon ~0.005 nm, nothing next to the 0.2 nm between the
    # wells; its law (fraction in the right well, <x^2>) stays the exact one
    dx = xf[:, 0, 0] - x[:, 0, 0]
    assert np.sqrt((dx ** 2).mean()) < 0.01
    assert abs((xf[:, 0, 0] > 0).mean() - 0.5) < 4 * 0.5 / np.sqrt(n)


def _flips(finish: LangevinFinish | None, segments: int, tau_steps: int, seed: int) -> int:
    """Core-set flips of the carbon's well (|x| > A/2 with hysteresis), seen every segment, of one
    Langevin chain (gamma 1/ps, 1 fs) with the finish after every segment (or none)."""
    integ = openmm.LangevinMiddleIntegrator(T, 1.0, 0.001)
    integ.setRandomNumberSeed(seed)
    ctx = openmm.Context(Toy().create_system(), integ, openmm.Platform.getPlatformByName("Reference"))
    rng = np.random.default_rng(seed)
    x, v = _states(1, rng, stretch=1.0)
    ctx.setPositions(x[0])
    ctx.setVelocities(v[0])
    state, flips = 0, 0
    for _ in range(segments):
        integ.step(tau_steps)
        st = ctx.getState(getPositions=True, getVelocities=True)
        xs = st.getPositions(asNumpy=True)._value
        if finish is not None:
            xf, vf = finish(xs[None], st.getVelocities(asNumpy=True)._value[None],
                            rng.normal(size=finish.noise_shape(1)))
            ctx.setPositions(xf[0])
            ctx.setVelocities(vf[0])
            xs = xf[0]
        side = 1 if xs[0, 0] > A / 2 else (-1 if xs[0, 0] < -A / 2 else 0)
        if side and side != state:
            flips += state != 0
            state = side
    return flips


def test_finish_keeps_the_slow_rate_within_its_counting_error():
    segments = 6000  # 3 ns of chain each: ~600 flips, so 4 sigma is ~ +-23% of the count
    fin = LangevinFinish(Toy(), FinishConfig(n_steps=20, friction_per_ps=300.0))
    n_plain = _flips(None, segments, 500, seed=5)
    n_fin = _flips(fin, segments, 500, seed=6)
    assert n_plain > 400  # enough flips for the comparison to mean something
    # flip counts of two independent chains: Poisson-like, var ~ N each; 4 sigma of the difference.
    # The finish adds 20 fs of (damped) motion per 500 fs: its own effect is a few % at most.
    assert abs(n_fin - n_plain) < 4 * np.sqrt(n_fin + n_plain), (n_plain, n_fin)


def test_torsion_hold_keeps_phi_psi_while_bonds_relax(ala2):
    """The finish's torsion hold (FinishConfig.hold_torsions) on alanine dipeptide: 16 copies of the
    minimised structure with every atom displaced by N(0, 0.01 nm) per coordinate (strained bonds,
    as a map leaves them), 60 steps at 100/ps. Held at 2000 kJ/mol/rad^2 the restraint's thermal
    width is sqrt(kT/k) = 0.035 rad, so phi and psi end within 0.15 rad RMS of where the finish
    started; free, the strain's relaxation moves them more (measured: 0.043 rad held, 0.20 free).
    Bonds relax to the same spread either way (within 10%: the hold touches torsions only)."""
    from molflow.evaluation.dihedrals import phi_psi

    rng = np.random.default_rng(4)
    x = ala2.positions_nm[None] + 0.01 * rng.standard_normal((16, ala2.n_atoms, 3))
    v = np.zeros_like(x)
    start = np.array(phi_psi(x, ala2))
    b = np.asarray(ala2.bonds).reshape(-1, 2)
    out = {}
    for hold in (0.0, 2000.0):
        fin = LangevinFinish(ala2, FinishConfig(60, 100.0, hold_torsions=hold))
        xf, _ = fin(x, v, np.random.default_rng(5).standard_normal(fin.noise_shape(16)))
        d = np.angle(np.exp(1j * (np.array(phi_psi(xf, ala2)) - start)))
        out[hold] = (float(np.sqrt((d ** 2).mean())), np.linalg.norm(xf[:, b[:, 0]] - xf[:, b[:, 1]], axis=-1).std(0).mean())
    assert out[2000.0][0] < 0.15 and out[2000.0][0] < 0.5 * out[0.0][0], out
    assert abs(out[2000.0][1] / out[0.0][1] - 1) < 0.1, out
    assert FinishConfig(60, 100.0, hold_torsions=2000.0).to_attrs()["finish_hold_torsions_kj_mol_rad2"] == 2000.0
