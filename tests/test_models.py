"""The molecular flow map: E(3) equivariance, permutations, identity at tau = 0, exact OU part."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from molflow.models import MapConfig, MolecularFlowMap, atom_features, ou_terms


@pytest.fixture(scope="module")
def model(ala2):
    torch.manual_seed(0)
    scal, edges = atom_features(ala2)
    m = MolecularFlowMap(scal, edges, ala2.masses_amu, ala2.kT_kj_mol, ala2.friction_per_ps,
                         MapConfig(n_coefficients=3, n_latent=3, n_features=16, n_layers=2)).double()
    # make the correction non-trivial (the default init keeps it small but nonzero)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _inputs(ala2, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(ala2.positions_nm, dtype=torch.float64).expand(B, -1, -1) + 0.01 * torch.randn(B, 22, 3, generator=g, dtype=torch.float64)
    v = torch.randn(B, 22, 3, generator=g, dtype=torch.float64)
    tau = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)[:B]
    L = tau.sqrt()[:, None, None, None] * torch.randn(B, 3, 22, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 22, 3, generator=g, dtype=torch.float64)
    return x, v, L, eps, tau


def _random_orthogonal(seed, reflect):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] *= -1
    return torch.as_tensor(q, dtype=torch.float64)


@pytest.mark.parametrize("reflect", [False, True])
def test_e3_equivariance(model, ala2, reflect):
    x, v, L, eps, tau = _inputs(ala2)
    Q = _random_orthogonal(3, reflect)
    shift = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    xt, vt = model(x, v, L, eps, tau)
    xr, vr = model(x @ Q.T + shift, v @ Q.T, L @ Q.T, eps @ Q.T, tau)  # latent rotated along
    torch.testing.assert_close(xr, xt @ Q.T + shift, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(vr, vt @ Q.T, atol=1e-10, rtol=1e-10)
    assert (xt - x).abs().max() > 1e-3  # and the map is not trivial


def test_permutation_of_identical_atoms(model, ala2):
    """Swapping the three methyl hydrogens of ALA (atoms 11, 12, 13) permutes the outputs."""
    x, v, L, eps, tau = _inputs(ala2)
    perm = torch.arange(22)
    perm[[11, 12, 13]] = torch.tensor([12, 13, 11])
    xt, vt = model(x, v, L, eps, tau)
    xp, vp = model(x[:, perm], v[:, perm], L[:, :, perm], eps[:, :, perm], tau)
    torch.testing.assert_close(xp, xt[:, perm], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(vp, vt[:, perm], atol=1e-10, rtol=1e-10)


def test_identity_at_tau_zero(model, ala2):
    x, v, _, eps, _ = _inputs(ala2)
    L = torch.zeros(3, 3, 22, 3, dtype=torch.float64)  # Var L^(n) = tau/(2n+1) = 0 at tau = 0
    xt, vt = model(x, v, L, eps, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(xt, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(vt, v, atol=1e-9, rtol=0)


def test_ou_part_is_exact_in_law():
    """With the correction switched off the map is the exact free-particle OU transition.

    The Legendre projection + remainder must reproduce the OU transition covariance for every tau
    and N: Var(v_t) = (kT/m)(1 - e^{-2 gamma tau}) etc. Checked analytically from ou_terms (no Monte
    Carlo): projection variance + remainder variance = total, to float64 rounding.
    """
    gamma = 1.0
    for N in (0, 1, 3, 8):
        for tau in (0.01, 0.1, 1.0, 5.0):
            o = ou_terms(torch.tensor([tau], dtype=torch.float64), gamma, N)
            var_n = tau / (2 * np.arange(N) + 1)
            vv = float((o["b"][0].numpy() ** 2 * var_n).sum() + o["r_vx"] ** 2 + o["r_vv"] ** 2)
            exact_vv = (1 - np.exp(-2 * gamma * tau)) / (2 * gamma)  # per unit sigma^2
            assert abs(vv - exact_vv) < 1e-12 * max(1, tau), (N, tau)
            xx = float((o["a"][0].numpy() ** 2 * var_n).sum() + o["r_xx"] ** 2)
            e1, e2 = np.exp(-gamma * tau), np.exp(-2 * gamma * tau)
            exact_xx = (tau - 2 * (1 - e1) / gamma + (1 - e2) / (2 * gamma)) / gamma**2
            assert abs(xx - exact_xx) < 1e-12 * max(1, tau**3), (N, tau, xx, exact_xx)
    # more coefficients resolve more of the path: the remainder shrinks with N
    terms = [ou_terms(torch.tensor([0.5], dtype=torch.float64), gamma, N) for N in (1, 3, 8)]
    rem = [float(o["r_vx"] ** 2 + o["r_vv"] ** 2) for o in terms]  # remainder variance of v_t
    assert rem[0] > rem[1] > rem[2]
