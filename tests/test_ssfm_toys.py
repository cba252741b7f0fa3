"""Generic SSFM machinery (molflow.sde, molflow.flowmap, brownian.split_matrices) proved on toys.

Toy time units are arbitrary (one "time unit" for dt, τ, 1/γ, 1/ω); kT = 1, unit masses.
Every test uses fixed seeds, so it is deterministic on one platform; each asserted margin was
measured (seeds 0-2 where training is involved) and the comment beside it says what was measured
and why the margin leaves room for seed/platform variation.  The whole file runs in about 75 s on
2 busy cores (torch on 1 thread).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from molflow import brownian as B
from molflow import flowmap as FM
from molflow import sde as S

torch.set_num_threads(1)  # tiny ops stall on busy cores with more threads


# ------------------------------------------------------------------------------------------
# brownian.split_matrices and the torch half-splits
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("durations", [[0.5, 0.5], [0.2, 0.3, 0.5], [2.0, 2.0]])
def test_split_matrices_reproduce_split(durations):
    rng = np.random.default_rng(3)
    parent = rng.standard_normal((4, 5, 2))
    h = float(np.sum(durations))
    mean_map, noise = B.split_matrices(durations, 4)
    eta = np.random.default_rng(11).standard_normal((noise.shape[2], 10)).reshape(noise.shape[2], 5, 2)
    mine = np.einsum("pnk,k...->pn...", mean_map, parent) + np.einsum("pnr,r...->pn...", noise, eta)
    ref = B.split(parent, h, durations, rng=11)  # same eta stream: identical draw
    assert np.abs(mine - ref).max() < 1e-12
    assert np.abs(B.compose(mine, durations) - parent).max() < 1e-12
    # the mean map depends only on the fractions, the noise scales as sqrt(total duration)
    m1, f1 = B.split_matrices(np.asarray(durations) / h, 4)
    assert np.abs(m1 - mean_map).max() < 1e-12
    assert np.abs(f1 * math.sqrt(h) - noise).max() < 1e-12


def test_split_matrices_discrete_reproduce_split_discrete():
    parent = np.random.default_rng(4).standard_normal((3, 6))
    mean_map, noise = B.split_matrices(None, 3, n_steps_list=[2, 5], dt_ps=0.1)
    eta = np.random.default_rng(9).standard_normal((noise.shape[2], 6))
    mine = np.einsum("pnk,kb->pnb", mean_map, parent) + np.einsum("pnr,rb->pnb", noise, eta)
    assert np.abs(mine - B.split_discrete(parent, [2, 5], 0.1, rng=9)).max() < 1e-12


def _marginal_check(children, variances, n):
    """children (n, N, w) must be independent N(0, variances[N]): each variance within 5 SE
    (relative SE sqrt(2/n)) and the left/right cross-covariance within 5 SE (SE sqrt(v1 v2/n))."""
    emp = children.pow(2).mean((0, 2))
    assert torch.all((emp / variances - 1).abs() < 5 * math.sqrt(2 / n)), emp / variances


def test_continuous_half_split_is_exact_conditioning():
    # If the children have the prior (independent) law AND compose back to the parent exactly, the
    # joint law of (parent, children) is the prior one, so children | parent is the exact
    # conditional.  Parents drawn from the law with per-item τ, so the τ scaling is tested too.
    g = torch.Generator().manual_seed(0)
    n, N = 20000, 4
    tau = FM.log_uniform_tau(n, 0.1, 10.0, g, dtype=torch.float64)
    L = FM.sample_coefficients_torch(tau, N, (1,), g)
    left, tl, right, tr = FM.continuous_half_split(L, tau, g)
    back = B.compose_torch(torch.stack([left, right]).movedim(2, 1), [0.5, 0.5])  # leading-axis convention
    assert (back.movedim(0, 1) - L).abs().max() < 1e-12
    k = 2.0 * torch.arange(N, dtype=torch.float64) + 1.0
    for child, t in ((left, tl), (right, tr)):
        _marginal_check(child / t.sqrt()[:, None, None], 1.0 / k, n * 1)
    cross = (left / tl.sqrt()[:, None, None] * right / tr.sqrt()[:, None, None]).mean((0, 2)) * k
    assert torch.all(cross.abs() < 5 / math.sqrt(n))


def test_discrete_half_split():
    g = torch.Generator().manual_seed(1)
    dt, N, n = 0.01, 3, 20000
    k_steps = torch.randint(2, 9, (n,), generator=g)  # odd K gives unequal halves
    tau = k_steps.double() * dt
    L = torch.zeros(n, N, 1, dtype=torch.float64)
    for kk in torch.unique(k_steps).tolist():
        idx = torch.nonzero(k_steps == kk).reshape(-1)
        L[idx] = torch.as_tensor(B.sample_coefficients(kk, N, kk * dt, (idx.numel(), 1), n_steps=kk)).movedim(0, 1)
    left, tl, right, tr = FM.DiscreteHalfSplit(dt)(L, tau, g)
    assert torch.allclose(tl + tr, tau)
    for i in range(0, n, 997):  # exact recomposition, item by item (unequal pieces)
        back = B.compose(np.stack([left[i].numpy(), right[i].numpy()]), [tl[i].item(), tr[i].item()])
        assert np.abs(back - L[i].numpy()).max() < 1e-12
    sel = k_steps == 8  # 4 + 4 steps: the left child has the 4-step discrete covariance
    cov = torch.as_tensor(B.discrete_covariance(N, 4, dt))
    emp = torch.einsum("bn,bm->nm", left[sel, :, 0], left[sel, :, 0]) / sel.sum()
    se = torch.sqrt((torch.outer(cov.diag(), cov.diag()) + cov**2) / sel.sum())
    assert torch.all((emp - cov).abs() < 5 * se)
    with pytest.raises(ValueError):
        FM.DiscreteHalfSplit(dt)(L[:2], torch.tensor([0.015, 0.02], dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# scoring rules
# ------------------------------------------------------------------------------------------
def test_energy_score_matches_its_formula_and_crps():
    g = torch.Generator().manual_seed(2)
    m, b, d = 4, 5, 3
    samples = torch.randn(m, b, d, generator=g, dtype=torch.float64)
    target = torch.randn(b, d, generator=g, dtype=torch.float64)
    for beta in (1.0, 1.5):
        brute = torch.zeros(b, dtype=torch.float64)
        for i in range(b):
            t1 = sum(torch.linalg.norm(samples[j, i] - target[i]) ** beta for j in range(m)) / m
            t2 = sum(torch.linalg.norm(samples[j, i] - samples[k, i]) ** beta
                     for j in range(m) for k in range(m) if j != k) / (2 * m * (m - 1))
            brute[i] = t1 - t2
        assert torch.allclose(FM.energy_score(samples, target, beta), brute, atol=1e-5)
    per_coord = torch.stack([FM.energy_score(samples[..., c:c + 1], target[:, c:c + 1]) for c in range(d)], -1)
    assert torch.allclose(FM.crps_per_coordinate(samples, target, reduction="sum"), per_coord.sum(-1), atol=1e-5)
    assert torch.allclose(FM.crps_per_coordinate(samples, target), per_coord.mean(-1), atol=1e-5)
    assert torch.allclose(FM.mse(samples, target), ((samples - target) ** 2).sum(-1).mean(0))
    with pytest.raises(ValueError):
        FM.energy_score(samples[:1], target)
    # gradients stay finite where two samples coincide
    x = samples[:1].repeat(2, 1, 1).clone().requires_grad_(True)
    FM.energy_score(x, target).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_energy_score_prefers_the_true_law():
    # y ~ N(0, I_3); predictive N(0, s² I_3) with s = 1 (true), 0.5 (collapsed), 1.5 (too wide).
    # Expected ES = E‖T-y‖ - ½E‖T-T'‖ = c(√(1+s²) - √(2s²)/2), c = E‖N(0,I_3)‖ = 2√(2/π):
    # 1.128 (true), 1.208 (0.5), 1.184 (1.5); paired with common y, the mean over 20000 items has
    # SE ≈ 0.008 on the differences, so the true law wins by > 7 SE.
    g = torch.Generator().manual_seed(3)
    n = 20000
    y = torch.randn(n, 3, generator=g)
    z = torch.randn(4, n, 3, generator=g)
    es = {s: FM.energy_score(s * z, y).mean().item() for s in (0.5, 1.0, 1.5)}
    c = 2 * math.sqrt(2 / math.pi)
    for s, v in es.items():
        assert abs(v - c * (math.sqrt(1 + s * s) - math.sqrt(2 * s * s) / 2)) < 0.03
    assert es[1.0] < es[0.5] - 0.04 and es[1.0] < es[1.5] - 0.03


def test_variogram_score_formula_unbiased_and_proper():
    g = torch.Generator().manual_seed(4)
    m, b, d, p = 4, 3, 4, 0.5
    samples = torch.randn(m, b, d, generator=g, dtype=torch.float64)
    target = torch.randn(b, d, generator=g, dtype=torch.float64)
    # brute force: mean over pairs of a² - 2a·mean_j b_j + Σ_{j≠k} b_j b_k / (m(m-1))
    brute = torch.zeros(b, dtype=torch.float64)
    pairs = [(i, k) for i in range(d) for k in range(i + 1, d)]
    for n in range(b):
        tot = 0.0
        for i, k in pairs:
            a = abs(target[n, i] - target[n, k]) ** p
            bb = [abs(samples[j, n, i] - samples[j, n, k]) ** p for j in range(m)]
            cross = sum(bb[j] * bb[l] for j in range(m) for l in range(m) if j != l) / (m * (m - 1))
            tot += a * a - 2 * a * sum(bb) / m + cross
        brute[n] = tot / len(pairs)
    assert torch.allclose(FM.variogram_score(samples, target, p), brute, atol=1e-5)
    # unbiased in m: the mean score of m = 2 and m = 8 samples agree (the plug-in square would
    # differ by Var(b)/m); and a wrong correlation scores worse than the true law.  y ~ N(0, C),
    # C with correlation 0.8 between coordinates 0 and 1; 20000 items give SE ≈ 0.005 here.
    n = 20000
    c = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    ch = torch.linalg.cholesky(c)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64) @ ch.T
    true8 = torch.randn(8, n, 3, generator=g, dtype=torch.float64) @ ch.T
    indep = torch.randn(8, n, 3, generator=g, dtype=torch.float64)
    v2 = FM.variogram_score(true8[:2], y).mean().item()
    v8 = FM.variogram_score(true8, y).mean().item()
    vi = FM.variogram_score(indep, y).mean().item()
    assert abs(v2 - v8) < 0.03, (v2, v8)
    assert vi > v8 + 0.03, (vi, v8)
    # score(): the variogram term adds on top of the joint energy score
    tot = FM.score(samples, target, "energy", variogram_weight=0.5, variogram_p=p)
    assert torch.allclose(tot, FM.energy_score(samples, target) + 0.5 * FM.variogram_score(samples, target, p))


def test_linear_features_and_composed_map():
    g = torch.Generator().manual_seed(5)
    a = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    sc = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(FM.linear_features(a, sc)(z), (z @ a) / sc)
    # ComposedFlowMap of a pure-noise map z + G L^(0) (network output zero at initialisation):
    # the pieces' L^(0) add up to the parent's, so k = 3 pieces reproduce one jump exactly.
    sde = S.harmonic_langevin([1.0, 2.0])
    inner = FM.ToyFlowMap.for_sde(sde, 3, latent_dim=2, base="noise")
    comp = FM.ComposedFlowMap(inner, 3, 3, (2,))
    z = torch.randn(6, 4, generator=g)
    L = torch.randn(6, 3, 2, generator=g)
    tau = torch.full((6,), 0.7)
    one = inner(z, L, inner.latent_fn(6, g), tau)
    three = comp(z, L, comp.latent_fn(6, g), tau)
    assert comp.latent_dim == 3 * 2 + comp.n_split
    assert torch.allclose(one, three, atol=1e-5)


# ------------------------------------------------------------------------------------------
# SDEs and the fine solver
# ------------------------------------------------------------------------------------------
def test_path_coefficients_and_fine_solvers():
    g = torch.Generator().manual_seed(4)
    xi = torch.randn(50, 7, 2, generator=g, dtype=torch.float64)
    L = S.path_coefficients(xi, 3, 0.02)
    ref = B.coefficients_from_noise(xi.numpy(), 3, 0.02)
    assert np.abs(L.movedim(1, 0).numpy() - ref).max() < 1e-12
    # pure noise: Euler–Maruyama lands exactly at z0 + G L^(0)
    pure = S.AdditiveSDE(lambda z, t: torch.zeros_like(z), [0.0, 0.7, 1.3])
    z0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    zt = S.fine_solve(pure, z0, 0.02, xi)
    assert torch.allclose(zt, z0 + pure.noise_to_state(L[:, 0]), atol=1e-12)
    assert torch.allclose(pure.noise_to_state(L[:, 0]), L[:, 0] @ pure.diffusion_matrix().T)
    # BAOAB: one step by hand (the engine's splitting)
    osc = S.harmonic_langevin([3.0, 5.0], gamma=2.0, kT=1.5)
    z0 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    xi1 = xi[:1]
    x, v = z0[:, :2], z0[:, 2:]
    dt, a = 0.02, math.exp(-2.0 * 0.02)
    v = v + 0.5 * dt * osc.force(x)
    x = x + 0.5 * dt * v
    v = a * v + math.sqrt((1 - a * a) * 1.5) * xi1[0]
    x = x + 0.5 * dt * v
    v = v + 0.5 * dt * osc.force(x)
    assert torch.allclose(S.fine_solve(osc, z0, dt, xi1), torch.cat([x, v], 1), atol=1e-12)
    traj = S.fine_solve(osc, z0, dt, xi[:, :, :2], return_trajectory=True)
    assert traj.shape == (51, 7, 4) and torch.equal(traj[0], z0)
    frames, coeffs = S.simulate_with_coefficients(osc, z0, dt, 5, 3, 2, g)
    assert frames.shape == (7, 4, 4) and coeffs.shape == (7, 3, 2, 2)


def test_mixed_mode_toy():
    toy = S.mixed_mode_toy(seed=0)
    n = 17
    assert toy.dim == 2 * n and toy.noise_dim == n
    r = toy.info["rotation"]
    assert torch.allclose(r.T @ r, torch.eye(n, dtype=torch.float64), atol=1e-12)
    om = toy.info["omega"]
    assert om.numel() == 16 and abs(om[0] - 0.5) < 1e-12 and abs(om[-1] - 20.0) < 1e-9
    x = torch.randn(5, n, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(toy.potential(x).sum(), x)
    assert torch.allclose(toy.force(x), -grad, atol=1e-10)
    q = toy.info["to_modes"](torch.cat([x, x], 1).detach())[:, :n]
    assert torch.allclose(q @ r.T, x.detach(), atol=1e-12)
    var = toy.info["stationary_var"]
    assert torch.allclose(var[:16], 1.0 / om**2) and torch.allclose(var[n:], torch.ones(n, dtype=torch.float64))
    assert 0.7 < var[16] < 1.0  # double well 2(q²-1)² at kT = 1: E q² = 0.87 by quadrature
    assert torch.allclose(toy.noise_scale[n:], torch.full((n,), math.sqrt(2.0), dtype=torch.float64))


def test_free_langevin_part_is_exact():
    # ToyFlowMap(base="ou", ou_residual=True) at initialisation (the network's last layer is zero)
    # is the exact conditional law of the force-free Langevin step given L.  Check it against fine
    # BAOAB (dt = 2.5e-3) of a free particle over τ = 1.5 (γτ = 3), N = 1 so the residual is
    # large: 2000 paths sharing the same L (exact conditional per-step noise).  Means within 5 SE of
    # the difference of two 2000-sample means (7 × one mean's SE) plus 2e-3 for the BAOAB /
    # discrete-path bias; standard deviations within 5% (one SE of a std ratio: 1/sqrt(2000) =
    # 2.2%; measured within 2%).
    free = S.underdamped_langevin(lambda x: torch.zeros_like(x), [1.0, 2.0], gamma=2.0, kT=1.0)
    tau, dt, P, N = 1.5, 2.5e-3, 2000, 1
    K = int(round(tau / dt))
    rng = np.random.default_rng(5)
    xi = np.repeat(rng.standard_normal((K, 1, 2)), P, axis=1)
    xi = torch.as_tensor(B.conditional_noise(xi, N, dt, rng=6))
    z0 = torch.tensor([[0.3, -0.2, 1.0, -0.5]], dtype=torch.float64).repeat(P, 1)
    ref = S.fine_solve(free, z0, dt, xi)
    L = S.path_coefficients(xi, N, dt)
    model = FM.ToyFlowMap.for_sde(free, N, latent_dim=4, base="ou", ou_residual=True).double()
    out = model(z0, L, model.latent_fn(P, torch.Generator().manual_seed(7)).double(), torch.full((P,), tau))
    se = ref.std(0) / math.sqrt(P)
    assert torch.all((out.mean(0) - ref.mean(0)).abs() < 7 * se + 2e-3)
    assert torch.all((out.std(0) / ref.std(0) - 1).abs() < 0.05), out.std(0) / ref.std(0)
    # identity at τ -> 0, even with a non-zero network
    torch.nn.init.normal_(model.net[-1].weight)
    tiny = torch.full((P,), 1e-12, dtype=torch.float64)
    Lt = torch.randn(P, N, 2, dtype=torch.float64) * 1e-6
    z_tiny = model(z0, Lt, torch.randn(P, 4, dtype=torch.float64), tiny)
    assert (z_tiny - z0).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------
# losses, EMA, τ sampling
# ------------------------------------------------------------------------------------------
def test_losses_api_gradients_and_teacher():
    sde = S.double_well_overdamped(0.7)
    model = FM.ToyFlowMap.for_sde(sde, 3, latent_dim=2, hidden=16)
    torch.nn.init.normal_(model.net[-1].weight, std=0.1)
    ema = FM.EMA(model, decay=0.9)
    g = torch.Generator().manual_seed(8)
    b = 32
    z_s = torch.randn(b, 1, generator=g)
    tau = torch.full((b,), 0.2)
    L = FM.sample_coefficients_torch(tau, 3, (1,), g)
    z_t = z_s + 0.1
    for objective, m in (("energy", 3), ("mse", None)):
        loss, diag = FM.local_loss(model, z_s, z_t, L, tau, latent_fn=model.latent_fn, objective=objective,
                                   n_latent=m, generator=g)
        assert loss.ndim == 0 and set(diag) == {"score", "error", "spread", "tau"}
        model.zero_grad()
        loss.backward()
        assert model.net[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        FM.local_loss(model, z_s, z_t, L, tau, latent_fn=model.latent_fn, objective="energy", n_latent=1)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    loss, diag = FM.semigroup_loss(model, ema.model, z_s, L, tau, latent_fn=model.latent_fn, generator=g,
                                   score_features=FM.scaled_features(torch.tensor([0.8])), crps_weight=0.5)
    model.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in ema.model.parameters())
    assert model.net[0].weight.grad.abs().sum() > 0
    ema.update(model)  # warm-up factor (1+0)/(10+0) = 0.1: teacher moves 90% of the way
    for pe, p0, p in zip(ema.model.parameters(), before, model.parameters()):
        assert torch.allclose(pe, 0.1 * p0 + 0.9 * p.detach())
    assert FM.direct_loss is FM.local_loss
    # pathwise rollout with given coefficients (B, K, N, m), and the two modes
    Ls = FM.sample_coefficients_torch(torch.full((b * 4,), 0.2), 3, (1,), g).reshape(b, 4, 3, 1)
    traj = FM.rollout(model, z_s, 4, 0.2, model.latent_fn, coefficients=Ls, mode="mean", n_mean=3, generator=g)
    assert traj.shape == (b, 5, 1) and torch.equal(traj[:, 0], z_s)
    # mean mode = the average of n_mean outputs with independent latents (same generator stream)
    one = FM.predict(model, z_s, Ls[:, 0], tau, model.latent_fn, mode="mean", n_mean=3,
                     generator=torch.Generator().manual_seed(1))
    eps = model.latent_fn(3 * b, torch.Generator().manual_seed(1)).reshape(3, b, -1)
    manual = torch.stack([model(z_s, Ls[:, 0], eps[j], tau) for j in range(3)]).mean(0)
    assert torch.allclose(one, manual, atol=1e-6)


def test_tau_sampling_curriculum_and_config():
    assert FM.curriculum_tau_max(0, 100, 0.01, 1.0) == pytest.approx(0.02)
    assert FM.curriculum_tau_max(25, 100, 0.01, 1.0) == pytest.approx(0.02 * 50**0.5)
    assert FM.curriculum_tau_max(60, 100, 0.01, 1.0) == pytest.approx(1.0)
    assert FM.curriculum_tau_max(0, 100, 0.01, 1.0, fraction=0.0) == 1.0
    g = torch.Generator().manual_seed(9)
    t = FM.log_uniform_tau(4000, 0.02, 0.64, g, dyadic_base=0.01)
    levels = torch.unique(t)
    assert torch.allclose(levels, 0.01 * 2.0 ** torch.arange(1, 7).float())
    t = FM.log_uniform_tau(4000, 0.02, 0.64, g)
    assert t.min() >= 0.02 and t.max() <= 0.64
    # log-uniform: the median is the geometric mean (0.113); the SE of the median of 4000 uniform
    # draws on a log-width ln 32 = 3.47 is 3.47/(2·sqrt(4000)) = 0.027: 5 SE = 0.14
    assert abs(math.log(t.median().item() / math.sqrt(0.02 * 0.64))) < 0.14
    with pytest.raises(ValueError):  # 0.5 is not 0.04·2^j: the longest jumps would never be drawn
        FM.SSFMConfig(h0=0.04, tau_max=0.5).validate()
    FM.SSFMConfig(h0=0.04, tau_max=0.5, dyadic=False).validate()
    FM.SSFMConfig(h0=1 / 32, tau_max=0.5).validate()
    cfg = FM.SSFMConfig(batch_size=100, fractions={"local": 1, "semigroup": 2, "direct": 0.5})
    assert sum(cfg.counts().values()) == 100 and cfg.counts()["semigroup"] > cfg.counts()["local"]


def test_trajectory_sampler_composes_recorded_coefficients():
    sde = S.double_well_overdamped(0.7)
    g = torch.Generator().manual_seed(10)
    frames, coeffs = S.simulate_with_coefficients(sde, torch.zeros(4, 1, dtype=torch.float64), 0.01, 4, 20, 3, g)
    sampler = FM.TrajectoryDataSampler(frames, coeffs, 0.04, dtype=torch.float64)
    item = sampler("direct", 64, tau_max=0.32, generator=g)
    assert set(item) == {"z_s", "z_t", "L", "tau"}
    # recompute one item's coefficients from its frames: compose the recorded pieces with numpy
    for i in range(0, 64, 9):
        k = int(round(item["tau"][i].item() / 0.04))
        hits = [(r, f) for r in range(4) for f in range(21 - k) if frames[r, f] == item["z_s"][i]
                and frames[r, f + k] == item["z_t"][i]]
        r, f = hits[0]
        ref = B.compose(coeffs[r, f:f + k].numpy(), np.full(k, 0.04))
        assert np.abs(item["L"][i].numpy() - ref).max() < 1e-12
    loc = sampler("local", 8, tau_max=0.32, generator=g)
    assert torch.allclose(loc["tau"], torch.full((8,), 0.04, dtype=torch.float64))
    sg = sampler("semigroup", 8, tau_max=0.32, generator=g)
    assert sg["L"].shape == (8, 3, 1) and "z_t" not in sg


# ------------------------------------------------------------------------------------------
# (a) strong error on the overdamped double well, N = 1 vs N = 3
# ------------------------------------------------------------------------------------------
TAU_A, H0_A, G_A = 0.5, 0.5 / 16, 0.7


@pytest.fixture(scope="module")
def double_well_data():
    """256 replicas of dX = (X - X³)dt + 0.7 dW, Euler–Maruyama dt = h0/16, frames every
    h0 = 1/32 time units (160 frames after a 40-frame burn-in from the wells), N = 3 recorded."""
    sde = S.double_well_overdamped(G_A)
    g = torch.Generator().manual_seed(0)
    z0 = torch.where(torch.rand(256, 1, generator=g) < 0.5, -1.0, 1.0).double()
    frames, _ = S.simulate_with_coefficients(sde, z0, H0_A / 16, 16, 40, 3, g)
    frames, coeffs = S.simulate_with_coefficients(sde, frames[:, -1], H0_A / 16, 16, 160, 3, g)
    return sde, frames, coeffs


def _strong_errors(sde, frames, model, n_coef, seed=1000, n=2000):
    """RMS errors at τ = 0.5 against fine Euler–Maruyama (dt = 1e-3) driven by the same path."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, frames.shape[0], (n,), generator=g)
    fi = torch.randint(0, frames.shape[1], (n,), generator=g)
    xs = frames[idx, fi]
    k = int(round(TAU_A / 1e-3))
    dt = TAU_A / k
    xi = torch.randn(k, n, 1, generator=g, dtype=torch.float64)
    ref = S.fine_solve(sde, xs, dt, xi)
    L = S.path_coefficients(xi, n_coef, dt)
    # pair floor: a second fine path sharing the N coefficients, otherwise independent
    ref2 = S.fine_solve(sde, xs, dt, torch.as_tensor(B.conditional_noise(xi.numpy(), n_coef, dt, rng=seed)))
    pred = FM.predict(model, xs.float(), L.float(), torch.full((n,), TAU_A), model.latent_fn, mode="mean",
                      n_mean=8, generator=g).double()
    coarse = xs + sde.drift(xs) * TAU_A + G_A * L[:, 0]  # one Euler–Maruyama step of τ
    rms = lambda a: a.pow(2).mean().sqrt().item()  # noqa: E731
    return {"model": rms(pred - ref), "coarse_em": rms(coarse - ref), "floor_mean": rms(ref2 - ref) / math.sqrt(2)}


