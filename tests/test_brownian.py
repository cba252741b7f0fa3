"""Tests of molflow.brownian: Legendre path coefficients, composition, splitting, paths.

Statistical tolerances (fixed seeds, so every run is deterministic; the tolerances say how far
a correct implementation can be from the truth, and are all 5 standard errors (SE) unless stated):
* a variance estimated from n iid Gaussian samples has relative SE sqrt(2/n);
* a sample correlation of independent Gaussians has SE 1/sqrt(n);
* a sample covariance entry Σ̂_ij has SE sqrt((Σ_ii Σ_jj + Σ_ij²)/n);
* a sample mean has SE sqrt(var/n).
"""

from __future__ import annotations

import time
from fractions import Fraction
from math import comb

import numpy as np
import pytest
import torch

from molflow import brownian as B

DESIGN_C = np.array(
    [[1, 0, 0, 0], [-1 / 2, 1 / 2, 0, 0], [0, -3 / 4, 1 / 4, 0], [1 / 8, 3 / 8, -5 / 8, 1 / 8]]
)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _shifted_legendre_coeffs(n: int) -> list[int]:
    """Integer monomial coefficients c_k of P_n(x) = Σ_k c_k x^k on [0, 1]."""
    return [(-1) ** (n + k) * comb(n, k) * comb(n + k, k) for k in range(n + 1)]


def _exact_step_mean(n: int, k: int, big_k: int) -> Fraction:
    """K ∫_{k/K}^{(k+1)/K} P_n exactly in rational arithmetic."""
    a, b = Fraction(k, big_k), Fraction(k + 1, big_k)
    return big_k * sum(Fraction(c, j + 1) * (b ** (j + 1) - a ** (j + 1)) for j, c in enumerate(_shifted_legendre_coeffs(n)))


def _assert_cov_close(samples: np.ndarray, expected_cov: np.ndarray, n_se: float = 5.0) -> None:
    """samples (n, d); every entry of the sample covariance within n_se SE of expected."""
    n = samples.shape[0]
    emp = samples.T @ samples / n  # zero-mean variables: no mean subtraction needed
    d = np.diag(expected_cov)
    se = np.sqrt((np.outer(d, d) + expected_cov**2) / n)
    assert np.all(np.abs(emp - expected_cov) <= n_se * se + 1e-14), np.max(np.abs(emp - expected_cov) / (se + 1e-300))


def _corr(x: np.ndarray) -> np.ndarray:
    c = np.cov(x, rowvar=False)
    s = np.sqrt(np.diag(c))
    return c / np.outer(s, s)


# ------------------------------------------------------------------------------------------
# per-step weights and the discrete law
# ------------------------------------------------------------------------------------------
def test_step_weights_exact_at_large_k():
    # K = 100000: compare with exact rational step integrals at a spread of steps.
    n_coef, big_k, dt = 8, 100_000, 1e-3
    w = B.legendre_step_weights(n_coef, big_k, dt)
    assert w.shape == (n_coef, big_k)
    for k in [0, 1, 2, 17, 4999, 33333, 50000, 50001, 77777, big_k - 2, big_k - 1]:
        for n in range(n_coef):
            exact = float(_exact_step_mean(n, k, big_k)) * np.sqrt(dt)
            # |P_n| <= 1 on [0, 1]: absolute error relative to sqrt(dt) is the relevant scale
            assert abs(w[n, k] - exact) <= 1e-14 * np.sqrt(dt), (n, k, w[n, k], exact)
    # Σ_k w[n,k] = sqrt(dt) K ∫_0^1 P_n = sqrt(dt) K δ_n0 (sum of 1e5 O(1) terms: rounding ~1e-11)
    sums = w.sum(axis=1) / (np.sqrt(dt) * big_k)
    np.testing.assert_allclose(sums, np.eye(n_coef)[0], atol=1e-12)


def test_step_weights_small_cases():
    dt = 0.002
    w1 = B.legendre_step_weights(4, 1, dt)  # one step: only the increment survives
    np.testing.assert_allclose(w1[:, 0], [np.sqrt(dt), 0, 0, 0], atol=1e-16)
    w2 = B.legendre_step_weights(3, 2, dt)
    # means of P_1 = 2u-1 over halves: -1/2, +1/2 ; of P_2 = 6u²-6u+1: 2(1/4 - 3/4 + 1/2) = 0
    np.testing.assert_allclose(w2 / np.sqrt(dt), [[1, 1], [-0.5, 0.5], [0, 0]], atol=1e-15)
    assert B.legendre_step_weights(0, 5, dt).shape == (0, 5)
    with pytest.raises(ValueError):
        B.legendre_step_weights(3, 0, dt)


