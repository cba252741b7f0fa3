"""The whitened internal-coordinate objective (training/objective.py): geometry, wrapping, properness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from molflow.systems import topology_terms
from molflow.training.objective import InternalCoordinates, WhitenedInternalScore


def test_topology_terms_of_a_chain_and_a_branch():
    """Butane's carbons (0-1-2-3): 3 bonds, 2 angles, 1 dihedral; a star centre with 3 arms: 3 angles."""
    b, a, d = topology_terms(np.array([[0, 1], [1, 2], [2, 3]]), 4)
    assert len(b) == 3 and sorted(map(tuple, a)) == [(0, 1, 2), (1, 2, 3)] and [tuple(x) for x in d] == [(0, 1, 2, 3)]
    _, a, d = topology_terms(np.array([[0, 1], [0, 2], [0, 3]]), 4)
    assert len(a) == 3 and len(d) == 0


def test_internal_coordinates_match_mdtraj(ala2):
    """Angles and dihedrals of alanine dipeptide agree with mdtraj's to 1e-5 rad (float64)."""
    import mdtraj

    rng = np.random.default_rng(0)
    x = ala2.positions_nm[None] + 0.01 * rng.standard_normal((3, ala2.n_atoms, 3))
    ic = InternalCoordinates(ala2.bonds, ala2.n_atoms)
    lengths, angles, dih = ic(torch.as_tensor(x))
    traj = mdtraj.Trajectory(x, mdtraj.Topology.from_openmm(ala2.topology))
    np.testing.assert_allclose(lengths.numpy(), mdtraj.compute_distances(traj, ic.bonds.numpy()), atol=1e-6)
    np.testing.assert_allclose(angles.numpy(), mdtraj.compute_angles(traj, ic.angles.numpy()), atol=1e-5)
    got, ref = dih.numpy(), mdtraj.compute_dihedrals(traj, ic.dihedrals.numpy())
    np.testing.assert_allclose(np.angle(np.exp(1j * (got - ref))), 0.0, atol=1e-5)


def _score(ws, x_pred, x_target):
    m, B = x_pred.shape[:2]
    cart_p = x_pred.reshape(m, B, -1) * 0  # isolate the internal-coordinate terms
    return ws(cart_p, x_target.reshape(B, -1) * 0, x_pred, x_target)


def test_dihedral_crps_wraps_around_pi():
    """Predictions at +pi - e and a target at -pi + e are 2e apart, not 2pi - 2e: the score stays small."""
    x = np.array([[0, 0, 0], [0.15, 0, 0], [0.2, 0.14, 0], [0.35, 0.14, 0.0]], dtype=np.float64)  # planar, trans
    ws = WhitenedInternalScore(np.array([[0, 1], [1, 2], [2, 3]]), x[None].repeat(4, 0), crps_weight=1.0)

    def rotated(angle):  # move atom 3 about the 1-2 axis to dihedral = angle
        t = torch.as_tensor(x).clone()
        axis = (t[2] - t[1]) / (t[2] - t[1]).norm()
        r = t[3] - t[2]
        c, s = math.cos(angle - math.pi), math.sin(angle - math.pi)
        t[3] = t[2] + r * c + torch.cross(axis, r, dim=0) * s + axis * (axis @ r) * (1 - c)
        return t

    e = 0.05
    near = _score(ws, torch.stack([rotated(math.pi - e), rotated(math.pi - e)])[:, None], rotated(-math.pi + e)[None])
    far = _score(ws, torch.stack([rotated(0.0), rotated(0.0)])[:, None], rotated(-math.pi + e)[None])
    assert float(near) < 0.1 * float(far)


def test_whitened_score_prefers_the_true_bond_spread():
    """Properness where it matters: targets from N(mu, s^2) bond lengths; samples with the right spread
    score lower on average than samples 3x too wide or 3x too narrow. 400 items x m = 4 with a fixed
    seed: the expected gaps (~0.3 and ~0.2 in whitened units) are > 10 standard errors of the mean."""
    g = torch.Generator().manual_seed(0)
    bonds = np.array([[0, 1]])
    base = torch.tensor([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0]], dtype=torch.float64)
    s = 0.003

    def draw(n, spread):
        x = base.expand(n, 2, 3).clone()
        x[:, 1, 0] += spread * torch.randn(n, generator=g, dtype=torch.float64)
        return x

    ws = WhitenedInternalScore(bonds, draw(2000, s).numpy(), crps_weight=1.0)
    target = draw(400, s)
    scores = {f: float(_score(ws, torch.stack([draw(400, f * s) for _ in range(4)]), target).mean()) for f in (1 / 3, 1, 3)}
    assert scores[1] < scores[3] and scores[1] < scores[1 / 3], scores