def test_a_strong_error_double_well_falls_with_n(double_well_data):
    # Pure SSFM training (local loss at h0 on recorded frames + semigroup self-distillation with
    # fresh coefficients up to τ = 0.5 = 16 h0, dyadic levels, curriculum over the first half),
    # squared-error objective (the strong estimate), MLP 2×64, 1500 steps of 256 items.  Measured
    # (seeds 0, 1, 2), RMS error at τ = 0.5 [length units]:
    #   N = 1: model 0.081-0.084, pair floor/√2 0.079-0.083 (ratio 1.00-1.03), coarse EM 0.22-0.25
    #   N = 3: model 0.0136-0.0154, pair floor/√2 0.0074-0.0076 (ratio 1.8-2.1)
    # Training ≈ 9-11 s each on 2 busy cores.
    sde, frames, coeffs = double_well_data
    res = {}
    for n_coef in (1, 3):
        torch.manual_seed(0)
        sampler = FM.TrajectoryDataSampler(frames, coeffs[:, :, :n_coef], H0_A)  # N=1: the first coefficient (exact)
        model = FM.ToyFlowMap.for_sde(sde, n_coef, latent_dim=2, hidden=64, depth=2, base="noise", state_scale=[0.8])
        cfg = FM.SSFMConfig(objective="mse", h0=H0_A, tau_max=TAU_A, steps=1500, batch_size=256, lr=5e-3,
                            fractions={"local": 0.25, "semigroup": 0.75}, curriculum_fraction=0.5, seed=0)
        out = FM.train_ssfm(model, sampler, cfg, latent_fn=model.latent_fn)
        res[n_coef] = _strong_errors(sde, frames, out["ema"].model, n_coef)
        res[n_coef]["train_s"] = out["wall_s"]
    print("\n(a) double well, τ = 0.5:", res)
    em = res[3]["coarse_em"]
    # far below one coarse step: measured 0.055-0.065 of it; 0.15 leaves > 2× headroom
    assert res[3]["model"] < 0.15 * em
    # N = 1 is pinned by its floor: measured 1.00-1.03× the floor, 0.33-0.37 of a coarse step
    assert res[1]["model"] < 1.25 * res[1]["floor_mean"] and res[1]["model"] < 0.5 * em
    # more coefficients, smaller error: measured N=3/N=1 = 0.17-0.19; the N=3 model is within
    # 1.8-2.1× its (ten times lower) floor
    assert res[3]["model"] < 0.35 * res[1]["model"]
    assert res[3]["model"] < 3.5 * res[3]["floor_mean"]


