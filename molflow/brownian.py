"""Brownian path algebra: Legendre path coefficients, composition, splitting.

Pure mathematics (numpy, float64) with a small torch layer (:class:`BrownianPath`,
:func:`compose_torch`).  See DESIGN.md section 2.

Conventions
-----------
Units: time in ps, Brownian values and path coefficients in sqrt(ps).

On an interval [s, t] with h = t - s let P_n be the shifted Legendre polynomials on [0, 1]
(P_0 = 1, P_1 = 2u - 1, P_2 = 6u^2 - 6u + 1, ...).  The path coefficients are

    L^(n) = ∫_s^t P_n((u - s)/h) dW_u ,   n = 0 .. N-1,

so L^(0) = W_t - W_s.  Under the Brownian law they are independent, L^(n) ~ N(0, h/(2n+1)).
Every array of coefficients carries the coefficient index on its *leading* axis,
``(N, *batch)``; any trailing axes (replicas, atoms, xyz, ...) are carried along.  Collections of
consecutive pieces are ``(P, N, *batch)`` (or a list of ``(N, *batch)`` arrays).

Discrete paths: an integrator with step dt and per-step standard Gaussians xi_k uses
ΔW_k = sqrt(dt) xi_k and the piecewise-linear path between steps; its coefficients over K steps are
L^(n) = Σ_k w[n, k] xi_k with w = :func:`legendre_step_weights` and have the exact law
N(0, w wᵀ) (:func:`discrete_covariance`).  Composition (:func:`compose`) is exact for any path,
continuous or discrete, because it is linear in dW restricted to the pieces.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np

__all__ = [
    "shifted_legendre",
    "legendre_step_weights",
    "coefficients_from_noise",
    "discrete_covariance",
    "continuous_variances",
    "composition_matrices",
    "compose",
    "split",
    "split_discrete",
    "split_matrices",
    "sample_coefficients",
    "polynomial_path",
    "polynomial_path_l2_error",
    "conditional_noise",
    "compose_torch",
    "BrownianPath",
]

_RANK_RTOL = 1e-12


# ----------------------------------------------------------------------------------------------
# Legendre helpers
# ----------------------------------------------------------------------------------------------
def shifted_legendre(n_max: int, x: np.ndarray | float) -> np.ndarray:
    """Shifted Legendre polynomials P_0..P_{n_max} on [0, 1] evaluated at ``x`` (dimensionless).

    Uses Bonnet's three-term recurrence in y = 2x - 1 (stable on [0, 1]).
    Returns an array of shape ``(n_max + 1, *x.shape)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if n_max < 0:
        return np.zeros((0,) + x.shape)
    y = 2.0 * x - 1.0
    out = np.empty((n_max + 1,) + x.shape)
    out[0] = 1.0
    if n_max >= 1:
        out[1] = y
    for n in range(1, n_max):
        out[n + 1] = ((2 * n + 1) * y * out[n] - n * out[n - 1]) / (n + 1)
    return out


def _check_n(n_coefficients: int, minimum: int = 0) -> int:
    n = int(n_coefficients)
    if n != n_coefficients or n < minimum:
        raise ValueError(f"n_coefficients must be an integer >= {minimum}, got {n_coefficients!r}")
    return n


