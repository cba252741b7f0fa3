"""Evaluation metrics on synthetic data with known answers (fixed seeds; tolerances derived inline).

Statistical tolerances are ~4-5 standard errors of the estimator under the synthetic model, so a
correct implementation fails with probability well under 1e-4 per check; the seeds are fixed, so the
outcome is deterministic anyway.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.signal import lfilter

from molflow.evaluation import metrics as M

LN2 = math.log(2.0)
DEG = np.pi / 180.0


# ------------------------------------------------------------------------------------------ helpers
def markov_chain(T, n_frames, n_replicas, seed, start=None):
    """(R, F) int states of a discrete-time Markov chain with transition matrix T."""
    T = np.asarray(T, dtype=float)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(T, axis=1)
    cum[:, -1] = 1.0
    s = np.empty((n_replicas, n_frames), dtype=np.int64)
    if start is None:  # stationary start
        w, v = np.linalg.eig(T.T)
        pi = np.real(v[:, np.argmin(np.abs(w - 1))])
        pi /= pi.sum()
        s[:, 0] = rng.choice(len(T), size=n_replicas, p=pi)
    else:
        s[:, 0] = start
    u = rng.random((n_replicas, n_frames))
    for t in range(1, n_frames):
        s[:, t] = (u[:, t, None] > cum[s[:, t - 1]]).sum(1)
    return s


def ar1(a, n_frames, n_replicas, seed, burn=1000):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((n_replicas, n_frames + burn))
    return lfilter([1.0], [1.0, -a], e, axis=1)[:, burn:]


def bin_centres(n=64):
    edges = np.linspace(-np.pi, np.pi, n + 1)
    return 0.5 * (edges[1:] + edges[:-1])


def rotate_about(p, a, b, angle):
    """Rotate points p (..., 3) about the axis through a, b (..., 3) by angle (...) (Rodrigues)."""
    k = b - a
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = p - a
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
    return a + v * c + np.cross(k, v) * s + k * (k * v).sum(-1, keepdims=True) * (1 - c)


# -------------------------------------------------------------------------------------- histograms
def test_histogram_normalised_and_weighted():
    rng = np.random.default_rng(0)
    phi = rng.uniform(-np.pi, np.pi, (3, 500))
    psi = rng.uniform(-np.pi, np.pi, (3, 500))
    h = M.phi_psi_histogram(phi, psi)
    assert h.shape == (64, 64) and abs(h.sum() - 1) < 1e-12
    # weights: all weight on the first replica = histogram of that replica alone
    w = np.zeros_like(phi)
    w[0] = 2.0
    assert np.allclose(M.phi_psi_histogram(phi, psi, w), M.phi_psi_histogram(phi[0], psi[0]))
    # -pi and +pi are the same angle: both land in the last bin, nothing is lost
    h = M.phi_psi_histogram(np.array([-np.pi, np.pi]), np.array([0.0, 0.0]), bins=4)
    assert h[3].sum() == 1.0
    assert M.phi_psi_histogram(np.array([]), np.array([])).sum() == 0


# --------------------------------------------------------------------------------------------- JS
def test_js_identical_disjoint_and_shifted():
    rng = np.random.default_rng(1)
    phi, psi = rng.uniform(-np.pi, np.pi, (2, 4000))
    assert M.js_phi_psi(phi, psi, phi, psi) == 0.0
    # disjoint supports: phi < 0 vs phi > 0 -> exactly ln 2
    a = rng.uniform(-np.pi, -0.01, 1000)
    b = rng.uniform(0.01, np.pi, 1000)
    assert abs(M.js_phi_psi(a, psi[:1000], b, psi[:1000]) - LN2) < 1e-12
    # uniform on N bins vs uniform on the same N bins shifted by k: the k bins outside the overlap
    # on each side hold 1/N against m = 1/(2N), so JS = 2 * 1/2 * (k/N) ln 2 = (k/N) ln 2.
    c = bin_centres()
    for n, k in [(32, 16), (32, 8), (40, 1)]:
        pa = c[np.arange(n)]
        pb = c[np.arange(n) + k]
        zero = np.zeros(n)
        got = M.js_phi_psi(pa, zero, pb, zero)
        assert abs(got - k / n * LN2) < 1e-12, (n, k, got)
    # directly on histograms, with zeros, unnormalised input, symmetric
    p = np.array([0.5, 0.5, 0.0])
    q = np.array([0.0, 1.0, 1.0])  # normalised to (0, .5, .5)
    assert abs(M.js_divergence(p, q) - 0.5 * LN2) < 1e-12
    assert M.js_divergence(p, q) == M.js_divergence(q, p)
    assert M.js_divergence(p, np.zeros(3)) is None
    assert M.js_phi_psi(np.array([]), np.array([]), phi, psi) is None


def test_js_two_point_analytic():
    # p = (a, 1-a), q = (b, 1-b): JS = H(m) - (H(p) + H(q)) / 2, H the Shannon entropy (nats)
    def H(x):
        x = np.asarray(x)
        x = x[x > 0]
        return -(x * np.log(x)).sum()

    for a, b in [(0.1, 0.7), (0.5, 0.5), (0.0, 0.3)]:
        p, q = np.array([a, 1 - a]), np.array([b, 1 - b])
        expect = H((p + q) / 2) - (H(p) + H(q)) / 2
        assert abs(M.js_divergence(p, q) - expect) < 1e-12


# ------------------------------------------------------------------------------------ free energy
def test_js_block_jackknife_se_against_the_spread_over_independent_runs():
    """i.i.d. (phi, psi) from a fixed 2-D law: the jackknife SE of one pair's JS against the SD of JS
    over 300 independent pairs. Efron-Stein: the jackknife variance is in expectation >= the true
    variance (measured 1.4x the SD here; a block bootstrap gave 2.3x). The SD from 300 pairs has
    relative SE 1/sqrt(2 x 299) = 4%; one jackknife SE from 20 + 20 blocks varies by ~14% (measured
    over 10 pairs): 0.8-2.0 is about 3 of those either side of 1.4."""
    rng = np.random.default_rng(31)

    def draw(n):
        phi = rng.vonmises(-1.3, 2.0, n)
        psi = np.where(rng.random(n) < 0.6, rng.vonmises(2.6, 3.0, n), rng.vonmises(-0.7, 3.0, n))
        return phi, psi

    n = 2000
    js = [M.js_phi_psi(*draw(n), *draw(n)) for _ in range(300)]
    a, b = draw(n), draw(n)
    se = M.js_block_jackknife_se(M.phi_psi_block_histograms(*a), M.phi_psi_block_histograms(*b))
    ratio = se / np.std(js, ddof=1)
    assert 0.8 < ratio < 2.0, (se, np.std(js, ddof=1))
    blocks = M.phi_psi_block_histograms(a[0].reshape(4, -1), a[1].reshape(4, -1))
    assert blocks.shape == (20, 64, 64) and blocks.sum() == n  # 4 replicas x 5 blocks, every angle once
    assert M.js_block_jackknife_se(blocks[:1], blocks) is None


def test_free_energy():
    p = np.array([0.5, 0.25, 0.0, 0.25])
    kT = 2.5
    f = M.free_energy(p, kT)
    assert np.isnan(f[2]) and np.nanmin(f) == 0.0
    assert np.allclose(f[[0, 1, 3]], [0.0, kT * LN2, kT * LN2])
    assert np.all(np.isnan(M.free_energy(np.zeros(3), kT)))


def test_fes_rmse_identical_and_perturbed_potential():
    kT = 2.494  # kJ/mol at 300 K
    x = bin_centres()
    gx, gy = np.meshgrid(x, x, indexing="ij")
    U = 5 * np.cos(gx) + 3 * np.sin(2 * gy)  # kJ/mol
    p = np.exp(-U / kT)
    p /= p.sum()
    assert M.fes_rmse(p, p, kT) == 0.0
    # p' ~ exp(-(U + d)/kT): F' - F = d + const, so RMSE = RMS(d - mean d) exactly
    d = 0.7 * np.sin(gx + gy) + 0.3
    q = np.exp(-(U + d) / kT)
    q /= q.sum()
    expect = np.sqrt(np.mean((d - d.mean()) ** 2))
    assert abs(M.fes_rmse(p, q, kT) - expect) < 1e-10
    assert abs(M.fes_rmse(p * 7.0, q, kT) - expect) < 1e-10  # normalisation does not matter


def test_fes_rmse_bins_only_in_reference():
    kT = 1.0
    p_ref = np.array([0.25, 0.25, 0.25, 0.25, 0.0])
    p = np.array([0.5, 0.25, 0.25, 0.0, 0.5])  # bin 4 is not in the reference: ignored
    p = p / p.sum()
    # with n_samples = 100, the empty bin 3 gets F = -kT ln(1/100)
    f = -kT * np.log(np.array([p[0], p[1], p[2], 1 / 100]))
    d = f - (-kT * np.log(0.25))
    expect = np.sqrt(np.mean((d - d.mean()) ** 2))
    assert abs(M.fes_rmse(p_ref, p, kT, n_samples=100) - expect) < 1e-12
    # without n_samples: half the smallest populated probability
    f = -kT * np.log(np.array([p[0], p[1], p[2], p[1:3].min() / 2]))
    d = f + kT * np.log(0.25)
    expect = np.sqrt(np.mean((d - d.mean()) ** 2))
    assert abs(M.fes_rmse(p_ref, p, kT) - expect) < 1e-12
    assert M.fes_rmse(p_ref, np.zeros(5), kT) is None


def test_fes_rmse_1d_and_2d_samples():
    rng = np.random.default_rng(2)
    a = rng.vonmises(-1.0, 2.0, 5000)
    b = rng.vonmises(-1.0, 2.0, 5000)
    kT = 2.494
    assert M.fes_rmse_1d(a, a, kT) == 0.0
    assert M.fes_rmse_2d(a, b, a, b, kT) == 0.0
    # two independent samples of the same law: small but nonzero; a shifted law: much larger
    same = M.fes_rmse_1d(a, b, kT, bins=32)
    shifted = M.fes_rmse_1d(a, M.wrap_angle(b + 1.0), kT, bins=32)
    assert 0 < same < 0.5 * shifted
    # weights: weight 1 on half, 0 on the other half = the half alone
    w = np.r_[np.ones(2500), np.zeros(2500)]
    assert abs(M.fes_rmse_1d(a, b, kT, weights=w) - M.fes_rmse_1d(a, b[:2500], kT)) < 1e-12


# ----------------------------------------------------------------------------------------- basins
def test_basin_definitions_partition():
    pts = {  # (phi, psi) degrees -> basin
        (-80, 150): "beta", (-150, 160): "beta", (-80, 70): "beta", (-70, -170): "beta",
        (-70, -40): "alpha_R", (-90, 0): "alpha_R", (60, 40): "alpha_L_C7ax",
        (70, -70): "alpha_L_C7ax", (180, 0): "alpha_L_C7ax", (-180, 0): "alpha_L_C7ax",
    }  # -180 deg is +180 deg (angles live in (-180, 180])
    names = list(M.BASINS)
    phi = np.array([k[0] for k in pts]) * DEG
    psi = np.array([k[1] for k in pts]) * DEG
    got = M.basin_assignment(phi, psi)
    assert [names[i] for i in got] == list(pts.values())
    rng = np.random.default_rng(3)
    lab = M.basin_assignment(*rng.uniform(-np.pi, np.pi, (2, 10000)))
    assert np.all(lab >= 0)  # the boxes cover the torus


def test_basin_population_bootstrap_se_matches_binomial():
    # i.i.d. uniform (phi, psi): populations are the box areas; frames independent, so the SE of a
    # pooled population is binomial, sqrt(p (1 - p) / N).
    R, F = 100, 200
    rng = np.random.default_rng(4)
    phi, psi = rng.uniform(-np.pi, np.pi, (2, R, F))
    truth = {"beta": 0.5 * 190 / 360, "alpha_R": 0.5 * 170 / 360, "alpha_L_C7ax": 0.5}
    res = M.basin_populations(phi, psi, n_bootstrap=1000, seed=0)
    json.dumps(res)
    assert "replicas" in res["method"] and res["n_units"] == R and res["reason"] is None
    assert abs(sum(res[b]["population"] for b in M.BASINS) - 1) < 1e-12
    for b, p in truth.items():
        se_binom = math.sqrt(p * (1 - p) / (R * F))
        assert abs(res[b]["population"] - p) < 4.5 * se_binom
        # relative spread of a bootstrap SE over R resampled units ~ 1/sqrt(2) = 0.071,
        # plus 1/sqrt(2 B) = 0.022 from B = 1000 resamples: 0.074; 4 sigma = 0.30.
        assert abs(res[b]["se"] / se_binom - 1) < 0.30, (b, res[b]["se"], se_binom)
    # one replica: 10 contiguous blocks; chi with 9 dof -> relative spread ~0.24, allow 0.45..1.8
    res1 = M.basin_populations(phi.reshape(1, -1), psi.reshape(1, -1), seed=1)
    assert "10 contiguous blocks" in res1["method"]
    for b, p in truth.items():
        ratio = res1[b]["se"] / math.sqrt(p * (1 - p) / (R * F))
        assert 0.45 < ratio < 1.8, (b, ratio)
    # weights: doubling all weights changes nothing; empty -> None with a reason
    res2 = M.basin_populations(phi, psi, weights=2 * np.ones_like(phi), n_bootstrap=1000, seed=0)
    assert res2["beta"] == res["beta"]
    res0 = M.basin_populations(phi, psi, weights=np.zeros_like(phi))
    assert res0["beta"]["population"] is None and res0["reason"]


# ------------------------------------------------------------------------------------ Wasserstein
def test_wasserstein_shift():
    rng = np.random.default_rng(5)
    a = rng.standard_normal(3000)
    assert M.wasserstein_1d(a, a) == 0.0
    assert abs(M.wasserstein_1d(a, a + 0.37) - 0.37) < 1e-12  # W1 of a pure shift = |shift|
    # weights: duplicated samples = weight 2
    b = rng.standard_normal(50)
    assert abs(M.wasserstein_1d(np.r_[b, b], a) - M.wasserstein_1d(b, a, 2 * np.ones(50))) < 1e-12
    assert M.wasserstein_1d(np.array([]), a) is None


def test_bond_and_angle_w1():
    rng = np.random.default_rng(6)
    n = 400
    # three atoms: 0 at the origin, 1 on +x at distance L, 2 in the xy plane at angle theta
    L = 0.15 + 0.01 * rng.standard_normal(n)
    theta = 1.9 + 0.05 * rng.standard_normal(n)
    pos = np.zeros((n, 3, 3))
    pos[:, 1, 0] = L
    pos[:, 2, 0] = 0.1 * np.cos(theta)
    pos[:, 2, 1] = 0.1 * np.sin(theta)
    pos2 = pos.copy()
    pos2[:, 1, 0] += 0.004  # bond 0-1 longer by 0.004 nm, bond 0-2 unchanged; angle unchanged
    bonds = np.array([[0, 1], [0, 2]])
    assert M.bond_length_w1(pos, pos, bonds) == 0.0
    assert abs(M.bond_length_w1(pos, pos2, bonds) - 0.004 / 2) < 1e-12  # mean over 2 bonds
    pos3 = pos.copy()
    pos3[:, 2, 0] = 0.1 * np.cos(theta + 0.2)
    pos3[:, 2, 1] = 0.1 * np.sin(theta + 0.2)
    ang = np.array([[1, 0, 2]])
    assert abs(M.angle_w1(pos, pos3, ang) - 0.2) < 1e-9
    assert M.angle_w1(pos, pos, ang) == 0.0
    # extra leading axes (R, F, A, 3) are frames too
    assert abs(M.bond_length_w1(pos.reshape(4, 100, 3, 3), pos2, bonds) - 0.002) < 1e-12


# --------------------------------------------------------------------------------------- kinetics
def test_core_states_hysteresis():
    phi = np.array([[0.0, -60, -10, 10, 50, 20, -20, 170, -120],
                    [0.0, 0.0, 120, 60, -100, 0, 0, 0, 0]]) * DEG
    s = M.phi_core_states(phi)
    assert s.tolist() == [[-1, 0, 0, 0, 1, 1, 1, 1, 0], [-1, -1, -1, 1, 0, 0, 0, 0, 0]]
    assert M.phi_core_states(phi[0]).shape == (9,)


def test_transition_kinetics_by_hand():
    s = np.array([-1, -1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1])
    r = M.transition_kinetics(s, dt_ps=1.0)
    json.dumps(r)
    assert r["n_transitions_neg_to_pos"] == 2 and r["n_transitions_pos_to_neg"] == 1
    # intervals starting in 0: frames 2, 3, 4, 7, 8, 9, 10 -> 7 ps; in 1: frames 5, 6 -> 2 ps
    assert abs(r["rate_neg_to_pos_per_ns"] - 2 / 7e-3) < 1e-9
    assert abs(r["rate_pos_to_neg_per_ns"] - 1 / 2e-3) < 1e-9
    # complete dwells: state 1 over frames 5-6 (2 ps), state 0 over frames 7-10 (4 ps); the first
    # state-0 dwell (entered from -1, i.e. from outside any core at the start) is excluded
    assert abs(r["mfpt_neg_to_pos_ns"] - 0.004) < 1e-12
    assert abs(r["mfpt_pos_to_neg_ns"] - 0.002) < 1e-12
    assert r["reason"] is None
    r = M.transition_kinetics(np.zeros((2, 100), int), dt_ps=0.1)
    json.dumps(r)
    assert r["n_transitions_neg_to_pos"] == 0 and r["rate_neg_to_pos_per_ns"] == 0.0
    assert r["rate_pos_to_neg_per_ns"] is None and r["mfpt_neg_to_pos_ns"] is None
    assert "never occupied" in r["reason"] and "MFPT" in r["reason"]


def test_transition_kinetics_markov_chain():
    # two-state chain, switch probabilities per frame p01, p10; states drawn as phi inside the cores
    p01, p10, dt = 0.01, 0.03, 0.1
    chain = markov_chain([[1 - p01, p01], [p10, 1 - p10]], 50_000, 4, seed=7)
    rng = np.random.default_rng(8)
    phi = np.where(chain == 0, rng.uniform(-150, -30, chain.shape),
                   rng.uniform(30, 100, chain.shape)) * DEG
    states = M.phi_core_states(phi)
    assert np.array_equal(states, chain)
    r = M.transition_kinetics(states, dt)
    # discrete time: rate estimate -> p / dt (per ps), MFPT -> dt / p (mean geometric dwell)
    for n_key, rate_key, mfpt_key, p in [
            ("n_transitions_neg_to_pos", "rate_neg_to_pos_per_ns", "mfpt_neg_to_pos_ns", p01),
            ("n_transitions_pos_to_neg", "rate_pos_to_neg_per_ns", "mfpt_pos_to_neg_ns", p10)]:
        n = r[n_key]
        assert n > 1000  # ~1500 expected each way
        # Poisson: relative SE of a count-based rate 1/sqrt(n); geometric dwell: sd/mean =
        # sqrt(1-p) < 1, so the mean of n dwells has relative SE < 1/sqrt(n). Allow 4 SE.
        tol = 4 / math.sqrt(n)
        assert abs(r[rate_key] / (p / dt * 1000) - 1) < tol, (rate_key, r[rate_key])
        assert abs(r[mfpt_key] / (dt / p / 1000) - 1) < tol, (mfpt_key, r[mfpt_key])


# -------------------------------------------------------------------------------- autocorrelation
def test_autocorrelation_ar1():
    a, dt = 0.9, 0.05
    R, F = 20, 20_000
    x = ar1(a, F, R, seed=9)
    acf = M.autocorrelation(x, 50, circular=False)
    assert acf.shape == (51,) and acf[0] == 1.0
    # Bartlett: var r_k <= (1 + a^2) / ((1 - a^2) N) = 2.4e-5 -> sd 0.005; tolerance 0.03
    assert np.max(np.abs(acf[:31] - a ** np.arange(31))) < 0.03
    tau = M.integrated_autocorrelation_time(acf, dt)
    expect = dt * (1 + a) / (2 * (1 - a))  # 0.475 ps
    # Sokal: var(tau)/tau^2 ~ 2 (2M + 1) / N with M ~ 5 tau/dt ~ 48, N = 4e5 -> rel sd 0.022;
    # window truncation bias a^(M+1) / (1 - a) / 9.5 < 1%. Tolerance 10%.
    assert abs(tau / expect - 1) < 0.10, tau
    ess = M.effective_sample_size(x, dt, circular=False)
    assert abs(ess / (R * F * (1 - a) / (1 + a)) - 1) < 0.10
    # white noise: tau = dt/2, ESS = N (relative sd ~ 2.5% here); allow 10%
    w = np.random.default_rng(10).standard_normal((1, 20_000))
    assert abs(M.effective_sample_size(w, dt, circular=False) / 20_000 - 1) < 0.10
    # lags beyond the data are NaN; constant signals give NaN (no variance)
    assert np.isnan(M.autocorrelation(x[:, :10], 12)[10:]).all()
    assert np.isnan(M.autocorrelation(np.ones((2, 100)), 5)).all()
    assert M.effective_sample_size(np.ones((2, 100)), dt) is None


def test_autocorrelation_circular_across_the_wrap():
    # an angle fluctuating by ~0.1 rad about pi (so it wraps between +pi and -pi all the time):
    # (cos, sin) about their mean is linear in the fluctuation up to O(0.1^2) -> acf ~ a^k
    a = 0.8
    x = ar1(a, 20_000, 10, seed=11)
    theta = M.wrap_angle(np.pi + 0.1 * x / x.std())
    acf = M.autocorrelation(theta, 20, circular=True)
    # sampling sd ~ sqrt((1+a^2)/((1-a^2) N)) = 0.004, nonlinearity < 0.01: tolerance 0.03
    assert np.max(np.abs(acf - a ** np.arange(21))) < 0.03
    naive = M.autocorrelation(theta, 20, circular=False)
    assert abs(naive[1] - a) > 0.2  # the linear form is fooled by the wrap


# -------------------------------------------------------------------------------------------- MSM
def test_discretise_grid():
    n = 6
    centres = -np.pi + (np.arange(n) + 0.5) * 2 * np.pi / n
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    d = M.discretise(centres[i], centres[j], n)
    assert np.array_equal(d, i * n + j)
    assert M.discretise(np.array([-np.pi]), np.array([np.pi]), n).tolist() == [n * n - 1]


def test_implied_timescales_two_state_chain():
    p01, p10, dt = 0.02, 0.04, 0.1
    R, F = 4, 50_000
    chain = markov_chain([[1 - p01, p01], [p10, 1 - p10]], F, R, seed=12)
    # embed into the 6 x 6 (phi, psi) grid: state 0 -> cell 7, state 1 -> cell 22
    d = np.where(chain == 0, 7, 22)
    lags = [1, 2, 5]
    res = M.implied_timescales(d, lags, dt, n_timescales=3)
    json.dumps(res)
    lam = 1 - p01 - p10
    t_true_ns = -dt / math.log(lam) / 1000  # lag independent for a Markov chain: 1.616 ps
    pi0, pi1 = p10 / (p01 + p10), p01 / (p01 + p10)
    N = R * F
    for lag, ts, n_act in zip(lags, res["timescales_ns"], res["n_active_states"]):
        assert n_act == 2 and ts[1] is None and ts[2] is None
        # delta method: mu = lambda^lag = 1 - P01(lag) - P10(lag), with P01(lag) = pi1 (1 - mu),
        # each estimated from ~ N pi_origin / lag independent pairs (binomial);
        # d t / d mu = lag dt / (mu ln(mu)^2).
        mu = lam ** lag
        P01, P10 = pi1 * (1 - mu), pi0 * (1 - mu)
        var_mu = P01 * (1 - P01) / (N * pi0 / lag) + P10 * (1 - P10) / (N * pi1 / lag)
        sd_t = lag * dt / 1000 / (mu * math.log(mu) ** 2) * math.sqrt(var_mu)
        assert abs(ts[0] - t_true_ns) < 5 * sd_t, (lag, ts[0], t_true_ns, sd_t)
    assert res["lags_ps"] == [0.1, 0.2, 0.5]
    assert "2 active states" in res["reason"]
    bad = M.implied_timescales(d[:, :10], [20], dt)
    assert bad["timescales_ns"] == [[None, None, None]] and bad["reason"]


T3 = np.array([[0.90, 0.10, 0.00],
               [0.10, 0.85, 0.05],
               [0.00, 0.01, 0.99]])


def test_ck_markov_vs_projected_chain():
    lag, dt = 5, 0.1
    chain = markov_chain(T3, 50_000, 8, seed=13)
    markov = M.ck_test(chain, lag, dt)
    json.dumps(markov)
    assert markov["states"] == [0, 1, 2] and markov["reason"] is None
    # observed through {0} | {1, 2}: the lumped 2-state signal has memory. Exact CK error of the
    # lumped chain (from T3, its stationary law pi = (1, 1, 5)/7): |P_AA - E_AA| = 0.0720 at lag 5.
    lumped = M.ck_test((chain > 0).astype(int), lag, dt)
    pi = np.array([1, 1, 5]) / 7
    G = [[0], [1, 2]]

    def lump(T):
        return np.array([[sum(pi[i] * T[i, j] for i in a for j in b) / pi[a].sum() for b in G]
                         for a in G])

    t1, t2 = lump(np.linalg.matrix_power(T3, lag)), lump(np.linalg.matrix_power(T3, 2 * lag))
    exact = np.abs(np.diag(t1 @ t1) - np.diag(t2)).max()
    assert abs(exact - 0.0720) < 1e-3
    # statistical error of a diagonal element of T(2 lag): sqrt(T(1-T) / n_i) with n_i >= N/7 /
    # (2 lag) independent pairs (N = 4e5): <= sqrt(0.25 / 5700) = 0.0066. Markov chain: its CK error
    # is pure noise -> < 0.02 (3 sd); lumped chain: exact 0.072 +- 0.02.
    assert markov["max_abs_error"] < 0.02, markov["max_abs_error"]
    assert abs(lumped["max_abs_error"] - exact) < 0.02, lumped["max_abs_error"]
    assert lumped["max_abs_error"] > 3 * markov["max_abs_error"]
    short = M.ck_test(chain[:, :8], lag, dt)
    assert short["max_abs_error"] is None and short["reason"]


# A 4-state reversible chain (symmetric rates between neighbours, two metastable pairs): a 6x6
# grid cell stands for each state.
T4 = np.array([[0.90, 0.09, 0.01, 0.00],
               [0.10, 0.85, 0.04, 0.01],
               [0.01, 0.04, 0.85, 0.10],
               [0.00, 0.01, 0.09, 0.90]])


def test_implied_timescales_and_ck_agree_with_deeptime():
    """Our implied timescales and CK test equal deeptime's own tools on the same MSMs (float rounding).

    deeptime.util.validation.implied_timescales (timescales in frames) and
    deeptime.util.validation.ck_test with a membership observable of one set per active state
    (so its predictions are the rows of T(lag)^2 and its estimates those of T(2 lag), started from
    each state): the diagonals and the largest matrix error must be ours.
    """
    from deeptime.markov import TransitionCountEstimator
    from deeptime.markov._observables import MembershipsObservable
    from deeptime.markov.msm import MaximumLikelihoodMSM
    from deeptime.util.validation import ck_test, implied_timescales

    dt, lags = 0.1, [1, 3, 6]
    chain = markov_chain(T4, 20_000, 4, seed=21)
    d = np.array([7, 14, 21, 28])[chain]
    ours = M.implied_timescales(d, lags, dt, n_timescales=3)
    dl = [np.ascontiguousarray(r, dtype=np.int32) for r in d]

    def msm(lag, states=None):
        cm = TransitionCountEstimator(lag, "sliding", n_states=36).fit(dl).fetch_model()
        cm = cm.submodel_largest() if states is None else cm.submodel(states)
        return MaximumLikelihoodMSM(reversible=True).fit(cm).fetch_model()

    its = implied_timescales([msm(lag) for lag in lags])
    for i in range(3):
        theirs = its.timescales_for_process(i) * dt / 1000.0  # deeptime: in frames; ours: ns
        np.testing.assert_allclose([ts[i] for ts in ours["timescales_ns"]], theirs, rtol=1e-9)
    assert ours["n_active_states"] == [4, 4, 4] and ours["reason"] is None

    lag = 3
    ck = M.ck_test(d, lag, dt)
    states = np.array(ck["states"])
    assert states.tolist() == [7, 14, 21, 28]
    m1, m2 = msm(lag, states), msm(2 * lag, states)
    obs = MembershipsObservable(m1, np.eye(len(states)), initial_distribution=m1.stationary_distribution)
    dt_ck = ck_test([m1, m2], obs, test_model=m1, include_lag0=False)
    pred, est = dt_ck.predictions[1], dt_ck.estimates[1]  # T(lag)^2 and T(2 lag), row i: from state i
    np.testing.assert_allclose(ck["predicted_diagonal"], np.diag(pred), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ck["estimated_diagonal"], np.diag(est), rtol=0, atol=1e-12)
    assert ck["max_abs_error_matrix"] == pytest.approx(np.abs(pred - est).max(), abs=1e-12)
    assert ck["max_abs_error"] == pytest.approx(np.abs(np.diag(pred) - np.diag(est)).max(), abs=1e-12)


def test_dihedrals_equal_mdtraj_on_a_trajectory(tmp_path):
    """molflow's phi/psi (and every backbone dihedral) equal mdtraj.compute_dihedrals on a real run.

    mdtraj computes in float32: the angles agree to float32 rounding of nm coordinates, 1e-5 rad.
    """
    import mdtraj

    import molflow
    from molflow.evaluation import dihedral_angles, phi_psi

    run = molflow.simulate("alanine_dipeptide", tmp_path / "r.h5", replicas=1, time_ps=2.0, frame_fs=100.0,
                           equilibrate_ps=0.5, seed=4, progress=False)
    sys_ = molflow.load_system("alanine_dipeptide")
    traj = run.to_mdtraj(0)
    x = np.asarray(run.positions[0], dtype=np.float64)
    run.close()
    assert traj.n_frames == 21
    _, phi_md = mdtraj.compute_phi(traj)
    _, psi_md = mdtraj.compute_psi(traj)
    phi, psi = phi_psi(x, sys_)
    assert np.abs(M.wrap_angle(phi - phi_md[:, 0])).max() < 1e-5
    assert np.abs(M.wrap_angle(psi - psi_md[:, 0])).max() < 1e-5
    quads = np.vstack([sys_.central_dihedrals()[0], sys_.central_dihedrals()[1], [[0, 1, 4, 6], [1, 4, 6, 8]]])
    ours = dihedral_angles(x, quads)
    theirs = mdtraj.compute_dihedrals(traj, quads)
    assert np.abs(M.wrap_angle(ours - theirs)).max() < 1e-5
    assert np.ptp(phi) > 0.05  # (the frames differ: a real trajectory, not one structure)


# ----------------------------------------------------------------------------------- strong error
def test_strong_error():
    rng = np.random.default_rng(14)
    R, K, A = 5, 3, 6
    ref = rng.standard_normal((R, K, A, 3)) * 0.2
    heavy = np.arange(4)
    phi_q, psi_q = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4])
    # rigid translation by a vector of length 0.3 nm: raw RMSD 0.3, aligned 0, angles unchanged
    shift = np.array([0.1, 0.2, 0.2])
    res = M.strong_error(ref + shift, ref, heavy, phi_q, psi_q)
    json.dumps(res)
    assert np.allclose(res["heavy_rmsd_raw_nm"], 0.3) and np.allclose(res["heavy_rmsd_aligned_nm"], 0)
    assert np.allclose(res["dphi_deg"], 0, atol=1e-9) and np.allclose(res["dpsi_deg"], 0, atol=1e-9)
    assert res["jump_index"] == [0, 1, 2] and res["n_replicas"] == R
    # rotate atom 4 about the 2-3 bond by delta: psi changes by delta, phi and heavy atoms do not
    delta = np.deg2rad(rng.uniform(-40, 40, (R, K)))
    pred = ref.copy()
    pred[:, :, 4] = rotate_about(ref[:, :, 4], ref[:, :, 2], ref[:, :, 3], delta)
    res = M.strong_error(pred, ref, heavy, phi_q, psi_q)
    expect = np.sqrt((np.rad2deg(delta) ** 2).mean(0))
    assert np.allclose(res["dpsi_deg"], expect, rtol=1e-9)
    assert np.allclose(res["dphi_deg"], 0, atol=1e-9) and np.allclose(res["heavy_rmsd_raw_nm"], 0)
    assert all(se is not None and se >= 0 for se in res["dpsi_deg_se"])