def test_discrete_covariance_design_numbers():
    dt = 1e-3
    # K = 10: var(L^(2)) = 0.9504 · h/5 (DESIGN: 0.95), correlations up to 0.66 at N = 8.
    c10 = B.discrete_covariance(8, 10, dt)
    ratio10 = np.diag(c10) / B.continuous_variances(8, 10 * dt)
    assert ratio10[2] == pytest.approx(0.9504, abs=1e-4)
    assert ratio10[0] == pytest.approx(1.0, abs=1e-12)  # the increment's variance is exact
    s = np.sqrt(np.diag(c10))
    max_corr = np.max(np.abs(c10 / np.outer(s, s) - np.eye(8)))
    assert max_corr == pytest.approx(0.66, abs=0.01)
    # K = 100: within 1% of the continuous law up to N = 7 (n <= 6) ...
    c100 = B.discrete_covariance(8, 100, dt)
    ratio100 = np.diag(c100) / B.continuous_variances(8, 100 * dt)
    assert np.all(np.abs(ratio100[:7] - 1) < 0.01)
    assert abs(ratio100[7] - 1) < 0.015  # ... n = 7 is 1.4% low at K = 100, within 1% from K = 120
    c120 = B.discrete_covariance(8, 120, dt)
    assert np.all(np.abs(np.diag(c120) / B.continuous_variances(8, 120 * dt) - 1) < 0.01)
    s = np.sqrt(np.diag(c100))
    assert np.max(np.abs(c100 / np.outer(s, s) - np.eye(8))) < 0.01
    # and tends to the continuous law (deficit of order n²/K²)
    c = B.discrete_covariance(4, 5000, dt)
    np.testing.assert_allclose(c, np.diag(B.continuous_variances(4, 5.0)), atol=1e-5 * 5.0)


def test_variances_and_independence_on_fine_paths():
    # Coefficients of fine discrete Brownian paths (K = 1000: discrete law within 1e-5 of the
    # continuous one, far below the tolerances) have variances h/(2n+1) and are uncorrelated.
    rng = np.random.default_rng(1)
    n_paths, big_k, h, n_coef = 4000, 1000, 0.37, 6
    xi = rng.standard_normal((big_k, n_paths))
    coef = B.coefficients_from_noise(xi, n_coef, h / big_k)  # (N, n)
    var = (coef**2).mean(axis=1)  # known zero mean
    np.testing.assert_array_less(np.abs(var / B.continuous_variances(n_coef, h) - 1), 5 * np.sqrt(2 / n_paths))
    corr = _corr(coef.T)
    assert np.max(np.abs(corr - np.eye(n_coef))) < 5 / np.sqrt(n_paths)


def test_sample_coefficients_laws():
    rng = np.random.default_rng(2)
    n = 20000
    # continuous law
    x = B.sample_coefficients(rng, 5, 0.2, (n,))
    assert x.shape == (5, n)
    _assert_cov_close(x.T, np.diag(B.continuous_variances(5, 0.2)))
    # exact discrete law of K = 10 engine steps (strongly non-diagonal at N = 8)
    x = B.sample_coefficients(rng, 8, 0.01, (n,), n_steps=10)
    _assert_cov_close(x.T, B.discrete_covariance(8, 10, 0.001))
    # dt given instead of n_steps; batch axes carried along
    x = B.sample_coefficients(rng, 3, 0.01, (4, 22, 3), dt_ps=0.001)
    assert x.shape == (3, 4, 22, 3)
    with pytest.raises(ValueError):
        B.sample_coefficients(rng, 3, 0.01, (2,), dt_ps=0.003)  # not a whole number of steps


# ------------------------------------------------------------------------------------------
# composition
# ------------------------------------------------------------------------------------------
def test_equal_halves_match_design():
    a_left, a_right = B.composition_matrices([0.05, 0.05], 4)
    s = (-1.0) ** np.add.outer(np.arange(4), np.arange(4))
    np.testing.assert_allclose(a_left, DESIGN_C, atol=1e-14)
    np.testing.assert_allclose(a_right, DESIGN_C * s, atol=1e-14)
    # the same matrices are the leading blocks at larger N (P_n restricted has degree n)
    big = B.composition_matrices([2.0, 2.0], 8)
    np.testing.assert_allclose(big[0][:4, :4], DESIGN_C, atol=1e-14)
    assert np.all(np.triu(big[1], 1) == 0)