def _gauss01(n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on [0, 1] (weights sum to 1)."""
    y, w = np.polynomial.legendre.leggauss(n_points)
    return (y + 1.0) / 2.0, w / 2.0


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# ----------------------------------------------------------------------------------------------
# Discrete (per-step) weights and laws
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _unit_step_means(n_coefficients: int, n_steps: int) -> np.ndarray:
    """Mean of P_n over each of K equal steps of [0, 1]; (N, K), read-only.

    Computed by Gauss–Legendre quadrature on each step with enough nodes to be exact for degree
    N-1 (no antiderivative differences, hence no cancellation: relative error ~ 1e-16 at any K).
    """
    n_points = max(1, (n_coefficients + 2) // 2)  # exact for degree <= 2*n_points - 1 >= N - 1
    nodes, weights = _gauss01(n_points)
    k = np.arange(n_steps, dtype=np.float64)
    pts = (k[:, None] + nodes[None, :]) / n_steps  # (K, m) in [0, 1]
    p = shifted_legendre(n_coefficients - 1, pts)  # (N, K, m)
    out = p @ weights
    out.setflags(write=False)
    return out


def legendre_step_weights(n_coefficients: int, n_steps: int, dt_ps: float) -> np.ndarray:
    """Per-step weights of the coefficients of a discrete piecewise-linear path.

    For an interval of ``n_steps`` = K steps of ``dt_ps`` (h = K·dt) with per-step standard
    Gaussians xi_k (ΔW_k = sqrt(dt) xi_k), ``L^(n) = Σ_k w[n, k] xi_k`` with

        w[n, k] = sqrt(dt) · (1/dt) ∫_{step k} P_n((u - s)/h) du    [sqrt(ps)].

    The step integrals are exact (Gauss–Legendre of sufficient degree on each step; stable for
    any K).  Returns a float64 array of shape (N, K) in sqrt(ps).
    """
    n = _check_n(n_coefficients)
    k = int(n_steps)
    if k != n_steps or k < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if not dt_ps > 0:
        raise ValueError(f"dt_ps must be positive, got {dt_ps!r}")
    if n == 0:
        return np.zeros((0, k))
    return np.sqrt(float(dt_ps)) * _unit_step_means(n, k)


def coefficients_from_noise(xi: np.ndarray, n_coefficients: int, dt_ps: float) -> np.ndarray:
    """Coefficients ``(N, *batch)`` [sqrt(ps)] of a discrete path from per-step Gaussians.

    ``xi`` has shape ``(K, *batch)`` (dimensionless standard normals, one per step of ``dt_ps``).
    """
    xi = np.asarray(xi, dtype=np.float64)
    w = legendre_step_weights(n_coefficients, xi.shape[0], dt_ps)
    return np.tensordot(w, xi, axes=([1], [0]))


def discrete_covariance(n_coefficients: int, n_steps: int, dt_ps: float) -> np.ndarray:
    """Exact covariance (N, N) [ps] of the coefficients of a K-step discrete path: ``w wᵀ``.

    Tends to diag(h/(2n+1)) (h = K·dt) as K grows.
    """
    w = legendre_step_weights(n_coefficients, n_steps, dt_ps)
    return w @ w.T


def continuous_variances(n_coefficients: int, h_ps: float) -> np.ndarray:
    """Variances h/(2n+1) [ps] of the coefficients of Brownian motion on an interval of h ps."""
    n = _check_n(n_coefficients)
    return float(h_ps) / (2.0 * np.arange(n) + 1.0)


def _discrete_factor(n_coefficients: int, n_steps: int, dt_ps: float) -> np.ndarray:
    """F (N, r) with F Fᵀ = discrete covariance, r = min(N, K) (from QR of wᵀ)."""
    w = legendre_step_weights(n_coefficients, n_steps, dt_ps)
    _, r = np.linalg.qr(w.T, mode="reduced")  # wᵀ = Q R  ->  w wᵀ = Rᵀ R
    return r.T


# ----------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------
def _durations(durations_ps: Sequence[float] | np.ndarray) -> np.ndarray:
    d = np.asarray(durations_ps, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("need at least one piece")
    if not np.all(d > 0) or not np.all(np.isfinite(d)):
        raise ValueError(f"durations must be positive and finite, got {d}")
    return d


def _composition_stack(durations_ps: Sequence[float] | np.ndarray, n_coefficients: int) -> np.ndarray:
    d = _durations(durations_ps)
    n = _check_n(n_coefficients)
    h = d.sum()
    starts = np.concatenate([[0.0], np.cumsum(d)[:-1]]) / h
    fracs = d / h
    nodes, weights = _gauss01(max(1, n))  # integrand degree <= 2N - 2: exact with N nodes
    pm = shifted_legendre(n - 1, nodes)  # (N, q) local basis P_m(v)
    u = starts[:, None] + fracs[:, None] * nodes[None, :]  # (P, q) union variable
    pn = shifted_legendre(n - 1, np.clip(u, 0.0, 1.0))  # (N, P, q)
    # A[p, n, m] = (2m + 1) ∫_0^1 P_n(u_p(v)) P_m(v) dv
    a = np.einsum("npq,mq,q->pnm", pn, pm, weights) * (2.0 * np.arange(n) + 1.0)[None, None, :]
    return np.tril(a)  # exact zeros above the diagonal (P_n restricted has degree n)


def composition_matrices(durations_ps: Sequence[float] | np.ndarray, n_coefficients: int) -> list[np.ndarray]:
    """Matrices A_p (N, N), one per consecutive piece, with L_union = Σ_p A_p L_p.

    Derivation: on piece p (start o_p, length d_p inside the union of length h, local variable
    v ∈ [0, 1]) P_n((o_p + v d_p)/h) is a polynomial of degree n in v, hence exactly
    Σ_{m≤n} A_p[n, m] P_m(v) with A_p[n, m] = (2m+1) ∫_0^1 P_n((o_p + v d_p)/h) P_m(v) dv.
    Integrating against dW on the piece gives L_union^(n) = Σ_p Σ_m A_p[n, m] L_p^(m), for any
    path (continuous or discrete).  Dimensionless; lower triangular.  For equal halves this is
    DESIGN's C (left) and C∘S (right), S_nm = (-1)^(n+m).
    """
    return list(_composition_stack(durations_ps, n_coefficients))


def _stack_pieces(coeffs) -> np.ndarray:
    if isinstance(coeffs, np.ndarray):
        arr = coeffs.astype(np.float64, copy=False)
    else:
        arr = np.stack([np.asarray(c, dtype=np.float64) for c in coeffs])
    if arr.ndim < 2:
        raise ValueError("pieces must have shape (P, N, *batch)")
    return arr


def compose(coeffs_list_or_array, durations_ps: Sequence[float] | np.ndarray) -> np.ndarray:
    """Exact coefficients (N, *batch) [sqrt(ps)] of the union of consecutive intervals.

    ``coeffs_list_or_array``: array (P, N, *batch) or a list of P arrays (N, *batch), the
    coefficients of consecutive pieces of lengths ``durations_ps`` (P values, ps, any lengths).
    """
    arr = _stack_pieces(coeffs_list_or_array)
    d = _durations(durations_ps)
    if arr.shape[0] != d.size:
        raise ValueError(f"{arr.shape[0]} pieces but {d.size} durations")
    p, n = arr.shape[:2]
    a = _composition_stack(d, n)  # (P, N, N)
    m = a.transpose(1, 0, 2).reshape(n, p * n)  # (N, P*N)
    out = m @ arr.reshape(p * n, -1)
    return out.reshape((n,) + arr.shape[2:])


# ----------------------------------------------------------------------------------------------
# Splitting (exact Gaussian conditioning)
# ----------------------------------------------------------------------------------------------
def _conditional_children(parent: np.ndarray, m: np.ndarray, f: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw children c = F z (z ~ N(0, I)) conditioned on M c = parent.

    With B = M F, z | (B z = L) = B⁺ L + (I - B⁺B) η, computed from an SVD of B (stable, works
    for rank-deficient B).  ``parent``: (N, batch) ; returns (rows of F, batch).
    """
    b = m @ f
    u, s, vt = np.linalg.svd(b, full_matrices=True)
    r = int(np.sum(s > _RANK_RTOL * max(b.shape) * (s[0] if s.size else 0.0)))
    mean_z = vt[:r].T @ ((u[:, :r].T @ parent) / s[:r, None])
    null = vt[r:].T  # (dim z, dim z - r)
    z = mean_z + null @ rng.standard_normal((null.shape[1], parent.shape[1]))
    return f @ z


def _pieces_from(duration_ps: float, pieces, as_fractions: bool | None) -> np.ndarray:
    if np.ndim(pieces) == 0:
        k = int(pieces)
        if k != pieces or k < 1:
            raise ValueError("an integer number of pieces must be >= 1")
        return np.full(k, float(duration_ps) / k)
    p = _durations(pieces)
    total = p.sum()
    if as_fractions is None:
        if np.isclose(total, duration_ps, rtol=1e-9, atol=0):
            as_fractions = False
        elif np.isclose(total, 1.0, rtol=1e-9, atol=0):
            as_fractions = True
        else:
            raise ValueError(
                f"pieces sum to {total}, neither the duration {duration_ps} ps nor 1 (fractions)"
            )
    if as_fractions:
        return p / total * float(duration_ps)
    if not np.isclose(total, duration_ps, rtol=1e-9, atol=0):
        raise ValueError(f"durations sum to {total} ps, not {duration_ps} ps")
    return p * (float(duration_ps) / total)


def split(
    coeffs: np.ndarray,
    duration_ps: float,
    fractions_or_durations,
    rng: np.random.Generator | int | None = None,
    *,
    as_fractions: bool | None = None,
) -> np.ndarray:
    """Draw coefficients of consecutive sub-intervals given those of the parent (continuous law).

    ``coeffs`` (N, *batch) [sqrt(ps)] describe [s, t] of ``duration_ps``.
    ``fractions_or_durations``: an int (that many equal pieces), or piece lengths in ps (summing
    to ``duration_ps``) or fractions (summing to 1); ``as_fractions`` forces the reading.
    Children are drawn from their exact Gaussian conditional (children a priori independent with
    variances d_p/(2m+1); parent = Σ_p A_p child_p), so ``compose(split(L), d) == L`` to rounding.
    Returns (P, N, *batch).
    """
    rng = _as_rng(rng)
    coeffs = np.asarray(coeffs, dtype=np.float64)
    n = coeffs.shape[0]
    d = _pieces_from(duration_ps, fractions_or_durations, as_fractions)
    p = d.size
    a = _composition_stack(d, n)
    m = a.transpose(1, 0, 2).reshape(n, p * n)
    f = np.diag(np.sqrt((d[:, None] / (2.0 * np.arange(n) + 1.0)[None, :]).reshape(-1)))
    flat = coeffs.reshape(n, -1)
    children = _conditional_children(flat, m, f, rng)
    return children.reshape((p, n) + coeffs.shape[1:])


def split_discrete(
    coeffs: np.ndarray,
    n_steps_list: Sequence[int],
    dt_ps: float,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Like :func:`split` for the discrete law of an engine path.

    The parent is a block of Σ K_p steps of ``dt_ps``; child p is its block of K_p steps, a priori
    independent with the exact discrete covariance ``discrete_covariance(N, K_p, dt)``.  Children
    are drawn from the exact conditional given the parent; composing them returns ``coeffs``
    (which must be a realisable discrete-law value, e.g. any value when Σ K_p >= N).
    Returns (P, N, *batch) [sqrt(ps)].
    """
    rng = _as_rng(rng)
    coeffs = np.asarray(coeffs, dtype=np.float64)
    n = coeffs.shape[0]
    m, f, p = _split_system(None, n, n_steps_list, dt_ps)
    children = _conditional_children(coeffs.reshape(n, -1), m, f, rng)
    return children.reshape((p, n) + coeffs.shape[1:])


def _split_system(
    durations_ps, n_coefficients: int, n_steps_list, dt_ps
) -> tuple[np.ndarray, np.ndarray, int]:
    """(M, F, P) of a split: children c = F z (z ~ N(0, I) a priori), parent = M c."""
    n = _check_n(n_coefficients, minimum=1)
    if n_steps_list is None:
        d = _durations(durations_ps)
        p = d.size
        a = _composition_stack(d, n)
        f = np.diag(np.sqrt((d[:, None] / (2.0 * np.arange(n) + 1.0)[None, :]).reshape(-1)))
    else:
        if dt_ps is None or not dt_ps > 0:
            raise ValueError("the discrete law needs a positive dt_ps")
        ks = [int(k) for k in n_steps_list]
        if not ks or any(k < 1 or k != kk for k, kk in zip(ks, n_steps_list)):
            raise ValueError("n_steps_list must hold positive integers")
        if durations_ps is not None and not np.allclose(_durations(durations_ps), np.asarray(ks) * dt_ps, rtol=1e-9):
            raise ValueError("durations_ps disagree with n_steps_list * dt_ps")
        p = len(ks)
        a = _composition_stack(np.asarray(ks, dtype=np.float64) * dt_ps, n)
        factors = [_discrete_factor(n, k, dt_ps) for k in ks]
        f = np.zeros((p * n, sum(fi.shape[1] for fi in factors)))
        col = 0
        for i, fi in enumerate(factors):
            f[i * n:(i + 1) * n, col:col + fi.shape[1]] = fi
            col += fi.shape[1]
    m = a.transpose(1, 0, 2).reshape(n, p * n)
    return m, f, p


def split_matrices(
    durations_ps: Sequence[float] | np.ndarray | None,
    n_coefficients: int,
    *,
    n_steps_list: Sequence[int] | None = None,
    dt_ps: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed linear maps of the exact conditional split (for batched splitting, e.g. on torch).

    Returns ``(mean_map, noise_factor)`` of shapes (P, N, N) and (P, N, r): for a parent ``L``
    (N, *batch) and a fresh standard normal ``eta`` (r, *batch), the children

        child_p = mean_map[p] @ L + noise_factor[p] @ eta

    are an exact draw from the conditional law of the P pieces given the parent (they compose back
    to ``L`` exactly).  This is the same construction as :func:`split` / :func:`split_discrete`
    (z | B z = L = B⁺L + null(B) η), which draw ``eta`` as ``rng.standard_normal((r, batch))``:
    fed the same ``eta`` they agree to rounding.

    Continuous law: ``durations_ps`` (P piece lengths, ps).  ``mean_map`` is dimensionless and
    depends only on the fractions; ``noise_factor`` is in sqrt(ps) and scales as sqrt(total
    duration) — so a batch of intervals of different lengths split at the same fractions can use
    one pair computed for a total of 1 ps, with ``noise_factor`` multiplied by sqrt(h / 1 ps).
    Discrete law (engine paths): pass ``durations_ps=None`` (or the matching lengths),
    ``n_steps_list`` (K_p steps per piece) and ``dt_ps``; r = Σ_p min(N, K_p) - rank.
    """
    m, f, p = _split_system(durations_ps, n_coefficients, n_steps_list, dt_ps)
    n = m.shape[0]
    b = m @ f
    u, s, vt = np.linalg.svd(b, full_matrices=True)
    r = int(np.sum(s > _RANK_RTOL * max(b.shape) * (s[0] if s.size else 0.0)))
    mean_map = f @ (vt[:r].T @ (u[:, :r].T / s[:r, None]))  # (P*N, N)
    noise = f @ vt[r:].T  # (P*N, dim z - r)
    return mean_map.reshape(p, n, n), noise.reshape(p, n, -1)


def sample_coefficients(
    rng: np.random.Generator | int | None,
    n_coefficients: int,
    duration_ps: float,
    shape: Sequence[int] | int = (),
    n_steps: int | None = None,
    dt_ps: float | None = None,
) -> np.ndarray:
    """Fresh coefficients (N, *shape) [sqrt(ps)] of an interval of ``duration_ps``.

    Continuous law (independent, variances h/(2n+1)) by default; the exact discrete law of a
    piecewise-linear engine path when ``n_steps`` and/or ``dt_ps`` is given (the other is derived
    from ``duration_ps``; both given must agree).
    """
    rng = _as_rng(rng)
    n = _check_n(n_coefficients)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    if n_steps is None and dt_ps is None:
        std = np.sqrt(continuous_variances(n, duration_ps))
        return std.reshape((n,) + (1,) * len(shape)) * rng.standard_normal((n,) + shape)
    if n_steps is None:
        k = duration_ps / dt_ps
        n_steps = int(round(k))
        if n_steps < 1 or abs(k - n_steps) > 1e-6 * max(1.0, k):
            raise ValueError(f"duration {duration_ps} ps is not a whole number of {dt_ps} ps steps")
    elif dt_ps is None:
        dt_ps = duration_ps / n_steps
    elif not np.isclose(n_steps * dt_ps, duration_ps, rtol=1e-6):
        raise ValueError(f"{n_steps} steps of {dt_ps} ps do not make {duration_ps} ps")
    f = _discrete_factor(n, n_steps, dt_ps)  # (N, r)
    z = rng.standard_normal((f.shape[1], int(np.prod(shape, dtype=np.int64))))
    return (f @ z).reshape((n,) + shape)


# ----------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------
def polynomial_path(
    coeffs: np.ndarray,
    duration_ps: float,
    u: np.ndarray | float,
    *,
    derivative: bool = False,
) -> np.ndarray:
    """Degree-N polynomial path W^(N)(s + u h) - W_s [sqrt(ps)] at fractions ``u`` ∈ [0, 1].

    Projecting dW/dt on [s, s+h] onto P_n((t-s)/h) (∫ P_n² dt = h/(2n+1)) gives the coefficient
    (2n+1) L^(n)/h; integrating from s to s + u h:

        W^(N)(s + u h) - W_s = Σ_n (2n+1) L^(n) ∫_0^u P_n(x) dx,

    with (2n+1)∫_0^u P_n = (P_{n+1}(u) - P_{n-1}(u))/2 (n ≥ 1) and u for n = 0.  At u = 1 it is
    L^(0); it is E[W(s+uh) - W_s | L^(0..N-1)] under the Brownian law.  ``duration_ps`` (h) only
    enters the time derivative: ``derivative=True`` returns dW^(N)/dt =
    Σ_n (2n+1) L^(n) P_n(u) / h in sqrt(ps)/ps.
    Output shape: ``u.shape + coeffs.shape[1:]``.
    """
    coeffs = np.asarray(coeffs, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    if np.any(u < -1e-12) or np.any(u > 1 + 1e-12):
        raise ValueError("u must be fractions of the interval in [0, 1]")
    n = coeffs.shape[0]
    p = shifted_legendre(n, u)  # (N+1, *u.shape)
    if derivative:
        g = p[:n] * (2.0 * np.arange(n) + 1.0).reshape((n,) + (1,) * u.ndim) / float(duration_ps)
    else:
        g = np.empty((n,) + u.shape)
        if n:
            g[0] = u
        if n > 1:
            g[1:] = (p[2:n + 1] - p[0:n - 1]) / 2.0
    return np.tensordot(g, coeffs, axes=([0], [0]))


def polynomial_path_l2_error(n_coefficients: int, h_ps: float) -> float:
    """E ∫_0^1 (W(s+uh) - W_s - W^(N)(s+uh))² du = h N / (2 (4N² - 1))  [ps], N ≥ 1.

    From W - W^(N) = Σ_{n≥N} (2n+1) L^(n) ∫_0^u P_n with independent L^(n) and
    ∫_0^1 (∫_0^u P_n)² du = (1/(2n+3) + 1/(2n-1)) / (4 (2n+1)²): each term contributes
    h / (2 (2n-1)(2n+3)), which telescopes.  (N = 1 gives h/6, the Brownian bridge.)
    """
    n = _check_n(n_coefficients, minimum=1)
    return float(h_ps) * n / (2.0 * (4.0 * n * n - 1.0))


# ----------------------------------------------------------------------------------------------
# Conditional per-step noise
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _row_space_basis(n_coefficients: int, n_steps: int) -> np.ndarray:
    """Orthonormal basis (K, r) of the row space of the step weights (independent of dt)."""
    w = _unit_step_means(n_coefficients, n_steps)
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    r = int(np.sum(s > _RANK_RTOL * max(w.shape) * s[0]))
    q = np.ascontiguousarray(vt[:r].T)
    q.setflags(write=False)
    return q


def conditional_noise(
    xi: np.ndarray,
    n_coefficients: int,
    dt_ps: float,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Per-step noise that shares the N coefficients of ``xi`` and is otherwise independent.

    ``xi`` (K, *batch): standard Gaussians of K steps of ``dt_ps``.  Returns
    ξ' = ξ - P(ξ - η), η fresh N(0, I), P the orthogonal projector onto the row space of the step
    weights: exact Gaussian conditioning of iid N(0, 1) steps on Σ_k w[n, k] ξ_k (preserved to
    rounding).  ``n_coefficients = 0`` returns fresh noise.  Dimensionless.
    """
    rng = _as_rng(rng)
    xi = np.asarray(xi, dtype=np.float64)
    n = _check_n(n_coefficients)
    k = xi.shape[0]
    legendre_step_weights(max(n, 1), k, dt_ps)  # validates K and dt
    eta = rng.standard_normal(xi.shape)
    if n == 0:
        return eta
    q = _row_space_basis(n, k)
    diff = (xi - eta).reshape(k, -1)
    return (eta.reshape(k, -1) + q @ (q.T @ diff)).reshape(xi.shape)


# ----------------------------------------------------------------------------------------------
# torch layer
# ----------------------------------------------------------------------------------------------
def compose_torch(coeffs, durations_ps: Sequence[float] | np.ndarray):
    """torch version of :func:`compose`: (P, N, *batch) tensor or list of (N, *batch) tensors.

    The matrices are computed in float64 numpy and applied in the tensors' dtype and device.
    """
    import torch

    arr = torch.stack(list(coeffs)) if not isinstance(coeffs, torch.Tensor) else coeffs
    d = _durations(durations_ps)
    p, n = arr.shape[:2]
    if p != d.size:
        raise ValueError(f"{p} pieces but {d.size} durations")
    a = _composition_stack(d, n)
    m = torch.as_tensor(a.transpose(1, 0, 2).reshape(n, p * n), dtype=arr.dtype, device=arr.device)
    out = m @ arr.reshape(p * n, -1)
    return out.reshape((n,) + tuple(arr.shape[2:]))


class BrownianPath:
    """A Brownian path on [t0, t1] queried by its Legendre coefficients on any [s, t] (torch).

    Like torchsde's ``BrownianInterval`` / diffrax's ``VirtualBrownianTree``: the path is a
    deterministic binary (dyadic) tree of exact Brownian splits.  The root [t0, t1] gets
    coefficients from the continuous law (or the given ``coefficients``); every node's halves are
    drawn from their exact conditional law given the node, with a generator seeded from
    (seed, depth, index).  A query time is placed on the dyadic grid of resolution
    (t1 - t0)/2**max_depth (default 2**-60 of the span, below float64 time resolution), and
    [s, t] is the exact composition of the maximal dyadic nodes covering it.  Hence:

    * consistency: coefficients of [s, u] and [u, t] compose exactly (to rounding) into [s, t];
    * values depend only on (seed, t0, t1, N, shape, max_depth) -- not on query order or on
      caching; the same seed gives the same path on every device;
    * marginals: coefficients of any [s, t] are N(0, (t-s)/(2n+1)), independent over disjoint
      intervals.

    The tree is computed in float64 numpy on the CPU (tiny matrix products, which torch would
    hand to its thread pool; an LRU cache of ``cache_size`` nodes, each (N, *shape) float64,
    bounds memory) and each result is returned as a tensor of ``dtype`` on ``device``.
    A query costs O(N² · prod(shape) · max_depth) for uncached nodes; ``tol_ps`` sets a coarser
    grid (max_depth = ceil(log2((t1 - t0)/tol_ps))): query times are then snapped to it (by at
    most tol_ps/2; exactly representable when they lie on it, e.g. multiples of a dyadic step).

    Units: times in ps, coefficients in sqrt(ps).
    """

    def __init__(
        self,
        t0: float,
        t1: float,
        shape: Sequence[int] | int,
        n_coefficients: int,
        seed: int,
        dtype=None,
        device=None,
        *,
        coefficients=None,
        max_depth: int = 60,
        tol_ps: float | None = None,
        cache_size: int = 512,
    ) -> None:
        import torch

        self.t0 = float(t0)
        self.t1 = float(t1)
        if not self.t1 > self.t0:
            raise ValueError(f"need t1 > t0, got [{t0}, {t1}]")
        self.shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
        self.n_coefficients = _check_n(n_coefficients, minimum=1)
        self.seed = int(seed)
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if tol_ps is not None:  # coarser grid: fewer levels per query, endpoints snapped by <= tol/2
            if not tol_ps > 0:
                raise ValueError("tol_ps must be positive")
            max_depth = max(1, int(np.ceil(np.log2((self.t1 - self.t0) / tol_ps))))
        if not 1 <= int(max_depth) <= 1000:
            raise ValueError("max_depth must be in 1..1000")
        self.max_depth = int(max_depth)
        self.cache_size = max(2, int(cache_size))
        n = self.n_coefficients
        self._numel = int(np.prod(self.shape, dtype=np.int64))

        # Standardised coordinates: ell = L / sqrt(h/(2n+1)) ~ N(0, I).  For equal halves the
        # parent is ell_p = B [ell_l; ell_r] with B Bᵀ = I (the parent is standardised too), so
        # the exact conditional is ell_c = Bᵀ ell_p + Nb zeta, Nb an orthonormal basis of null(B).
        a = _composition_stack([0.5, 0.5], n)
        k = 2.0 * np.arange(n) + 1.0
        b = np.sqrt(k)[:, None] * np.concatenate([a[0], a[1]], axis=1) / np.sqrt(np.tile(2.0 * k, 2))[None, :]
        _, _, vt = np.linalg.svd(b, full_matrices=True)
        self._bt = np.ascontiguousarray(b.T)
        self._null = np.ascontiguousarray(vt[n:].T)
        self._std_factor = 1.0 / np.sqrt(k)  # L = sqrt(h) * std_factor * ell

        h = self.t1 - self.t0
        if coefficients is None:
            root = self._normal(("root",), n)
        else:
            if isinstance(coefficients, torch.Tensor):
                coefficients = coefficients.detach().cpu().double().numpy()
            c = np.asarray(coefficients, dtype=np.float64)
            if c.shape != (n,) + self.shape:
                raise ValueError(f"coefficients must have shape {(n,) + self.shape}, got {c.shape}")
            root = c.reshape(n, -1) / (np.sqrt(h) * self._std_factor[:, None])
        self._root = root  # standardised, (N, numel) float64
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    # -- internals -------------------------------------------------------------------------
    def _normal(self, key: tuple, rows: int) -> np.ndarray:
        digest = hashlib.blake2b(
            repr((self.seed,) + key).encode(), digest_size=16, person=b"molflowBrownian"
        ).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return rng.standard_normal((rows, self._numel))

    def _node(self, depth: int, index: int) -> np.ndarray:
        """Standardised coefficients (N, numel) of dyadic node (depth, index)."""
        val = self._root
        n = self.n_coefficients
        for level in range(1, depth + 1):
            idx = index >> (depth - level)
            key = (level, idx)
            hit = self._cache.get(key)
            if hit is None:
                parent = idx >> 1
                zeta = self._normal((level - 1, parent), n)
                children = self._bt @ val + self._null @ zeta  # (2N, numel)
                left, right = children[:n], children[n:]
                self._store((level, 2 * parent), left)
                self._store((level, 2 * parent + 1), right)
                val = left if idx % 2 == 0 else right
            else:
                self._cache.move_to_end(key)
                val = hit
        return val

    def _store(self, key, value) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _grid(self, t: float) -> int:
        t = float(t)
        span = self.t1 - self.t0
        tol = 1e-12 * span
        if not (self.t0 - tol <= t <= self.t1 + tol):
            raise ValueError(f"time {t} ps is outside the path's span [{self.t0}, {self.t1}] ps")
        u = min(max((t - self.t0) / span, 0.0), 1.0)
        return int(round(u * 2.0 ** self.max_depth))

    def _blocks(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """Maximal dyadic blocks (depth, index, size in grid cells) covering cells [a, b)."""
        out = []
        dmax = self.max_depth
        while a < b:
            j = dmax if a == 0 else min(dmax, (a & -a).bit_length() - 1)
            while a + (1 << j) > b:
                j -= 1
            out.append((dmax - j, a >> j, 1 << j))
            a += 1 << j
        return out

    # -- public ----------------------------------------------------------------------------
    def coefficients_numpy(self, s: float, t: float) -> np.ndarray:
        """Coefficients on [s, t] (ps) as a float64 numpy array (N, *shape) [sqrt(ps)]."""
        a, b = self._grid(s), self._grid(t)
        n = self.n_coefficients
        if b < a:
            raise ValueError(f"need s <= t, got [{s}, {t}]")
        if a == b:
            return np.zeros((n,) + self.shape)
        unit = (self.t1 - self.t0) / 2.0 ** self.max_depth
        blocks = self._blocks(a, b)
        pieces = np.stack(
            [self._node(depth, index) * (np.sqrt(size * unit) * self._std_factor)[:, None] for depth, index, size in blocks]
        )
        if len(blocks) == 1:
            out = pieces[0]
        else:
            sizes = np.array([blk[2] for blk in blocks], dtype=np.float64)
            out = compose(pieces, sizes / sizes.sum())
        return out.reshape((n,) + self.shape)

    def coefficients(self, s: float, t: float):
        """Coefficients L^(0..N-1) on [s, t] (ps) as a tensor (N, *shape) [sqrt(ps)]."""
        import torch

        return torch.from_numpy(self.coefficients_numpy(s, t)).to(device=self.device, dtype=self.dtype)

    def increment(self, s: float, t: float):
        """W_t - W_s (= L^(0) on [s, t]) as a tensor of ``shape`` [sqrt(ps)]."""
        return self.coefficients(s, t)[0]

    def __call__(self, s: float, t: float):
        return self.coefficients(s, t)

    def __repr__(self) -> str:
        return (
            f"BrownianPath(t0={self.t0}, t1={self.t1}, shape={self.shape}, "
            f"n_coefficients={self.n_coefficients}, seed={self.seed}, dtype={self.dtype})"
        )
