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
    """With the network's correction switched off, one jump of a free atom has the exact OU law of (x, v).

    Free Langevin dynamics (friction g, no force, s^2 = 2 g kT/m per Cartesian DOF) from (x0, v0):
    E v = v0 e^{-g t}, E x = x0 + v0 (1 - e^{-g t})/g, Var v = (kT/m)(1 - e^{-2 g t}),
    Var x = (s^2/g^2)(t - 2(1 - e^{-g t})/g + (1 - e^{-2 g t})/(2 g)), Cov(x, v) = s^2 (1 - e^{-g t})^2 / (2 g^2).
    Monte Carlo over fresh continuous-law coefficients and latents, n = 4000 jumps from one (x0, v0),
    66 independent DOFs. Each DOF's (x, v) is whitened with the exact mean and covariance (Cholesky),
    which must leave n i.i.d. N(0, I_2) draws: the sample mean of each whitened coordinate has SE
    1/sqrt(n), a sample variance sqrt(2/n), the sample covariance 1/sqrt(n). Per DOF we allow 4.5 SE
    (330 statistics: a chance failure ~2e-3, seeds fixed); averaged over the 66 DOFs the SEs shrink by
    sqrt(66) and we allow 4 SE, which catches a 1% error in a variance.
    """
    from molflow.brownian import sample_coefficients

    torch.manual_seed(0)
    scal, edges = atom_features(ala2)
    g = 1.0
    m = MolecularFlowMap(scal, edges, ala2.masses_amu, ala2.kT_kj_mol, g,
                         MapConfig(n_coefficients=3, n_latent=2, n_features=8, n_layers=1, base="ou")).double()
    with torch.no_grad():
        m.net.out.mix.weight.zero_()  # the correction vanishes: only the exact OU part remains
    n, tau = 4000, 0.5
    rng = np.random.default_rng(1)
    L = torch.as_tensor(np.moveaxis(sample_coefficients(rng, 3, tau, (n, 22, 3)), 0, 1))
    x0 = np.asarray(ala2.positions_nm, dtype=np.float64)
    kT_m = (ala2.kT_kj_mol / np.asarray(ala2.masses_amu, dtype=np.float64))[:, None]  # (A, 1) nm^2/ps^2
    v0 = np.sqrt(kT_m) * rng.standard_normal((22, 3))  # one thermal start velocity, the same for all n
    xt, vt = m(torch.as_tensor(x0).expand(n, -1, -1), torch.as_tensor(v0).expand(n, -1, -1), L,
               m.sample_latent(n), torch.full((n,), tau, dtype=torch.float64))
    xt, vt = xt.detach().numpy().reshape(n, -1), vt.detach().numpy().reshape(n, -1)  # (n, 66)
    e1, e2 = np.exp(-g * tau), np.exp(-2 * g * tau)
    s2 = 2 * g * np.broadcast_to(kT_m, (22, 3)).ravel()
    mean_x, mean_v = (x0 + v0 * (1 - e1) / g).ravel(), (v0 * e1).ravel()
    var_v = s2 / (2 * g) * (1 - e2)
    var_x = s2 / g**2 * (tau - 2 * (1 - e1) / g + (1 - e2) / (2 * g))
    cov_xv = s2 * (1 - e1) ** 2 / (2 * g**2)
    # whiten: (x, v) = mean + C (z1, z2) with C the Cholesky factor of [[var_x, cov], [cov, var_v]]
    c11 = np.sqrt(var_x)
    c21 = cov_xv / c11
    c22 = np.sqrt(var_v - c21**2)
    z1 = (xt - mean_x) / c11
    z2 = ((vt - mean_v) - c21 * z1) / c22
    stats = {  # (per-DOF values, their SE)
        "mean z1": (z1.mean(0), 1 / np.sqrt(n)), "mean z2": (z2.mean(0), 1 / np.sqrt(n)),
        "var z1 - 1": (z1.var(0, ddof=1) - 1, np.sqrt(2 / n)), "var z2 - 1": (z2.var(0, ddof=1) - 1, np.sqrt(2 / n)),
        "cov z1 z2": (((z1 - z1.mean(0)) * (z2 - z2.mean(0))).sum(0) / (n - 1), 1 / np.sqrt(n)),
    }
    for name, (val, se) in stats.items():
        assert np.abs(val).max() < 4.5 * se, (name, np.abs(val).max() / se)
        assert abs(val.mean()) < 4 * se / np.sqrt(val.size), (name, val.mean() * np.sqrt(val.size) / se)
    assert np.abs(cov_xv / np.sqrt(var_x * var_v)).min() > 0.5  # (x and v are strongly correlated: a joint check)


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