@pytest.mark.parametrize("n_coef", [1, 2, 3, 5, 8])
def test_compose_matches_direct_integration_of_discrete_paths(n_coef):
    # Union coefficients integrated directly from the per-step Gaussians agree with the
    # composition of the pieces' coefficients, for unequal, many pieces and batch axes.
    rng = np.random.default_rng(3)
    dt = 1e-3
    steps = [7, 1, 30, 3, 100, 13, 2, 64]
    xi = rng.standard_normal((sum(steps), 5, 4, 3))
    direct = B.coefficients_from_noise(xi, n_coef, dt)
    bounds = np.cumsum([0] + steps)
    pieces = [B.coefficients_from_noise(xi[a:b], n_coef, dt) for a, b in zip(bounds[:-1], bounds[1:])]
    durations = np.array(steps) * dt
    composed = B.compose(pieces, durations)
    assert composed.shape == (n_coef, 5, 4, 3)
    scale = np.sqrt(sum(steps) * dt)
    np.testing.assert_allclose(composed, direct, atol=1e-12 * scale)
    np.testing.assert_allclose(B.compose(np.stack(pieces), durations), direct, atol=1e-12 * scale)


def test_compose_is_associative_and_torch_matches():
    rng = np.random.default_rng(4)
    d = np.array([0.3, 0.05, 1.1, 0.2])
    pieces = rng.standard_normal((4, 6, 10))
    whole = B.compose(pieces, d)
    nested = B.compose([B.compose(pieces[:2], d[:2]), B.compose(pieces[2:], d[2:])], [d[:2].sum(), d[2:].sum()])
    np.testing.assert_allclose(nested, whole, atol=1e-13)
    np.testing.assert_allclose(B.compose(pieces[:1], d[:1]), pieces[0], atol=1e-15)  # one piece: identity
    t = B.compose_torch(torch.as_tensor(pieces), d)
    np.testing.assert_allclose(t.numpy(), whole, atol=1e-13)


# ------------------------------------------------------------------------------------------
# splitting
# ------------------------------------------------------------------------------------------
def test_split_then_compose_is_identity():
    rng = np.random.default_rng(5)
    h = 0.8
    for n_coef in (1, 3, 8):
        parent = B.sample_coefficients(rng, n_coef, h, (3, 22, 3))
        cases = [  # (pieces argument, resulting durations in ps)
            (2, [0.4, 0.4]),
            ([0.1, 0.5, 0.2], [0.1, 0.5, 0.2]),  # durations (sum to h)
            ([0.125, 0.25, 0.5, 0.125], [0.1, 0.2, 0.4, 0.1]),  # fractions (sum to 1)
            ([0.05] * 16, [0.05] * 16),
        ]
        for pieces, dur in cases:
            kids = B.split(parent, h, pieces, rng)
            assert kids.shape == (len(dur), n_coef, 3, 22, 3)
            np.testing.assert_allclose(B.compose(kids, dur), parent, atol=1e-10)
    # discrete variant, including pieces shorter than N steps
    parent = B.sample_coefficients(rng, 8, 0.03, (4, 3), n_steps=30)
    kids = B.split_discrete(parent, [3, 20, 7], 0.001, rng)
    np.testing.assert_allclose(B.compose(kids, [0.003, 0.02, 0.007]), parent, atol=1e-10)


