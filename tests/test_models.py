"""The molecular flow map: E(3) equivariance, permutations, identity at tau = 0, exact OU part."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from molflow.models import MapConfig, MolecularFlowMap, atom_features


@pytest.fixture(scope="module", params=["identity", "ou"])
def model(ala2, request):
    torch.manual_seed(0)
    scal, edges = atom_features(ala2)
    m = MolecularFlowMap(scal, edges, ala2.masses_amu, ala2.kT_kj_mol, ala2.friction_per_ps,
                         MapConfig(n_coefficients=3, n_latent=3, n_features=16, n_layers=2,
                                   base=request.param)).double()
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


def _assert_e3_equivariant(model, ala2, Q, shift):
    """Rotating/reflecting and shifting inputs and latent together moves the outputs along (float64)."""
    x, v, L, eps, tau = _inputs(ala2)
    shift = torch.tensor(shift, dtype=torch.float64)
    xt, vt = model(x, v, L, eps, tau)
    xr, vr = model(x @ Q.T + shift, v @ Q.T, L @ Q.T, eps @ Q.T, tau)  # latent rotated along
    torch.testing.assert_close(xr, xt @ Q.T + shift, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(vr, vt @ Q.T, atol=1e-10, rtol=1e-10)
    assert (xt - x).abs().max() > 1e-3  # and the map is not trivial


@pytest.mark.parametrize("reflect", [False, True])
def test_e3_equivariance(model, ala2, reflect):
    _assert_e3_equivariant(model, ala2, _random_orthogonal(3, reflect), [0.7, -1.3, 2.0])


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


def test_free_particle_part_is_exact_in_law(ala2):
    """With the network's correction switched off, one jump of a free atom has the exact OU law.

    Monte Carlo over fresh continuous-law coefficients and latents (n = 4000 jumps x 66 DOFs):
    Var(v_t) = (kT/m)(1 - e^{-2 gamma tau}); the relative SE of a variance from n' draws is
    sqrt(2/n'), and we allow 5 SE per atom.
    """
    from molflow.brownian import sample_coefficients

    torch.manual_seed(0)
    scal, edges = atom_features(ala2)
    m = MolecularFlowMap(scal, edges, ala2.masses_amu, ala2.kT_kj_mol, 1.0,
                         MapConfig(n_coefficients=3, n_latent=2, n_features=8, n_layers=1, base="ou")).double()
    with torch.no_grad():
        m.net.out.mix.weight.zero_()  # the correction vanishes: only the exact OU part remains
    n, tau = 4000, 0.5
    rng = np.random.default_rng(1)
    L = torch.as_tensor(np.moveaxis(sample_coefficients(rng, 3, tau, (n, 22, 3)), 0, 1))
    x = torch.as_tensor(ala2.positions_nm).expand(n, -1, -1)
    v = torch.zeros(n, 22, 3, dtype=torch.float64)
    _, vt = m(x, v, L, m.sample_latent(n), torch.full((n,), tau, dtype=torch.float64))
    expected = ala2.kT_kj_mol / ala2.masses_amu * (1 - np.exp(-2 * tau))
    ratio = vt.detach().var(dim=(0, 2)).numpy() / expected
    assert np.all(np.abs(ratio - 1) < 5 * np.sqrt(2 / (3 * n))), ratio


# ---------------------------------------------------------------- the optional e3nn backbone

@pytest.fixture(scope="module")
def e3nn_model(ala2):
    pytest.importorskip("e3nn", reason="the optional e3nn backbone needs e3nn (pip install e3nn, in the test extra)")
    old = torch.get_default_dtype()
    # e3nn bakes its Clebsch-Gordan constants into the tensor products in the default dtype at
    # construction; built in float32 and cast with .double(), they stay float32-accurate (~1e-8)
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        scal, edges = atom_features(ala2)
        m = MolecularFlowMap(scal, edges, ala2.masses_amu, ala2.kT_kj_mol, ala2.friction_per_ps,
                             MapConfig(n_coefficients=3, n_latent=3, n_features=8, n_layers=2, backbone="e3nn"))
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("reflect", [False, True])
def test_e3nn_backbone_e3_equivariance(e3nn_model, ala2, reflect):
    """Rotation or reflection plus translation of inputs and latent moves the outputs along (float64)."""
    from molflow.models.e3nn_backbone import E3nnBackbone

    assert isinstance(e3nn_model.net, E3nnBackbone)
    _assert_e3_equivariant(e3nn_model, ala2, _random_orthogonal(5, reflect), [-0.4, 1.1, 0.9])


def test_e3nn_backbone_identity_at_tau_zero(e3nn_model, ala2):
    x, v, _, eps, _ = _inputs(ala2)
    xt, vt = e3nn_model(x, v, torch.zeros(3, 3, 22, 3, dtype=torch.float64), eps, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(xt, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(vt, v, atol=1e-9, rtol=0)


def test_unknown_or_missing_backbone_is_a_clear_error(ala2, monkeypatch):
    import sys

    from molflow.errors import InputError

    with pytest.raises(InputError, match="unknown backbone 'egnn'"):
        MapConfig(backbone="egnn")
    monkeypatch.setitem(sys.modules, "e3nn", None)  # as if e3nn were not installed
    scal, edges = atom_features(ala2)
    with pytest.raises(ImportError, match="pip install e3nn"):
        MolecularFlowMap(scal, edges, ala2.masses_amu, ala2.kT_kj_mol, 1.0, MapConfig(backbone="e3nn"))