# ------------------------------------------------------------------------------------------
# (b) the latent: an underdamped oscillator jumped over three periods
# ------------------------------------------------------------------------------------------
OMEGA_B, TAU_B, H0_B = 2 * math.pi, 3.0, 3.0 / 8


def _train_oscillator(objective, sde, frames, coeffs):
    torch.manual_seed(0)
    sampler = FM.TrajectoryDataSampler(frames, coeffs, H0_B)
    model = FM.ToyFlowMap.for_sde(sde, 3, latent_dim=2, hidden=64, depth=2, base="identity",
                                  state_scale=[1 / OMEGA_B, 1.0])
    cfg = FM.SSFMConfig(objective=objective, h0=H0_B, tau_min=TAU_B, tau_max=TAU_B, steps=800, batch_size=256,
                        lr=5e-3, fractions={"direct": 1.0}, seed=0)
    out = FM.train_ssfm(model, sampler, cfg, latent_fn=model.latent_fn,
                        score_features=FM.scaled_features(torch.tensor([1 / OMEGA_B, 1.0])))
    return out["ema"].model, out["wall_s"]


def _oscillator_metrics(sde, model, seed=2000, n_roll=1000, n_jumps=12, n_starts=32, n_cond=256):
    g = torch.Generator().manual_seed(seed)
    var = sde.info["stationary_var"]
    out = {}
    # free-running rollouts: fresh coefficients (continuous law) and latents every jump, from exact
    # stationary starts; variance over replicas and the last 6 jumps, / theory (kT/ω², kT)
    z0 = sde.info["sample_stationary"](n_roll, g).float()
    fresh = lambda t, gen: FM.sample_coefficients_torch(t, 3, (1,), gen)  # noqa: E731
    for mode in ("sample", "mean"):
        traj = FM.rollout(model, z0, n_jumps, TAU_B, model.latent_fn, coefficients=fresh, mode=mode, n_mean=8,
                          generator=g)
        zz = traj[:, n_jumps // 2 + 1:].reshape(-1, 2).double()
        out[f"var_kept_{mode}"] = (zz.var(0) / var).tolist()
        out[f"finite_{mode}"] = bool(torch.isfinite(traj).all())
    # one jump from 32 starts, each with fixed coefficients and 256 fine BAOAB paths (dt = 0.01)
    # sharing them (exact conditional per-step noise) vs 256 latent draws of the map
    dt = 0.01
    k = int(round(TAU_B / dt))
    zs = sde.info["sample_stationary"](n_starts, g).repeat_interleave(n_cond, 0)
    xi = torch.randn(k, n_starts, 1, generator=g, dtype=torch.float64).repeat_interleave(n_cond, 1)
    xi = torch.as_tensor(B.conditional_noise(xi.numpy(), 3, dt, rng=seed))
    ref = S.fine_solve(sde, zs, dt, xi).reshape(n_starts, n_cond, 2)
    L = S.path_coefficients(xi, 3, dt).float()
    samp = FM.predict(model, zs.float(), L, torch.full((zs.shape[0],), TAU_B), model.latent_fn, mode="sample",
                      generator=g).double().reshape(n_starts, n_cond, 2)
    fine_var = ref.var(1).mean(0)
    out["fine_cond_std_over_stationary"] = (fine_var / var).sqrt().tolist()
    out["cond_std_ratio"] = (samp.var(1).mean(0) / fine_var).sqrt().tolist()
    pair = (ref[:, 0::2] - ref[:, 1::2]).pow(2).mean((0, 1)).sqrt()
    out["sample_error_over_pair"] = ((samp - ref).pow(2).mean((0, 1)).sqrt() / pair).tolist()
    return out


def test_b_latent_energy_score_keeps_variance_squared_error_collapses():
    # Harmonic oscillator ω = 2π (period 1), γ = 1, kT = 1, m = 1, jumped over τ = 3 periods with
    # N = 3 coefficients.  Three Legendre polynomials over three periods barely overlap the
    # oscillating response kernel, so they pin almost nothing: fine simulation's spread given
    # (z_s, L) is 0.92 (x) and 0.96 (v) of the stationary spread (measured here).
    # Data: 256 stationary replicas, BAOAB dt = 3/256, frames every h0 = 3/8, 48 frames; training
    # on recorded jumps of τ = 8 frames (direct loss, composed coefficients), MLP 2×64, 800 steps,
    # 256 items, energy score m = 2 in coordinates scaled by the thermal spreads, vs squared error.
    sde = S.harmonic_langevin([OMEGA_B], gamma=1.0, kT=1.0)
    g = torch.Generator().manual_seed(0)
    z0 = sde.info["sample_stationary"](256, g)
    frames, coeffs = S.simulate_with_coefficients(sde, z0, H0_B / 32, 32, 48, 3, g)
    res = {}
    for objective in ("mse", "energy"):
        model, wall = _train_oscillator(objective, sde, frames, coeffs)
        res[objective] = _oscillator_metrics(sde, model)
        res[objective]["train_s"] = wall
    print("\n(b) oscillator, τ = 3 periods:", res)
    mse_r, en_r = res["mse"], res["energy"]
    assert en_r["finite_sample"] and mse_r["finite_sample"]
    # squared error: rollouts keep 12.5-14% of the x variance and 1.4-1.6% of the v variance
    # (seeds 0, 1; DESIGN §3.2: 1% of v), in sample and mean mode alike (it ignores ε); its
    # one-jump spread is 1-2% of fine simulation's.  Bounds leave 2.5× and 6× headroom.
    for mode in ("sample", "mean"):
        assert mse_r[f"var_kept_{mode}"][0] < 0.35 and mse_r[f"var_kept_{mode}"][1] < 0.1
    assert max(mse_r["cond_std_ratio"]) < 0.1
    # the mean map's error is the pair RMS/√2 (measured 0.71, 0.71): it is the conditional mean
    assert all(0.6 < r < 0.85 for r in mse_r["sample_error_over_pair"])
    # energy score + latent: stationary variance kept 0.97-1.02 (seeds 0, 1).  Sampling error of
    # the variance: ~6000 nearly independent states (jump-to-jump correlation e^{-γτ/2} = 0.22 in
    # amplitude) -> relative SE sqrt(2/6000) = 1.8%; 15% = 5 SE + the measured model error (≤ 3%)
    # + room for seed variation.
    assert all(abs(v - 1) < 0.15 for v in en_r["var_kept_sample"]), en_r["var_kept_sample"]
    # one-jump conditional spread: measured 0.98-1.00 of fine simulation's (statistical SE < 1%)
    assert all(abs(r - 1) < 0.15 for r in en_r["cond_std_ratio"]), en_r["cond_std_ratio"]
    # sample-mode error vs the pair RMS (exact-in-law map: ratio 1; DESIGN measured 1.1): 1.00
    assert all(0.85 < r < 1.2 for r in en_r["sample_error_over_pair"])


# ------------------------------------------------------------------------------------------
# (c) issue #10, reduced: the mixed-mode toy in sample mode (benchmarks/mixed_mode_toy.py)
# ------------------------------------------------------------------------------------------
def _mixed_mode_reduced(seed=0, steps=1500, whitened=True, hidden=64, depth=2, replicas=64, frames=400,
                        fine=False):
    """Reduced issue-#10 benchmark (see test_c): returns the rollout statistics at τ = 0.5 (with
    ``fine``, also fine BAOAB's switch rate and barrier share from the same starts)."""
    torch.manual_seed(seed)
    toy = S.mixed_mode_toy(seed=0)
    nd = toy.n_dof
    g = torch.Generator().manual_seed(seed)
    var = toy.info["stationary_var"]
    rot = toy.info["rotation"]
    q = torch.randn(replicas, nd, generator=g, dtype=torch.float64) * var[:nd].sqrt()
    q[:, -1] = torch.where(torch.rand(replicas, generator=g) < 0.5, -1.0, 1.0)
    z0 = torch.cat([q @ rot.T, torch.randn(replicas, nd, generator=g, dtype=torch.float64) @ rot.T], 1)
    burn, _ = S.simulate_with_coefficients(toy, z0, 0.004, 10, 50, 3, g)
    data, coeffs = S.simulate_with_coefficients(toy, burn[:, -1], 0.004, 5, frames, 3, g)
    a = torch.block_diag(rot, rot)
    sig = var.sqrt()
    if whitened:  # the stability fix: network in whitened normal modes, linear skip
        kw = dict(state_transform=a.float(), state_scale=sig.float(), linear_skip=True)
    else:  # the earlier parametrisation: x, v scaled per coordinate, MLP only
        kw = dict(state_scale=torch.cat([torch.sqrt((rot**2) @ var[:nd]), torch.ones(nd, dtype=torch.float64)]).float())
    model = FM.ToyFlowMap.for_sde(toy, 3, latent_dim=2 * nd, hidden=hidden, depth=depth, base="identity", tau_ref=0.5, **kw)
    cfg = FM.SSFMConfig(objective="energy", crps_weight=1.0, h0=0.02, tau_min=0.5, tau_max=0.5, steps=steps,
                        batch_size=256, lr=1e-3, lr_final_fraction=0.05, ema_decay=0.995, fractions={"direct": 1.0},
                        dyadic=False, seed=seed)
    out = FM.train_ssfm(model, FM.TrajectoryDataSampler(data, coeffs, 0.02), cfg, latent_fn=model.latent_fn,
                        score_features=FM.linear_features(a.float(), sig.float()))
    net = out["ema"].model
    starts = data[torch.randint(0, replicas, (128,), generator=g), torch.randint(0, frames + 1, (128,), generator=g)]
    fresh = lambda t, gen: FM.sample_coefficients_torch(t, 3, (nd,), gen)  # noqa: E731
    traj = FM.rollout(net, starts.float(), 40, 0.5, net.latent_fn, coefficients=fresh, generator=g)
    modes = toy.info["to_modes"](traj[:, 4:].double().reshape(-1, 2 * nd)).reshape(128, -1, 2 * nd)
    ratio = modes.reshape(-1, 2 * nd).var(0) / var
    all_modes = toy.info["to_modes"](traj.double().reshape(-1, 2 * nd)).reshape(128, -1, 2 * nd)
    jump_max = (all_modes.var(0) / var).max(1).values  # largest mode variance / theory at each jump
    qw = modes[:, :, nd - 1]
    switch = lambda q: (torch.sign(q[:, 1:]) != torch.sign(q[:, :-1])).double().mean().item() / 0.5  # noqa: E731
    res = {"finite": bool(torch.isfinite(traj).all()), "max_var_by_jump": jump_max.tolist(),
           "var_x": ratio[:nd].tolist(), "var_v": ratio[nd:].tolist(),
           "right_well_share": (qw > 0).double().mean().item(), "switch_rate": switch(qw),
           "barrier_share": (qw.abs() < 0.5).double().mean().item(), "train_s": out["wall_s"]}
    if fine:  # fine BAOAB (dt 0.004) from the same starts, sampled every τ = 0.5, the same jumps kept
        ref, _ = S.simulate_with_coefficients(toy, starts.double(), 0.004, 125, 40, 1, g)
        qf = toy.info["to_modes"](ref[:, 4:].reshape(-1, 2 * nd)).reshape(128, -1, 2 * nd)[:, :, nd - 1]
        res["fine_switch_rate"], res["fine_barrier_share"] = switch(qf), (qf.abs() < 0.5).double().mean().item()
    return res


def test_c_mixed_mode_toy_sample_mode_reduced():
    # 17-D toy (16 harmonic modes ω 0.5-20 + double well, mixed by a rotation), γ = kT = 1.
    # Reduced benchmark: 128 replicas × 20 time units of BAOAB (dt = 0.004) recorded every 0.02
    # with N = 3 (the benchmark's data size); one map for τ = 0.5 trained on recorded jumps of
    # exactly τ (direct loss, 25 composed intervals) with the default objective (energy score +
    # per-coordinate CRPS, both in whitened normal-mode coordinates), ToyFlowMap in whitened
    # coordinates with a linear skip (the stability fix), MLP 3×128, 12000 steps of 256 items
    # (≈ 60 s).  Free-running rollouts (fresh coefficients and latents) of 128 replicas over 40
    # jumps from data frames, and fine BAOAB from the same starts; statistics over jumps 4-40.
    # Why 12000 steps: the map first learns the best *linear-Gaussian* jump (the linear skip: the
    # well coordinate's next value linear in its start, constant spread) and only leaves that
    # plateau after ≈ 6000-9000 steps (benchmark size) — at 1500-8000 steps the switch rate was
    # 3.7-4.2× fine (the "open problem" of DESIGN §3.3 was under-training).  With 64 replicas ×
    # 8 time units of data it did not leave the plateau by 15000 steps (switch 0.275).
    # Measured (seeds 0, 1, 2): switch rate 0.064, 0.066, 0.069 per time unit; barrier share
    # (|q_well| < 0.5) 0.116, 0.116, 0.136; right-well share 0.50-0.52; variance / theory of the
    # 34 modes 0.90-1.09; largest mode variance / theory at any jump 1.39-1.46.
    r = _mixed_mode_reduced(0, steps=12000, hidden=128, depth=3, replicas=128, frames=1000, fine=True)
    show = lambda d: {k: ([round(x, 2) for x in v] if isinstance(v, list) else v) for k, v in d.items()}  # noqa: E731
    print("\n(c) mixed-mode toy τ = 0.5:", show(r))
    assert r["finite"]
    # stable: the largest per-jump mode variance measured ≤ 1.46 (128 replicas: the variance of
    # one mode has SE ≈ 12%, and this is the maximum over 34 modes × 40 jumps); 2.0 is far below
    # the unstable parametrisation's 10-14.5
    assert max(r["max_var_by_jump"]) < 2.0, r["max_var_by_jump"]
    # every mode within [0.8, 1.2] of theory: measured 0.90-1.09 over 3 seeds; 128 replicas ×
    # 36 jumps with correlation times up to ~4 jumps give ≈ 1000 independent states, SE ≈ 4-5%
    # per mode, so the band is the measured spread plus ≈ 2 SE either side
    ratios = r["var_x"] + r["var_v"]
    assert all(0.8 < v < 1.2 for v in ratios), show(r)
    # right-well share: measured 0.50-0.52; starts drawn from 128 data replicas (SE of their share
    # ≈ 0.045, the well relaxes slowly), so 0.12 ≈ 2.5 SE
    assert abs(r["right_well_share"] - 0.5) < 0.12
    # barrier kinetics against fine simulation from the same starts (the target: switch
    # rate within 20%).  Each rate counts ≈ 0.07 × 128 × 18 ≈ 160 sign changes: Poisson SE ≈ 8%
    # each, ≈ 11% on the ratio; the bound 0.7-1.35 is ≈ 3 SE of counting noise (measured ratio
    # 0.88 for seed 0 against fine 0.073 from its starts; seeds 1, 2: 0.066, 0.069 against the
    # benchmark's fine 0.070).  Before the longer training: 3.7-4.2×.
    ratio = r["switch_rate"] / r["fine_switch_rate"]
    assert 0.7 < ratio < 1.35, (r["switch_rate"], r["fine_switch_rate"])
    # the well's marginal is bimodal again: barrier share measured 0.116-0.136 (fine 0.135); the
    # plateau's linear-Gaussian map gave 0.37-0.42; bound 0.2
    assert r["barrier_share"] < 0.2, r["barrier_share"]
    # the contrast that motivated the stability fix (reduced data and steps, as measured before):
    # the per-coordinate MLP blows up (measured 10.4-14.5 at the last jump for seeds 0-2; bound 5)
    old = _mixed_mode_reduced(0, whitened=False)
    print("(c) per-coordinate MLP (unstable):", show(old))
    assert not old["finite"] or old["max_var_by_jump"][-1] > 5.0