def _conditional_cov(sigma_c: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Gaussian conditioning of children c ~ N(0, Σc) on M c: (gain, covariance)."""
    s = m @ sigma_c @ m.T
    gain = sigma_c @ m.T @ np.linalg.pinv(s)
    return gain, sigma_c - gain @ m @ sigma_c


def test_split_continuous_law():
    rng = np.random.default_rng(6)
    n_coef, h, n = 3, 0.5, 20000
    fr = np.array([0.2, 0.5, 0.3])
    d = fr * h
    # (a) unconditional: parent from its law, then split -> children iid N(0, d_p/(2m+1))
    parent = B.sample_coefficients(rng, n_coef, h, (n,))
    kids = B.split(parent, h, fr, rng)  # (3, N, n)
    flat = kids.reshape(-1, n).T
    expected = np.diag((d[:, None] / (2 * np.arange(n_coef) + 1)).reshape(-1))
    _assert_cov_close(flat, expected)
    # (b) conditional on one fixed parent value: mean and covariance vs textbook formula
    m = np.concatenate(B.composition_matrices(d, n_coef), axis=1)
    gain, cov = _conditional_cov(expected, m)
    fixed = np.array([0.4, -0.3, 0.25])
    kids = B.split(np.repeat(fixed[:, None], n, axis=1), h, d, rng)
    flat = kids.reshape(-1, n).T
    mean_expected = gain @ fixed
    se_mean = np.sqrt(np.clip(np.diag(cov), 1e-30, None) / n)
    assert np.all(np.abs(flat.mean(0) - mean_expected) < 5 * se_mean + 1e-12)
    _assert_cov_close(flat - mean_expected, cov)
    # the conditional covariance is singular (rank 3·3 - 3 = 6): composing removes all spread
    assert np.linalg.matrix_rank(cov, tol=1e-10) == 6


def test_split_discrete_law():
    rng = np.random.default_rng(7)
    n_coef, dt, n = 4, 0.001, 20000
    steps = [3, 9, 5]
    parent = B.sample_coefficients(rng, n_coef, sum(steps) * dt, (n,), n_steps=sum(steps))
    kids = B.split_discrete(parent, steps, dt, rng)
    flat = kids.reshape(-1, n).T
    expected = np.zeros((3 * n_coef, 3 * n_coef))
    for i, k in enumerate(steps):
        expected[i * n_coef:(i + 1) * n_coef, i * n_coef:(i + 1) * n_coef] = B.discrete_covariance(n_coef, k, dt)
    # children independent with their own exact discrete covariances (incl. singular K=3 < N=4)
    _assert_cov_close(flat, expected)


# ------------------------------------------------------------------------------------------
# conditional per-step noise
# ------------------------------------------------------------------------------------------
def test_conditional_noise():
    rng = np.random.default_rng(8)
    big_k, n_coef, dt, n = 12, 3, 0.001, 20000
    xi = rng.standard_normal((big_k, n))
    xi2 = B.conditional_noise(xi, n_coef, dt, rng)
    w = B.legendre_step_weights(n_coef, big_k, dt)
    np.testing.assert_allclose(w @ xi2, w @ xi, atol=1e-13)
    # per-step marginal N(0, 1)
    assert np.all(np.abs(xi2.mean(1)) < 5 / np.sqrt(n))
    assert np.all(np.abs(xi2.var(1) - 1) < 5 * np.sqrt(2 / n))
    # projector onto the row space of w (independent derivation via the pseudo-inverse)
    proj = w.T @ np.linalg.solve(w @ w.T, w)
    # unshared part (I - P) ξ' has covariance I - P; Cov(ξ, ξ') = P
    _assert_cov_close(((np.eye(big_k) - proj) @ xi2).T, np.eye(big_k) - proj)
    cross = xi @ xi2.T / n
    # SE of a cross-covariance entry of unit-variance variables: <= sqrt(2/n)
    assert np.max(np.abs(cross - proj)) < 5 * np.sqrt(2 / n)
    # N = 0: fresh noise, uncorrelated with ξ
    fresh = B.conditional_noise(xi, 0, dt, rng)
    assert np.max(np.abs(xi @ fresh.T / n)) < 5 * np.sqrt(1 / n)
    # long interval with atom/xyz axes, N = 8: coefficients preserved exactly
    xi = rng.standard_normal((2000, 2, 22, 3))
    xi2 = B.conditional_noise(xi, 8, dt, rng)
    np.testing.assert_allclose(B.coefficients_from_noise(xi2, 8, dt), B.coefficients_from_noise(xi, 8, dt), atol=1e-12)
    assert (xi2 - xi).std() > 1.3  # otherwise independent: mostly new noise (≈ sqrt(2))


# ------------------------------------------------------------------------------------------
# polynomial path
# ------------------------------------------------------------------------------------------
def test_polynomial_path_endpoints_and_conditional_mean():
    rng = np.random.default_rng(9)
    h, n_coef = 0.3, 8
    coef = B.sample_coefficients(rng, n_coef, h, (5, 3))
    np.testing.assert_allclose(B.polynomial_path(coef, h, 1.0), coef[0], atol=1e-14)
    np.testing.assert_allclose(B.polynomial_path(coef, h, 0.0), 0.0, atol=1e-15)
    u = np.linspace(0, 1, 11)
    assert B.polynomial_path(coef, h, u).shape == (11, 5, 3)
    # derivative: dW^(N)/dt integrates back (Gauss–Legendre, exact for degree N-1)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    x = (nodes + 1) / 2 * 0.6  # integrate over u in [0, 0.6]
    deriv = B.polynomial_path(coef, h, x, derivative=True)
    integral = np.tensordot(weights / 2 * 0.6 * h, deriv, axes=(0, 0))
    np.testing.assert_allclose(integral, B.polynomial_path(coef, h, 0.6), atol=1e-13)
    # conditional mean: E[W(s+uh)-W_s | L] = Σ_n Cov(W_u, L^n)/Var(L^n) L^n with
    # Cov(W_u, L^n) = h ∫_0^u P_n.  polynomial_path on the unit vector e_n gives its weight a_n(u).
    g = B.polynomial_path(np.eye(n_coef), h, u)  # (U, N)
    for n in range(n_coef):
        anti = np.polynomial.Polynomial(_shifted_legendre_coeffs(n)).integ()
        cov_exact = h * (anti(u) - anti(0.0))
        np.testing.assert_allclose(g[:, n] * h / (2 * n + 1), cov_exact, atol=1e-14)


def test_polynomial_path_converges_at_theoretical_rate():
    # E ∫_0^1 (W - W^(N))² du = h N / (2(4N² - 1)) (derived in polynomial_path_l2_error).
    # Fine discrete paths, K = 1024 steps: the grid/trapezoid discretisation bias of this
    # expectation is <= 1e-4 relative at N = 8 (computed exactly from the step weights), far
    # below 5 SE (SE ≈ 0.5-1.5% relative here).  Measured (seed 10): N=1 0.1681±0.0026 vs 0.1667,
    # N=2 0.0666±0.0007 vs 0.0667, N=3 0.0430±0.0004 vs 0.0429, N=8 0.01568±0.00008 vs 0.01569.
    rng = np.random.default_rng(10)
    n_paths, big_k, h = 4000, 1024, 1.0
    dt = h / big_k
    xi = rng.standard_normal((big_k, n_paths))
    w_path = np.concatenate([np.zeros((1, n_paths)), np.cumsum(np.sqrt(dt) * xi, axis=0)])  # (K+1, n)
    u = np.arange(big_k + 1) / big_k
    tw = np.full(big_k + 1, 1.0 / big_k)
    tw[[0, -1]] /= 2
    coef = B.coefficients_from_noise(xi, 8, dt)
    errs = []
    for n_coef in (1, 2, 3, 8):
        resid = w_path - B.polynomial_path(coef[:n_coef], h, u)
        l2 = tw @ resid**2  # per path
        mean, se = l2.mean(), l2.std(ddof=1) / np.sqrt(n_paths)
        theory = B.polynomial_path_l2_error(n_coef, h)
        sup = np.abs(resid).max(axis=0).mean()
        assert abs(mean - theory) < 5 * se, (n_coef, mean, se, theory)
        errs.append(sup)
        # residual is uncorrelated with the coefficients it was built from (conditional mean):
        # at u = 1/2, corr(W - W^(N), L^m) = 0 within 5/sqrt(n)
        mid = resid[big_k // 2]
        for m in range(n_coef):
            assert abs(np.corrcoef(mid, coef[m])[0, 1]) < 5 / np.sqrt(n_paths)
    assert all(a > b for a, b in zip(errs, errs[1:]))  # sup error decreases with N


# ------------------------------------------------------------------------------------------
# BrownianPath (torch)
# ------------------------------------------------------------------------------------------
def test_brownian_path_consistency_and_reproducibility():
    s, u, t = 0.13, 0.4711, 1.3
    path = B.BrownianPath(0.0, 1.7, (3, 4, 3), 8, seed=11, dtype=torch.float64)
    a, b, whole = path.coefficients(s, u), path.coefficients(u, t), path.coefficients(s, t)
    assert whole.shape == (8, 3, 4, 3) and whole.dtype == torch.float64
    comp = B.compose_torch(torch.stack([a, b]), [u - s, t - u])
    assert torch.max(torch.abs(comp - whole)) < 1e-12
    assert torch.equal(path.coefficients(s, t), whole)  # repeated query
    # many points: increments add up, and the nested compositions agree
    pts = [0.0, 0.1, 0.2, 0.3, 0.55, 0.9, 1.0, 1.7]
    pieces = torch.stack([path.coefficients(p, q) for p, q in zip(pts[:-1], pts[1:])])
    total = path.coefficients(0.0, 1.7)
    assert torch.max(torch.abs(B.compose_torch(pieces, np.diff(pts)) - total)) < 1e-12
    assert torch.max(torch.abs(path.increment(0.0, 0.55) - pieces[:4, 0].sum(0))) < 1e-12
    # same seed -> same values, whatever the query order or cache size; different seed differs
    other = B.BrownianPath(0.0, 1.7, (3, 4, 3), 8, seed=11, dtype=torch.float64, cache_size=2)
    b2 = other.coefficients(u, t)
    assert torch.equal(other.coefficients(s, t), whole)
    assert torch.equal(b2, b)
    assert not torch.allclose(B.BrownianPath(0.0, 1.7, (3, 4, 3), 8, seed=12, dtype=torch.float64).coefficients(s, t), whole)
    # float32
    p32 = B.BrownianPath(0.0, 1.7, (3, 4, 3), 8, seed=11, dtype=torch.float32)
    a32, b32, w32 = p32.coefficients(s, u), p32.coefficients(u, t), p32.coefficients(s, t)
    assert w32.dtype == torch.float32
    assert torch.max(torch.abs(B.compose_torch(torch.stack([a32, b32]), [u - s, t - u]) - w32)) < 1e-6
    assert torch.max(torch.abs(w32.double() - whole)) < 1e-6  # same path, cast
    # degenerate and invalid queries
    assert torch.count_nonzero(path.coefficients(0.5, 0.5)) == 0
    with pytest.raises(ValueError):
        path.coefficients(0.5, 2.0)
    with pytest.raises(ValueError):
        path.coefficients(0.6, 0.5)


def test_brownian_path_marginals():
    n = 4000
    path = B.BrownianPath(-1.0, 3.0, (n,), 4, seed=3, dtype=torch.float64)
    x = path.coefficients(0.1, 0.83).numpy()  # (4, n)
    var = (x**2).mean(axis=1)
    np.testing.assert_array_less(np.abs(var / B.continuous_variances(4, 0.73) - 1), 5 * np.sqrt(2 / n))
    y = path.coefficients(0.83, 2.0).numpy()  # disjoint interval: independent
    corr = _corr(np.concatenate([x, y]).T)
    assert np.max(np.abs(corr - np.eye(8))) < 5 / np.sqrt(n)


def test_brownian_path_given_root():
    rng = np.random.default_rng(12)
    root = B.sample_coefficients(rng, 3, 0.5, (2, 3))
    path = B.BrownianPath(0.0, 0.5, (2, 3), 3, seed=1, dtype=torch.float64, coefficients=torch.as_tensor(root))
    np.testing.assert_allclose(path.coefficients(0.0, 0.5).numpy(), root, atol=1e-14)
    halves = torch.stack([path.coefficients(0.0, 0.17), path.coefficients(0.17, 0.5)])
    np.testing.assert_allclose(B.compose_torch(halves, [0.17, 0.33]).numpy(), root, atol=1e-12)


def test_brownian_path_tolerance_grid():
    # tol_ps = 1 fs on [0, 1.024] ps: a 2**10 grid, frame times on it are exact
    path = B.BrownianPath(0.0, 1.024, (5,), 3, seed=2, dtype=torch.float64, tol_ps=0.001)
    assert path.max_depth == 10
    pieces = torch.stack([path.coefficients(0.001 * j, 0.001 * (j + 10)) for j in range(0, 1020, 10)])
    whole = path.coefficients(0.0, 1.02)
    assert torch.max(torch.abs(B.compose_torch(pieces, [0.01] * 102) - whole)) < 1e-12


def test_brownian_path_query_speed():
    # a batch the size of a training step: 64 replicas x 22 atoms x 3, N = 3
    path = B.BrownianPath(0.0, 10.0, (64, 22, 3), 3, seed=5)
    t0 = time.perf_counter()
    for j in range(20):
        path.coefficients(0.02 * j, 0.02 * (j + 1))
    assert time.perf_counter() - t0 < 5.0
