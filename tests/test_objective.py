"""The whitened internal-coordinate objective (training/objective.py): geometry, wrapping, properness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from molflow.errors import InputError
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


def test_torsion_term_prefers_the_true_torsion_spread(ala2):
    """The backbone-torsion CRPS (torsion_weight) is proper where it is meant to act: alanine dipeptide
    with psi's atoms rotated by N(0, s^2), targets at spread s; samples with the right spread score
    lower than samples 5x too narrow (the failure it fixes) or 3x too wide. Only the torsion term is
    compared (the same score without it is subtracted). 300 items x m = 4, fixed seed: the expected
    gaps (~0.2 and ~0.3 of s in CRPS) exceed 10 standard errors of the mean (~0.02 s)."""
    g = torch.Generator().manual_seed(1)
    d = ala2.dihedral_indices()
    quads = np.asarray([*d["phi"], *d["psi"]])
    i, j = int(d["psi"][0][1]), int(d["psi"][0][2])  # rotate about CA-C: psi changes, phi does not
    side = _downstream(ala2.bonds, i, j)
    x0 = torch.as_tensor(ala2.positions_nm, dtype=torch.float64)
    s = 0.3  # rad

    def draw(n, spread):
        out = x0.expand(n, *x0.shape).clone()
        axis = (x0[j] - x0[i]) / (x0[j] - x0[i]).norm()
        for k, t in enumerate(spread * torch.randn(n, generator=g, dtype=torch.float64)):
            r = x0[side] - x0[j]
            c, sn = torch.cos(t), torch.sin(t)
            out[k, side] = x0[j] + r * c + torch.cross(axis.expand_as(r), r, dim=1) * sn + axis * (r @ axis)[:, None] * (1 - c)
        return out

    frames = draw(1000, 1.0).numpy()
    with_t = WhitenedInternalScore(ala2.bonds, frames, 1.0, quads, torsion_weight=1.0)
    without = WhitenedInternalScore(ala2.bonds, frames, 1.0)
    target = draw(300, s)
    term = {}
    for f in (0.2, 1, 3):
        pred = torch.stack([draw(300, f * s) for _ in range(4)])
        term[f] = float((_score(with_t, pred, target) - _score(without, pred, target)).mean())
    assert term[1] < term[0.2] and term[1] < term[3], term


def _downstream(bonds, i, j):
    """Atoms on j's side of the bond i-j (j included)."""
    adj: dict[int, set[int]] = {}
    for a, b in np.asarray(bonds).reshape(-1, 2):
        adj.setdefault(int(a), set()).add(int(b))
        adj.setdefault(int(b), set()).add(int(a))
    seen, stack = {j}, [j]
    while stack:
        for n in adj[stack.pop()] - {i} - seen:
            seen.add(n)
            stack.append(n)
    return sorted(seen)


def test_torsion_sets_of_alanine_dipeptide(ala2):
    """torsion_set "phi_psi": the two backbone torsions; "backbone": all 12 proper dihedrals about the
    N-CA and CA-C bonds (3 x 2 substituents on each side), phi and psi among them; others refused."""
    from molflow.errors import InputError

    d = ala2.dihedral_indices()
    pp = ala2.backbone_torsions("phi_psi")
    assert [tuple(q) for q in pp] == [tuple(d["phi"][0]), tuple(d["psi"][0])]
    bb = ala2.backbone_torsions("backbone")
    assert len(bb) == 12 and {frozenset((q[1], q[2])) for q in bb} == {frozenset((q[1], q[2])) for q in pp}
    keys = {tuple(q) for q in bb} | {tuple(q[::-1]) for q in bb}
    assert tuple(pp[0]) in keys and tuple(pp[1]) in keys
    with pytest.raises(InputError, match="torsion_set"):
        ala2.backbone_torsions("all")


def test_torsion_only_objective_scores_only_the_torsions(ala2):
    """``torsion_crps`` (torsions_only): a rigid translation of the predictions (Cartesian features
    change, no internal coordinate does) leaves it unchanged, while the full score changes; bending
    phi changes it; a molecule without phi/psi is refused."""
    g = torch.Generator().manual_seed(2)
    quads = ala2.backbone_torsions("phi_psi")
    x0 = torch.as_tensor(ala2.positions_nm, dtype=torch.float64)
    frames = (x0 + 0.01 * torch.randn(500, 22, 3, generator=g, dtype=torch.float64)).numpy()
    only = WhitenedInternalScore(ala2.bonds, frames, 1.0, quads, torsions_only=True)
    full = WhitenedInternalScore(ala2.bonds, frames, 1.0, quads, torsion_weight=1.0)
    target = x0 + 0.01 * torch.randn(50, 22, 3, generator=g, dtype=torch.float64)
    pred = torch.stack([x0 + 0.01 * torch.randn(50, 22, 3, generator=g, dtype=torch.float64) for _ in range(2)])
    shifted = pred.clone()
    shifted[..., 2] += 0.05  # a rigid translation: no internal coordinate changes, Cartesian features do
    def with_cart(ws, p):  # Cartesian features = the positions themselves
        return ws(p.reshape(2, 50, -1), target.reshape(50, -1), p, target)

    torch.testing.assert_close(with_cart(only, pred), with_cart(only, shifted))
    assert not torch.allclose(with_cart(full, pred), with_cart(full, shifted))
    side = _downstream(ala2.bonds, int(quads[0][1]), int(quads[0][2]))
    bent = pred.clone()
    bent[..., side, :] += 0.03  # moves phi's atoms off their torsion
    assert not torch.allclose(with_cart(only, pred), with_cart(only, bent))
    with pytest.raises(InputError, match="phi/psi"):
        WhitenedInternalScore(ala2.bonds, frames, 1.0, None, torsions_only=True)