# --------------------------------------------------------------------------- the torsion drive
@pytest.fixture(scope="module")
def drive_model(ala2):
    from molflow.models.molecular import build_model

    torch.manual_seed(0)
    m = build_model(ala2, MapConfig(n_coefficients=3, n_latent=3, n_features=16, n_layers=2,
                                    torsion_drive=16)).double()
    with torch.no_grad():  # a non-trivial drive (its last layer starts at zero)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def binned_drive_model(ala2):
    from molflow.models.molecular import build_model

    torch.manual_seed(1)
    m = build_model(ala2, MapConfig(n_coefficients=3, n_latent=3, n_features=16, n_layers=2,
                                    torsion_drive=16, torsion_drive_bins=24, torsion_drive_landscape=36)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def pair_drive_model(ala2, binned_drive_model):
    """The binned drive's weights plus a random pair landscape (12 nodes per axis, +-1 kT scale)."""
    from molflow.models.molecular import build_model

    m = build_model(ala2, MapConfig(n_coefficients=3, n_latent=3, n_features=16, n_layers=2, torsion_drive=16,
                                    torsion_drive_bins=24, torsion_drive_landscape=36,
                                    torsion_drive_landscape_pair=12)).double()
    missing, unexpected = m.load_state_dict(binned_drive_model.state_dict(), strict=False)
    assert missing == ["drive.landscape_pair"] and not unexpected
    with torch.no_grad():
        m.drive.landscape_pair.copy_(torch.randn(12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    return m


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("kind", ["implicit", "binned", "pair"])
def test_torsion_drive_keeps_e3_equivariance(drive_model, binned_drive_model, pair_drive_model, ala2, reflect, kind):
    """The drive's angle is odd in its pseudo-scalar inputs, so a mirrored molecule turns the other way;
    forces rotate with the molecule. Without forces the map refuses to jump."""
    from molflow.errors import InputError

    drive_model = {"implicit": drive_model, "binned": binned_drive_model, "pair": pair_drive_model}[kind]
    Q, shift = _random_orthogonal(4, reflect), torch.tensor([0.2, 0.5, -1.0], dtype=torch.float64)
    x, v, L, eps, tau = _inputs(ala2)
    if kind != "implicit":  # its own latent vector
        eps = torch.cat([eps, torch.randn(eps[:, :1].shape, generator=torch.Generator().manual_seed(6),
                                          dtype=torch.float64)], 1)
        assert drive_model.sample_latent(2).shape[1] == eps.shape[1]
    f = 300.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    xt, vt = drive_model(x, v, L, eps, tau, f)
    xr, vr = drive_model(x @ Q.T + shift, v @ Q.T, L @ Q.T, eps @ Q.T, tau, f @ Q.T)
    torch.testing.assert_close(xr, xt @ Q.T + shift, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(vr, vt @ Q.T, atol=1e-10, rtol=1e-10)
    t_feat = torch.zeros(3, 3, dtype=torch.float64)
    delta = drive_model.drive.angles(x, v, L, eps, tau, t_feat, drive_model.masses, drive_model.sigma,
                                     drive_model.kT, x + 0.01, f)
    assert delta.abs().min() > 1e-4  # the drive does turn
    with pytest.raises(InputError, match="forces"):
        drive_model(x, v, L, eps, tau)


def test_torsion_drive_torque_is_minus_the_energy_slope(ala2):
    """The torque feature equals -dU/d delta of the turn by central finite differences of the force
    field's energy (step 1e-4 rad: the O(h^2) error is ~1e-6 kJ/mol/rad here)."""
    from molflow.md.engine import EnergyEvaluator
    from molflow.models.torsion_drive import build_torsion_drive

    g = torch.Generator().manual_seed(6)
    x = torch.as_tensor(ala2.positions_nm, dtype=torch.float64).expand(2, -1, -1) + 0.01 * torch.randn(2, 22, 3, generator=g, dtype=torch.float64)
    ev = EnergyEvaluator(ala2, "Reference")
    f = torch.as_tensor(np.stack([ev.forces(p) for p in x.numpy()]))
    drive = build_torsion_drive(ala2, 3, 8).double()
    m = torch.as_tensor(ala2.masses_amu, dtype=torch.float64)
    torque = drive.torques(x, f, m)
    h = 1e-4
    for j in range(2):
        d = torch.zeros(2, 2, dtype=torch.float64)
        d[:, j] = h
        up = ev(drive.turn(x, torch.zeros_like(x), d, m)[0].numpy())
        down = ev(drive.turn(x, torch.zeros_like(x), -d, m)[0].numpy())
        np.testing.assert_allclose(torque[:, j].numpy(), -(up - down) / (2 * h), rtol=1e-4, atol=1e-3)


def test_torsion_drive_turn_is_strain_free(ala2):
    """Turning by delta changes exactly the driven torsion by delta and no bond length or angle, keeps
    the kinetic energy and the angular momentum about the bond (inertia split)."""
    from molflow.models.torsion_drive import build_torsion_drive, dihedral_and_gradient
    from molflow.training.objective import InternalCoordinates, _dihedral, wrap

    g = torch.Generator().manual_seed(3)
    x = torch.as_tensor(ala2.positions_nm, dtype=torch.float64).expand(2, -1, -1) + 0.01 * torch.randn(2, 22, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 22, 3, generator=g, dtype=torch.float64)
    drive = build_torsion_drive(ala2, 3, 8).double()
    q = drive.quads
    theta, grad = dihedral_and_gradient(x, q)
    torch.testing.assert_close(theta, _dihedral(x, q))  # same convention as the training score
    xr = x.clone().requires_grad_(True)  # closed-form gradient = autograd's
    auto = torch.autograd.grad(_dihedral(xr, q)[0, 1], xr)[0][0, q[1]]
    torch.testing.assert_close(grad[0, 1], auto)
    m = torch.as_tensor(ala2.masses_amu, dtype=torch.float64)
    delta = torch.tensor([[0.3, -0.7], [-1.1, 0.4]], dtype=torch.float64)
    x2, v2 = drive.turn(x, v, delta, m)
    torch.testing.assert_close(wrap(_dihedral(x2, q) - theta), delta)
    ic = InternalCoordinates(ala2.bonds, 22)
    for before, after in zip(ic(x)[:2], ic(x2)[:2]):
        torch.testing.assert_close(after, before, atol=1e-12, rtol=0)
    torch.testing.assert_close((m[:, None] * v2 * v2).sum((1, 2)), (m[:, None] * v * v).sum((1, 2)))
    # turning phi alone: angular momentum about the N-CA axis through N is conserved
    b, c = int(q[0, 1]), int(q[0, 2])
    x3, _ = drive.turn(x, torch.zeros_like(v), torch.tensor([[0.5, 0.0], [0.5, 0.0]], dtype=torch.float64), m)
    axis = (x[:, c] - x[:, b]) / (x[:, c] - x[:, b]).norm(dim=-1, keepdim=True)
    r = x - x[:, b, None]
    # a small turn as a velocity field: zero angular momentum about the axis means sum m (r x dx) . axis = 0
    d = x3 - x
    ang = (m[:, None] * torch.cross(r, d, dim=-1)).sum(1)
    assert ((ang * axis).sum(-1).abs() < 0.02 * (m[None] * d.norm(dim=-1) * r.norm(dim=-1)).sum(1)).all()


def test_added_torsion_drive_starts_as_the_identity(ala2):
    """A drive added to a trained map leaves it exactly as it was (zero last layer)."""
    from molflow.models.molecular import build_model

    torch.manual_seed(1)
    base = build_model(ala2, MapConfig(n_coefficients=3, n_latent=3, n_features=16, n_layers=2)).double()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    withd = build_model(ala2, MapConfig(n_coefficients=3, n_latent=3, n_features=16, n_layers=2, torsion_drive=8)).double()
    missing, unexpected = withd.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("drive.") for k in missing)
    x, v, L, eps, tau = _inputs(ala2)
    f = torch.randn(x.shape, dtype=torch.float64)
    for a, b in zip(base(x, v, L, eps, tau), withd(x, v, L, eps, tau, f)):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


def test_drive_fit_inputs_reproduce_the_full_map(drive_model, ala2):
    """A cached drive fit (molflow.training.drive_fit) scores the network's torsions plus the drive's
    angle from the cached features; that must be exactly the torsions the full map (network, then the
    turns) reaches: a turn about one backbone bond leaves the other backbone torsion unchanged."""
    from molflow.models.torsion_drive import dihedral_and_gradient

    x, v, L, eps, tau = _inputs(ala2)
    f = 300.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_full, _ = drive_model(x, v, L, eps, tau, f)
    m = drive_model
    x_net, _, t_feat = m.network_jump(x, v, L, eps, tau)
    inv, pseudo = m.drive.features(x, v, L, eps, tau, t_feat, m.masses, m.sigma, m.kT, x_net, f)
    delta = m.drive.delta(inv, pseudo, tau)
    assert delta.abs().min() > 1e-3
    q = m.drive.quads
    want = dihedral_and_gradient(x_full, q)[0]
    got = dihedral_and_gradient(x_net, q)[0] + delta
    wrapped = torch.remainder(got - want + torch.pi, 2 * torch.pi) - torch.pi
    assert wrapped.abs().max() < 1e-9


def test_binned_drive_law(binned_drive_model, ala2):
    """A binned drive's law: its density (log_prob) integrates to 1 over its range, and its turns,
    drawn as quantiles Phi(zeta) of that law, follow it (Kolmogorov-Smirnov distance of 4000 draws
    from the law's CDF below 1.63 / sqrt(4000), the 1% critical value); its latents are whitened
    (the phi and psi latents of one draw uncorrelated: |r| < 4 / sqrt(4000))."""
    m, d = binned_drive_model, binned_drive_model.drive
    torch.set_grad_enabled(False)
    try:
        _check_binned_law(m, d, ala2)
    finally:
        torch.set_grad_enabled(True)


def _check_binned_law(m, d, ala2):
    x, v, L, eps, tau = _inputs(ala2)
    x, v, L, tau = x[:1], v[:1], L[:1], tau[:1]
    n = 4000
    g = torch.Generator().manual_seed(11)
    e = torch.randn(n, m.n_latent_vectors, *x.shape[1:], generator=g, dtype=torch.float64)
    rep = lambda t: t.expand(n, *t.shape[1:])  # noqa: E731
    f = 300.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_net, _, t_feat = m.network_jump(rep(x), rep(v), rep(L), e[:, :m.config.n_latent], rep(tau))
    inv, pseudo = d.features(rep(x), rep(v), rep(L), e, rep(tau), t_feat, m.masses, m.sigma, m.kT, x_net, rep(f))
    zeta = pseudo[..., 4]
    assert abs(float(torch.corrcoef(zeta.T)[0, 1])) < 4 / n ** 0.5
    delta = d.delta(inv, pseudo, rep(tau))  # (n, Q)
    w = float(d.half_width(tau[0]))
    grid = torch.linspace(-w, w, 2401, dtype=torch.float64)[:-1] + w / 2400  # 100 cells per bin
    k = 7  # one draw's features fix the law; the network's jump differs per draw only through its latents
    dens = d.log_prob(inv[k:k + 1].expand(len(grid), -1, -1), pseudo[k:k + 1].expand(len(grid), -1, -1),
                      tau[:1].expand(len(grid)), grid[:, None].expand(-1, 2)).exp()
    total = dens.sum(0) * (2 * w / 2400)
    torch.testing.assert_close(total, torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)
    # draws with the features of item k and fresh latents
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    pk = pseudo[k:k + 1].expand(n, -1, -1).clone()
    pk[..., 4] = z
    dk = d.delta(inv[k:k + 1].expand(n, -1, -1), pk, tau[:1].expand(n))
    cdf = torch.cumsum(dens, 0) * (2 * w / 2400)
    for q in range(2):
        emp = (dk[:, q, None] <= grid[None] + w / 2400).double().mean(0)
        assert float((emp - cdf[:, q]).abs().max()) < 1.63 / n ** 0.5


def test_pair_landscape_draws_psi_given_phi(binned_drive_model, pair_drive_model, ala2):
    """A pair landscape leaves phi's law alone and draws psi from its law given phi's end: with a
    zero table the drive is the binned one exactly; with a random one each psi turn sits at
    probability level Phi(zeta_psi) of the conditional law log_prob gives for the phi turn drawn
    (a deterministic identity of the quantile draw, up to the 2400-cell integration: 1e-6), which
    integrates to 1, and the psi turns differ from the table-free drive's."""
    from molflow.errors import InputError
    from molflow.models.torsion_drive import build_torsion_drive

    with pytest.raises(InputError, match="landscape_pair"):
        build_torsion_drive(ala2, 3, 8, 8, 0, landscape_pair=8)
    m, d, d0 = pair_drive_model, pair_drive_model.drive, binned_drive_model.drive
    x, v, L, eps, tau = _inputs(ala2)
    n = 64
    g = torch.Generator().manual_seed(12)
    rep = lambda t: t[:1].expand(n, *t.shape[1:])  # noqa: E731
    e = torch.randn(n, m.n_latent_vectors, *x.shape[1:], generator=g, dtype=torch.float64)
    f = 300.0 * torch.randn(x[:1].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        x_net, _, t_feat = m.network_jump(rep(x), rep(v), rep(L), e[:, :m.config.n_latent], rep(tau))
        inv, pseudo = d.features(rep(x), rep(v), rep(L), e, rep(tau), t_feat, m.masses, m.sigma, m.kT, x_net, rep(f))
        delta, delta0 = d.delta(inv, pseudo, rep(tau)), d0.delta(inv, pseudo, rep(tau))
        torch.testing.assert_close(delta[:, 0], delta0[:, 0], atol=1e-12, rtol=0)  # phi: unchanged
        assert (delta[:, 1] - delta0[:, 1]).abs().max() > 1e-3  # psi: moved by the table
        saved = d.landscape_pair.clone()
        d.landscape_pair.zero_()
        torch.testing.assert_close(d.delta(inv, pseudo, rep(tau)), delta0, atol=1e-12, rtol=0)
        d.landscape_pair.copy_(saved)
        w = float(d.half_width(tau[0]))
        cells = 2400
        grid = torch.linspace(-w, w, cells + 1, dtype=torch.float64)[:-1] + w / cells
        u = torch.special.ndtr(pseudo[..., 4])
        for k in range(0, n, 8):
            turns = torch.stack([delta[k, 0].expand(cells), grid], -1)  # phi at its draw, psi over the range
            dens = d.log_prob(inv[k:k + 1].expand(cells, -1, -1), pseudo[k:k + 1].expand(cells, -1, -1),
                              tau[:1].expand(cells), turns)[:, 1].exp()
            assert abs(float(dens.sum()) * 2 * w / cells - 1) < 1e-9
            cdf = float((dens * ((grid + w / cells).clamp(max=delta[k, 1]) - (grid - w / cells)).clamp(min=0)).sum())
            assert abs(cdf - float(u[k, 1])) < 1e-6, (cdf, float(u[k, 1]))


def test_without_torsion_drive_is_the_network_alone(ala2, tmp_path):
    """The shipped map without its drive (molflow.checkpoint.without_torsion_drive) is the network its
    drive was fitted on: same network jump bit for bit, no drive and no need for forces; a map without
    a drive is refused."""
    import molflow
    from molflow.checkpoint import load_checkpoint, save_checkpoint, without_torsion_drive
    from molflow.errors import InputError
    from molflow.systems import systems_dir

    shipped = systems_dir() / "alanine_dipeptide" / "flowmap.pt"
    ck = load_checkpoint(shipped)
    bare = without_torsion_drive(ck)
    assert not any(k.startswith("drive.") for k in bare["model"]) and bare["map_config_json"]["torsion_drive"] == 0
    save_checkpoint(tmp_path / "bare.pt", bare)
    a, b = molflow.FlowMap.load(shipped, device="cpu").model, molflow.FlowMap.load(tmp_path / "bare.pt", device="cpu").model
    assert a.drive is not None and b.drive is None and not b.needs_forces
    x, v, L, _, tau = (t.to(torch.get_default_dtype()) for t in _inputs(ala2))
    eps = torch.randn(3, a.config.n_latent, 22, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ja = a.network_jump(x, v, L, eps[:, :a.config.n_latent], tau)
        jb = b.network_jump(x, v, L, eps[:, :b.config.n_latent], tau)
    for p, q in zip(ja, jb):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    with pytest.raises(InputError, match="no torsion drive"):
        without_torsion_drive(bare)
