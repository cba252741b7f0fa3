"""Metrics for judging trajectories and samples against a reference (numpy, vectorised).

Conventions (DESIGN.md section 7), the same for every function here:

- angles in radians, wrapped into (-pi, pi]; degrees only where a name says ``_deg``;
- energies (and kT) in kJ/mol, lengths in nm;
- ``dt_ps`` is the interval between frames in ps; rates are per ns, times in ns unless a name says ps;
- arrays of trajectories are (R, F): replicas x frames (a 1-D array is read as one replica);
- every function returns plain floats, lists or dicts (JSON-serialisable; NaN and inf never appear in
  dicts: they become ``None``); the functions that return arrays say so.

Where the data cannot estimate a number (no transitions, no samples, ...) the number is ``None`` and a
human-readable reason is put under the key ``"reason"`` of the returned dict; functions that return a
bare float return ``None`` in that case (their docstrings say when). Nothing here raises for that case.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import numpy as np
from scipy.special import rel_entr
from scipy.stats import wasserstein_distance

from .dihedrals import dihedral_angles
from .structure import angle_difference, kabsch_rmsd, rmsd

__all__ = [
    "BASINS",
    "wrap_angle",
    "phi_psi_histogram",
    "js_divergence",
    "js_phi_psi",
    "phi_psi_block_histograms",
    "js_block_jackknife_se",
    "free_energy",
    "fes_rmse",
    "fes_rmse_1d",
    "fes_rmse_2d",
    "basin_assignment",
    "basin_populations",
    "wasserstein_1d",
    "bond_length_w1",
    "angle_w1",
    "phi_core_states",
    "transition_kinetics",
    "autocorrelation",
    "integrated_autocorrelation_time",
    "effective_sample_size",
    "discretise",
    "implied_timescales",
    "ck_test",
    "strong_error",
]

_TWO_PI = 2.0 * np.pi


# ----------------------------------------------------------------------------------------- helpers
def _num(x) -> float | None:
    """A Python float, or None for None / NaN / inf (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _as_2d(x) -> np.ndarray:
    """(R, F) float array; a 1-D array is one replica, a scalar one frame."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1, 1)
    elif a.ndim == 1:
        a = a[None, :]
    elif a.ndim > 2:
        a = a.reshape(a.shape[0], -1)
    return a


def _flat_weights(weights, n: int) -> np.ndarray:
    """Weights as a flat float array of n entries (None: ones; a scalar: repeated)."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size == 1:
        return np.full(n, w[0])
    if w.size != n:
        raise ValueError(f"{w.size} weights for {n} samples")
    return w


def wrap_angle(a) -> np.ndarray:
    """Wrap angles (radians) into (-pi, pi] (note: -pi maps to +pi)."""
    a = np.asarray(a, dtype=np.float64)
    return np.pi - np.mod(np.pi - a, _TWO_PI)


def kish_ess(weights: np.ndarray) -> float:
    """Kish's effective sample size (Σw)² / Σw² (0 for no weight)."""
    w = np.asarray(weights, dtype=np.float64)
    s2 = float((w * w).sum())
    return float(w.sum() ** 2 / s2) if s2 > 0 else 0.0


# ------------------------------------------------------------------------------ distributions, JS
def phi_psi_histogram(phi, psi, weights=None, bins: int = 64) -> np.ndarray:
    """Joint (phi, psi) histogram as probabilities on [-pi, pi]^2.

    phi, psi: radians, any matching shape ((R, F), (M,), ...); weights: same shape or None
    (non-finite angles are dropped). Returns a (bins, bins) float array indexed [phi_bin, psi_bin]
    with bin edges ``linspace(-pi, pi, bins + 1)`` (angles are first wrapped into (-pi, pi]); it sums
    to 1, or is all zeros when there is no sample with positive weight.
    """
    phi = np.asarray(phi, dtype=np.float64).ravel()
    psi = np.asarray(psi, dtype=np.float64).ravel()
    w = _flat_weights(weights, phi.size)
    ok = np.isfinite(phi) & np.isfinite(psi) & np.isfinite(w)
    h, _, _ = np.histogram2d(wrap_angle(phi[ok]), wrap_angle(psi[ok]), bins=bins,
                             range=[[-np.pi, np.pi], [-np.pi, np.pi]], weights=w[ok])
    total = h.sum()
    return h / total if total > 0 else np.zeros((bins, bins))


def _angle_histogram(a, weights=None, bins: int = 64) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).ravel()
    w = _flat_weights(weights, a.size)
    ok = np.isfinite(a) & np.isfinite(w)
    h, _ = np.histogram(wrap_angle(a[ok]), bins=bins, range=(-np.pi, np.pi), weights=w[ok])
    total = h.sum()
    return h / total if total > 0 else np.zeros(bins)


def js_divergence(p, q) -> float | None:
    """Jensen-Shannon divergence (natural log; the divergence, not its square root).

    JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, in nats, bounded by ln 2.
    p, q: histograms of the same shape (probabilities or counts; each is normalised to sum 1 here);
    empty bins are handled (0 ln 0 = 0). 0 for identical distributions, ln 2 for disjoint supports.
    Returns None when either histogram is empty (all zeros).
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in size: {p.size} vs {q.size}")
    sp, sq = p.sum(), q.sum()
    if not (sp > 0 and sq > 0):
        return None
    p = p / sp
    q = q / sq
    m = 0.5 * (p + q)
    js = 0.5 * rel_entr(p, m).sum() + 0.5 * rel_entr(q, m).sum()
    return float(min(max(js, 0.0), math.log(2.0)))


def js_phi_psi(phi_a, psi_a, phi_b, psi_b, weights_a=None, weights_b=None,
               bins: int = 64) -> float | None:
    """Jensen-Shannon divergence (nats) of two (phi, psi) distributions on a bins x bins grid.

    Angles in radians, any shapes (each set is flattened); optional weights per sample. The grid is
    that of :func:`phi_psi_histogram` (64 x 64 on [-pi, pi]^2 by default, DESIGN section 7).
    Returns None when either set has no sample.
    """
    return js_divergence(phi_psi_histogram(phi_a, psi_a, weights_a, bins),
                         phi_psi_histogram(phi_b, psi_b, weights_b, bins))


def phi_psi_block_histograms(phi, psi, n_blocks: int = 20, bins: int = 64) -> np.ndarray:
    """(phi, psi) count histograms of contiguous time blocks: returns a (B, bins, bins) array.

    phi, psi: (R, F) radians (a 1-D array is one replica). Each replica is cut into
    ceil(n_blocks / R) contiguous blocks of (nearly) equal length (at most F), so B ~ n_blocks;
    their sum is the run's histogram of counts (non-finite angles dropped). Blocks are the units
    of :func:`js_block_jackknife_se`: where much longer than the angles' correlation time, they are
    nearly independent.
    """
    a, b = _as_2d(phi), _as_2d(psi)
    R, F = a.shape
    per = max(1, min(F, int(np.ceil(n_blocks / max(R, 1)))))
    out = []
    for r in range(R):
        for idx in np.array_split(np.arange(F), per):
            x, y = a[r, idx], b[r, idx]
            ok = np.isfinite(x) & np.isfinite(y)
            h, _, _ = np.histogram2d(wrap_angle(x[ok]), wrap_angle(y[ok]), bins=bins,
                                     range=[[-np.pi, np.pi], [-np.pi, np.pi]])
            out.append(h)
    return np.asarray(out) if out else np.zeros((0, bins, bins))


def _js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS divergence (nats) of each row pair of two (n, K) arrays of non-negative masses."""
    p = p / p.sum(1, keepdims=True)
    q = q / q.sum(1, keepdims=True)
    m = 0.5 * (p + q)
    return 0.5 * rel_entr(p, m).sum(1) + 0.5 * rel_entr(q, m).sum(1)


def js_block_jackknife_se(blocks_a, blocks_b) -> float | None:
    """Delete-one-block jackknife standard error of the JS divergence of two runs' (phi, psi) histograms.

    blocks_a, blocks_b: (B, bins, bins) block count histograms (:func:`phi_psi_block_histograms`),
    the blocks of each run taken as independent. JS is recomputed with each block of either run left
    out; the variance is the sum over both runs of (B - 1)/B x sum_i (JS_(-i) - mean)^2. By the
    Efron-Stein inequality this jackknife variance is, in expectation, an upper bound on the true
    variance (for independent blocks): a conservative SE. (A bootstrap over blocks is not: resampling
    with replacement adds its own multinomial noise to a statistic that is quadratic near zero, and
    overstated the spread 2-6x on i.i.d. data.) None with fewer than 2 blocks in either run.
    """
    A = np.asarray(blocks_a, dtype=np.float64)
    Bk = np.asarray(blocks_b, dtype=np.float64)
    if len(A) < 2 or len(Bk) < 2:
        return None
    A, Bk = A.reshape(len(A), -1), Bk.reshape(len(Bk), -1)
    sa, sb = A.sum(0), Bk.sum(0)
    if not (sa.sum() > 0 and sb.sum() > 0):
        return None
    var = 0.0
    for left, other in ((sa[None] - A, np.broadcast_to(sb, A.shape)), (np.broadcast_to(sa, Bk.shape), sb[None] - Bk)):
        ok = (left.sum(1) > 0) & (other.sum(1) > 0)
        v = _js_rows(left[ok], other[ok])
        n = len(v)
        if n >= 2:
            var += (n - 1) / n * ((v - v.mean()) ** 2).sum()
    return _num(math.sqrt(var))


# ------------------------------------------------------------------------------------ free energy
def free_energy(p, kT: float) -> np.ndarray:
    """Free energy F = -kT ln p (units of kT, i.e. kJ/mol for kT in kJ/mol), shifted so min F = 0.

    p: histogram (any shape, need not be normalised). Returns an array of p's shape, NaN where
    p = 0 (all NaN when p is empty).
    """
    p = np.asarray(p, dtype=np.float64)
    f = np.full(p.shape, np.nan)
    pos = p > 0
    if pos.any():
        f[pos] = -kT * np.log(p[pos])
        f[pos] -= f[pos].min()
    return f


def fes_rmse(p_ref, p, kT: float, n_samples: float | None = None) -> float | None:
    """RMSE (kJ/mol for kT in kJ/mol) between the free energies of two histograms.

    Taken over the bins populated in the reference (p_ref > 0), after removing the optimal constant
    offset (the mean of F - F_ref over those bins, which minimises the RMSE). Each histogram is
    normalised to sum 1. Bins populated in the reference but empty in ``p`` get the free energy of
    one count: F = -kT ln(1 / n_samples) when ``n_samples`` (the number of samples behind ``p``,
    or their effective number for weighted samples) is given, else -kT ln(min_{p>0} p / 2) (half
    the smallest populated bin) -- a finite, conservative penalty instead of an infinite one.
    Returns None when either histogram is empty.
    """
    p_ref = np.asarray(p_ref, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if p_ref.shape != p.shape:
        raise ValueError(f"histograms differ in shape: {p_ref.shape} vs {p.shape}")
    if not (p_ref.sum() > 0 and p.sum() > 0):
        return None
    p_ref = p_ref / p_ref.sum()
    p = p / p.sum()
    mask = p_ref > 0
    fill = (1.0 / float(n_samples)) if n_samples else p[p > 0].min() / 2.0
    pm = np.where(p[mask] > 0, p[mask], fill)
    d = -kT * np.log(pm) + kT * np.log(p_ref[mask])
    d -= d.mean()
    return float(np.sqrt(np.mean(d * d)))


def fes_rmse_1d(a_ref, a, kT: float, bins: int = 64, weights_ref=None,
                weights=None) -> float | None:
    """Free-energy RMSE (kJ/mol) of a 1-D angle (radians), ``bins`` bins on [-pi, pi].

    As :func:`fes_rmse`; the one-count fill uses n_samples = the number of samples in ``a``
    (Kish's effective number (sum w)^2 / sum w^2 when weighted). None when either set is empty.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    w = _flat_weights(weights, a.size)
    ok = np.isfinite(a) & np.isfinite(w)
    return fes_rmse(_angle_histogram(a_ref, weights_ref, bins), _angle_histogram(a, weights, bins),
                    kT, n_samples=kish_ess(w[ok]) or None)


def fes_rmse_2d(phi_ref, psi_ref, phi, psi, kT: float, bins: int = 64, weights_ref=None,
                weights=None) -> float | None:
    """Free-energy RMSE (kJ/mol) on the (phi, psi) grid of :func:`phi_psi_histogram`.

    As :func:`fes_rmse_1d`, in two dimensions. None when either set is empty.
    """
    phi = np.asarray(phi, dtype=np.float64).ravel()
    psi = np.asarray(psi, dtype=np.float64).ravel()
    w = _flat_weights(weights, phi.size)
    ok = np.isfinite(phi) & np.isfinite(psi) & np.isfinite(w)
    return fes_rmse(phi_psi_histogram(phi_ref, psi_ref, weights_ref, bins),
                    phi_psi_histogram(phi, psi, weights, bins), kT,
                    n_samples=kish_ess(w[ok]) or None)


# ----------------------------------------------------------------------------------------- basins
#: Basins of alanine-dipeptide-like (phi, psi), in degrees. Each basin is a list of boxes
#: ((phi_lo, phi_hi), (psi_lo, psi_hi)), each interval half-open lo < x <= hi to match angles in
#: (-180, 180]. Together they partition the torus (populations sum to 1):
#:   beta          (beta, PII, C5, C7eq):  -180 < phi <= 0  and (50 < psi <= 180 or -180 < psi <= -120)
#:   alpha_R       (right-handed helix):    -180 < phi <= 0  and -120 < psi <= 50
#:   alpha_L_C7ax  (alpha_L and C7ax):         0 < phi <= 180 (any psi)
BASINS: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {
    "beta": [((-180.0, 0.0), (50.0, 180.0)), ((-180.0, 0.0), (-180.0, -120.0))],
    "alpha_R": [((-180.0, 0.0), (-120.0, 50.0))],
    "alpha_L_C7ax": [((0.0, 180.0), (-180.0, 180.0))],
}


def basin_assignment(phi, psi) -> np.ndarray:
    """Index of the basin (in the order of :data:`BASINS`) of every frame; -1 outside all (never
    for the default partition, except for non-finite angles). Radians in, int array of phi's shape."""
    phid = np.degrees(wrap_angle(phi))
    psid = np.degrees(wrap_angle(psi))
    out = np.full(np.shape(phid), -1, dtype=np.int64)
    for i, boxes in enumerate(BASINS.values()):
        hit = np.zeros(np.shape(phid), dtype=bool)
        for (a0, a1), (b0, b1) in boxes:
            hit |= (phid > a0) & (phid <= a1) & (psid > b0) & (psid <= b1)
        out[hit & (out < 0)] = i
    return out


def basin_populations(phi, psi, weights=None, n_bootstrap: int = 200, seed: int = 0) -> dict:
    """Populations of the :data:`BASINS` with bootstrap standard errors.

    phi, psi: (R, F) radians (1-D = one replica, e.g. i.i.d. samples); weights: (R, F) or None.
    population = (weight in the basin) / (total weight), over all replicas and frames.
    The standard error is the standard deviation (ddof=1) of the population over ``n_bootstrap``
    resamples (seeded by ``seed``) of whole replicas with replacement when R > 1; with R = 1 the
    single trajectory is cut into 10 contiguous blocks (fewer if it has fewer frames) and the blocks
    are resampled -- ``"method"`` says which. Returns
    ``{basin: {"population": p, "se": s}, ..., "method": str, "n_units": int, "reason": str|None}``.
    """
    phi2 = _as_2d(phi)
    psi2 = _as_2d(psi)
    R, F = phi2.shape
    w = _flat_weights(weights, phi2.size).reshape(phi2.shape)
    lab = basin_assignment(phi2, psi2)
    ok = np.isfinite(phi2) & np.isfinite(psi2) & np.isfinite(w)
    w = np.where(ok, w, 0.0)
    names = list(BASINS)
    nb = len(names)
    # per-unit (replica or block) basin weights (U, nb) and total weights (U,)
    if R > 1:
        units_w = w
        units_lab = lab
        method = f"bootstrap over {R} replicas (whole replicas resampled, {n_bootstrap} resamples)"
    else:
        n_blocks = min(10, F)
        edges = np.linspace(0, F, n_blocks + 1).astype(int)
        idx = np.repeat(np.arange(n_blocks), np.diff(edges))
        units_w = np.zeros((n_blocks, F))
        units_lab = np.full((n_blocks, F), -1)
        units_w[idx, np.arange(F)] = w[0]
        units_lab[idx, np.arange(F)] = lab[0]
        method = (f"single trajectory: bootstrap over {n_blocks} contiguous blocks "
                  f"({n_bootstrap} resamples)")
    per_unit = np.stack([(units_w * (units_lab == i)).sum(1) for i in range(nb)], axis=1)
    tot_unit = units_w.sum(1)
    U = len(tot_unit)
    out: dict = {"method": method, "n_units": int(U), "reason": None}
    total = tot_unit.sum()
    if not total > 0:
        for name in names:
            out[name] = {"population": None, "se": None}
        out["reason"] = "no sample with positive weight"
        return out
    pops = per_unit.sum(0) / total
    se = [None] * nb
    if U >= 2 and n_bootstrap >= 2:
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, U, size=(n_bootstrap, U))
        bw = per_unit[pick].sum(1)  # (B, nb)
        bt = tot_unit[pick].sum(1)  # (B,)
        good = bt > 0
        if good.sum() >= 2:
            se = list(np.std(bw[good] / bt[good, None], axis=0, ddof=1))
    else:
        out["reason"] = "fewer than 2 replicas/blocks (or bootstrap resamples): no standard error"
    for i, name in enumerate(names):
        out[name] = {"population": _num(pops[i]), "se": _num(se[i])}
    return out


# ------------------------------------------------------------------------------------ Wasserstein
def wasserstein_1d(a, b, weights_a=None, weights_b=None) -> float | None:
    """1-Wasserstein (earth mover's) distance between two 1-D samples, in the samples' units.

    a, b: any shapes (flattened; non-finite values dropped); optional non-negative weights of the
    same shapes (scipy.stats.wasserstein_distance). None when either sample is empty.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    wa = None if weights_a is None else _flat_weights(weights_a, a.size)
    wb = None if weights_b is None else _flat_weights(weights_b, b.size)
    ka = np.isfinite(a) if wa is None else np.isfinite(a) & np.isfinite(wa) & (wa > 0)
    kb = np.isfinite(b) if wb is None else np.isfinite(b) & np.isfinite(wb) & (wb > 0)
    if not (ka.any() and kb.any()):
        return None
    return float(wasserstein_distance(a[ka], b[kb], None if wa is None else wa[ka],
                                      None if wb is None else wb[kb]))


def bond_lengths(pos, bonds) -> np.ndarray:
    """Bond lengths (nm), (frames, n_bonds), of (..., A, 3) positions (nm) and (n_bonds, 2) atom pairs."""
    p = np.asarray(pos, dtype=np.float64)
    b = np.asarray(bonds, dtype=int).reshape(-1, 2)
    d = np.linalg.norm(p[..., b[:, 0], :] - p[..., b[:, 1], :], axis=-1)
    return d.reshape(-1, len(b))


def bond_angles(pos, angles) -> np.ndarray:
    """Bond angles (radians, in [0, pi]), (frames, n_angles), of (..., A, 3) positions and (i, j, k)
    triples with the vertex at j."""
    p = np.asarray(pos, dtype=np.float64)
    t = np.asarray(angles, dtype=int).reshape(-1, 3)
    u = p[..., t[:, 0], :] - p[..., t[:, 1], :]
    v = p[..., t[:, 2], :] - p[..., t[:, 1], :]
    cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    return np.arccos(np.clip(cos, -1.0, 1.0)).reshape(-1, len(t))


def spread_ratios(pos_ref, pos, bonds, angles) -> dict:
    """How wide each bond length's and bond angle's distribution is against the reference's.

    pos_ref, pos: (..., A, 3) nm; bonds (nb, 2); angles (na, 3) with the vertex in the middle. For
    every bond and angle the ratio std(sampled) / std(reference); returns the median, min and max
    ratio of each kind, how many lie within 10% of 1, and ``worst_rel`` = the largest |ratio - 1|
    over both kinds (issue 17's target: <= 0.1). A map that leaves bonds strained or loose shows
    ratios > 1 (DESIGN.md 3.4)."""
    rb = bond_lengths(pos, bonds).std(0) / bond_lengths(pos_ref, bonds).std(0)
    ra = bond_angles(pos, angles).std(0) / bond_angles(pos_ref, angles).std(0)
    out: dict = {}
    for name, r in (("bond", rb), ("angle", ra)):
        out.update({f"{name}_ratio_median": _num(np.median(r)) if len(r) else None,
                    f"{name}_ratio_min": _num(r.min()) if len(r) else None,
                    f"{name}_ratio_max": _num(r.max()) if len(r) else None,
                    f"{name}s_within_10pct": int((np.abs(r - 1) <= 0.1).sum()), f"n_{name}s": int(len(r))})
    both = np.concatenate([rb, ra])
    out["worst_rel"] = _num(np.abs(both - 1).max()) if len(both) else None
    return out


def _mean_columnwise_w1(x_ref, x, w_ref, w) -> float | None:
    if x_ref.shape[1] == 0:
        return None
    vals = [wasserstein_1d(x_ref[:, j], x[:, j], w_ref, w) for j in range(x_ref.shape[1])]
    if any(v is None for v in vals):
        return None
    return float(np.mean(vals))


def bond_length_w1(pos_ref, pos, bonds, *, weights_ref=None, weights=None) -> float | None:
    """Mean over bonds of the 1-Wasserstein distance (nm) between each bond's length distributions.

    pos_ref, pos: (..., A, 3) positions in nm (all leading axes are frames/samples); bonds: (nb, 2)
    atom indices. Optional weights per frame (shape of the leading axes). None when there is no bond
    or no frame.
    """
    wr = None if weights_ref is None else np.asarray(weights_ref, dtype=np.float64).ravel()
    w = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    return _mean_columnwise_w1(bond_lengths(pos_ref, bonds), bond_lengths(pos, bonds), wr, w)


def angle_w1(pos_ref, pos, angles, *, weights_ref=None, weights=None) -> float | None:
    """Mean over bond angles of the 1-Wasserstein distance (radians) between angle distributions.

    pos_ref, pos: (..., A, 3) nm; angles: (na, 3) atom indices (i, j, k) with the vertex at j; the
    angle is in [0, pi] (not periodic, so the ordinary 1-D W1 applies). None when empty.
    """
    wr = None if weights_ref is None else np.asarray(weights_ref, dtype=np.float64).ravel()
    w = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    return _mean_columnwise_w1(bond_angles(pos_ref, angles), bond_angles(pos, angles), wr, w)


# --------------------------------------------------------------------------------------- kinetics
def phi_core_states(phi, core_neg=(np.deg2rad(-150.0), np.deg2rad(-30.0)),
                    core_pos=(np.deg2rad(30.0), np.deg2rad(100.0))) -> np.ndarray:
    """Core-set state of every frame from phi (radians), with hysteresis.

    A frame inside ``core_neg`` (default -150 deg <= phi <= -30 deg: beta / alpha_R) is state 0,
    inside ``core_pos`` (default 30 deg <= phi <= 100 deg: alpha_L / C7ax) state 1; a frame in
    neither core keeps the state of the last core visited in its replica, and is -1 before any core.
    phi: (R, F) (or (F,)); returns an int array of the same shape.
    """
    a = np.asarray(phi, dtype=np.float64)
    shape = a.shape
    a2 = _as_2d(wrap_angle(a))
    core = np.full(a2.shape, -1, dtype=np.int64)
    core[(a2 >= core_neg[0]) & (a2 <= core_neg[1])] = 0
    core[(a2 >= core_pos[0]) & (a2 <= core_pos[1])] = 1
    F = a2.shape[1]
    last = np.where(core >= 0, np.arange(F)[None, :], -1)
    last = np.maximum.accumulate(last, axis=1)
    states = np.where(last >= 0, np.take_along_axis(core, np.maximum(last, 0), axis=1), -1)
    return states.reshape(shape)


def transition_kinetics(states, dt_ps: float) -> dict:
    """Transition counts, rates and mean first-passage times between two core states.

    states: (R, F) ints from :func:`phi_core_states` (0 = negative-phi core, 1 = positive-phi core,
    -1 = before any core); dt_ps: frame interval (ps).

    - ``n_transitions_neg_to_pos`` / ``_pos_to_neg``: frames t -> t+1 where the state changes
      0 -> 1 / 1 -> 0, summed over replicas.
    - ``rate_neg_to_pos_per_ns`` = n(0->1) / (time spent in state 0), the time being
      (number of frame intervals t -> t+1 that start in state 0) x dt, summed over replicas; likewise
      for 1 -> 0. None (with a reason) when the origin state was never occupied; 0.0 when it was but
      no transition happened (the reason then notes it is an upper-bound-free zero).
    - ``mfpt_neg_to_pos_ns``: mean over the entries into state 0 (1 -> 0 switches) of the time to the
      next arrival in state 1 within the same replica, i.e. the mean duration of completed state-0
      dwells; dwells that start at the beginning of a replica (left-censored: the entry time is
      unknown) or run off its end (right-censored) are excluded. None when there is no complete
      dwell. Likewise ``mfpt_pos_to_neg_ns``.

    Discrete time: everything is measured at frame resolution. For a Markov chain that switches
    with probability p per frame, the rate estimates p / dt and the MFPT estimates dt / p (mean of
    a geometric dwell time in frames, times dt); a continuous-time process with rate k seen every dt
    has p = 1 - exp(-k dt), so rate and 1/MFPT equal k only to first order in k dt, and recrossings
    faster than a frame are not seen.
    Also returned: ``time_in_neg_ns``, ``time_in_pos_ns``, ``n_dwells_neg``, ``n_dwells_pos``,
    ``dt_ps``, and ``reason`` (None when every number could be estimated).
    """
    s = np.asarray(states)
    s = s.reshape(1, -1) if s.ndim <= 1 else s.reshape(s.shape[0], -1)
    a, b = s[:, :-1], s[:, 1:]
    n01 = int(((a == 0) & (b == 1)).sum())
    n10 = int(((a == 1) & (b == 0)).sum())
    t0_ns = float((a == 0).sum()) * dt_ps / 1000.0
    t1_ns = float((a == 1).sum()) * dt_ps / 1000.0
    reasons = []

    def rate(n, t, name):
        if t <= 0:
            reasons.append(f"{name}: origin state never occupied")
            return None
        if n == 0:
            reasons.append(f"{name}: no transition observed in {t:.4g} ns (rate 0 is only a bound)")
        return n / t

    out = {
        "n_transitions_neg_to_pos": n01,
        "n_transitions_pos_to_neg": n10,
        "rate_neg_to_pos_per_ns": _num(rate(n01, t0_ns, "neg_to_pos rate")),
        "rate_pos_to_neg_per_ns": _num(rate(n10, t1_ns, "pos_to_neg rate")),
    }
    # complete dwells: between consecutive switch frames of one replica
    dwell = {0: [], 1: []}
    for row in s:
        sw = np.flatnonzero((row[1:] != row[:-1]) & (row[:-1] >= 0)) + 1  # first frame of new state
        if len(sw) >= 2:
            lengths = np.diff(sw)
            st = row[sw[:-1]]
            for k in (0, 1):
                dwell[k].append(lengths[st == k])
    d0 = np.concatenate(dwell[0]) if dwell[0] else np.zeros(0)
    d1 = np.concatenate(dwell[1]) if dwell[1] else np.zeros(0)
    for key, d, name in (("mfpt_neg_to_pos_ns", d0, "neg_to_pos"),
                         ("mfpt_pos_to_neg_ns", d1, "pos_to_neg")):
        if len(d):
            out[key] = _num(d.mean() * dt_ps / 1000.0)
        else:
            out[key] = None
            reasons.append(f"{name} MFPT: no complete dwell (entry followed by an arrival)")
    out.update({"n_dwells_neg": int(len(d0)), "n_dwells_pos": int(len(d1)),
                "time_in_neg_ns": t0_ns, "time_in_pos_ns": t1_ns, "dt_ps": float(dt_ps),
                "reason": "; ".join(reasons) if reasons else None})
    return out


# -------------------------------------------------------------------------------- autocorrelation
def _acov_fft(y: np.ndarray, max_lag: int) -> np.ndarray:
    """sum over replicas and t of y[t] y[t+k] for k = 0..max_lag; y (R, F), NaN-free."""
    R, F = y.shape
    n = 1 << int(np.ceil(np.log2(2 * F)))
    fy = np.fft.rfft(y, n=n, axis=1)
    ac = np.fft.irfft(fy * np.conj(fy), n=n, axis=1)[:, : max_lag + 1]
    return ac.sum(0)


def autocorrelation(x, max_lag: int, circular: bool = True) -> np.ndarray:
    """Normalised autocorrelation function averaged over replicas (FFT), lags 0..max_lag frames.

    x: (R, F) (1-D = one replica). With ``circular=True`` (angles in radians) x is mapped to unit
    vectors u = (cos x, sin x), the pooled mean vector (over all replicas and frames) is removed,
    and C(k) = <(u_t - m) . (u_{t+k} - m)> / <|u_t - m|^2>, so periodicity is respected, C(0) = 1
    and C(k) -> 0 for decorrelated frames (unlike <cos(x_{t+k} - x_t)>, which tends to |m|^2).
    With ``circular=False`` the same with the scalar x and its pooled mean. The average at lag k
    is over all R (F - k) pairs (replicas holding non-finite values are left out). Returns a
    (max_lag + 1,) float array; lags >= F are NaN, and the whole array is NaN when x has no
    variance or no frame.
    """
    a = _as_2d(x)
    out = np.full(max_lag + 1, np.nan)
    a = a[np.all(np.isfinite(a), axis=1)]  # replicas with non-finite values are left out
    R, F = a.shape
    if R == 0 or F == 0:
        return out
    kmax = min(max_lag, F - 1)
    if circular:
        comps = [np.cos(a), np.sin(a)]
    else:
        comps = [a]
    centred = [c - c.mean() for c in comps]
    var = sum(float((y * y).mean()) for y in centred)
    scale = sum(float((c * c).mean()) for c in comps)
    if not var > 1e-24 * scale:  # no variance (up to rounding): the ACF is undefined
        return out
    num = np.zeros(kmax + 1)
    for y in centred:
        num += _acov_fft(y, kmax)
    num /= R * (F - np.arange(kmax + 1))
    out[: kmax + 1] = num / num[0]
    return out


def integrated_autocorrelation_time(acf, dt_ps: float, c: float = 5.0) -> float | None:
    """Integrated autocorrelation time (ps) from a normalised ACF, with Sokal's automatic window.

    tau(M) = dt * (1/2 + sum_{k=1..M} acf(k)); the window M is the smallest with M >= c tau(M)/dt
    (Sokal, c = 5). With this convention an uncorrelated series has tau = dt/2 and AR(1) with
    coefficient a has tau = dt (1 + a) / (2 (1 - a)); the effective number of samples is
    N dt / (2 tau). When no M up to the last finite lag satisfies the criterion the sum over all
    of them is returned (then an underestimate). None when acf is empty or NaN at lag 1.
    """
    r = np.asarray(acf, dtype=np.float64)
    if len(r) < 2 or not np.isfinite(r[1]):
        return None
    nf = np.flatnonzero(~np.isfinite(r))
    if len(nf):
        r = r[: nf[0]]
    taus = 0.5 + np.cumsum(r[1:])
    m = np.arange(1, len(r))
    ok = np.flatnonzero(m >= c * taus)
    tau = taus[ok[0]] if len(ok) else taus[-1]
    return float(tau * dt_ps)


def effective_sample_size(x, dt_ps: float, circular: bool = True) -> float | None:
    """Effective number of independent samples in (R, F) data (angles by default).

    ESS = R F dt / (2 tau_int), tau_int from :func:`integrated_autocorrelation_time` on the
    replica-averaged ACF of :func:`autocorrelation` (all lags up to F - 1), capped at R F (so it does
    not exceed the number of frames for anticorrelated series). None when the ACF is undefined
    (fewer than 2 frames or no variance). Unitless; dt_ps only sets the scale of tau and cancels.
    """
    a = _as_2d(x)
    R, F = a.shape
    if F < 2:
        return None
    tau = integrated_autocorrelation_time(autocorrelation(a, F - 1, circular), dt_ps)
    if tau is None:
        return None
    n = R * F
    if tau <= 0:
        return float(n)
    return float(min(n, n * dt_ps / (2.0 * tau)))


# -------------------------------------------------------------------------------------------- MSM
def discretise(phi, psi, n_bins: int = 6) -> np.ndarray:
    """Regular n_bins x n_bins grid on the (phi, psi) torus: state = i_phi * n_bins + i_psi.

    phi, psi radians, (R, F) (any shape); bins of width 2 pi / n_bins starting at -pi. Returns
    an int array of the same shape, states 0 .. n_bins^2 - 1 (states never visited are fine: the
    MSM functions use the largest connected set).
    """
    def idx(a):
        a = wrap_angle(a)
        return np.clip(np.floor((a + np.pi) / _TWO_PI * n_bins).astype(np.int64), 0, n_bins - 1)

    return idx(phi) * n_bins + idx(psi)


def _dtraj_list(dtrajs) -> list[np.ndarray]:
    if isinstance(dtrajs, np.ndarray):
        d = dtrajs.reshape(1, -1) if dtrajs.ndim == 1 else dtrajs.reshape(dtrajs.shape[0], -1)
        return [np.ascontiguousarray(r, dtype=np.int32) for r in d]
    return [np.ascontiguousarray(np.asarray(r).ravel(), dtype=np.int32) for r in dtrajs]


def _count_model(dtrajs: list[np.ndarray], lag: int, n_states: int):
    from deeptime.markov import TransitionCountEstimator

    return TransitionCountEstimator(lag, "sliding", n_states=n_states).fit(dtrajs).fetch_model()


def _msm(count_model):
    from deeptime.markov.msm import MaximumLikelihoodMSM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MaximumLikelihoodMSM(reversible=True).fit(count_model).fetch_model()


def implied_timescales(dtrajs, lags_frames: Iterable[int], dt_ps: float,
                       n_timescales: int = 3) -> dict:
    """Implied timescales (ns) of reversible maximum-likelihood MSMs at several lag times.

    dtrajs: (R, F) ints (or a list of 1-D int arrays); lags_frames: lag times in frames; dt_ps:
    frame interval. For each lag: sliding-window transition counts (deeptime
    TransitionCountEstimator), restricted to the largest (strongly) connected set, a reversible
    maximum-likelihood MSM (deeptime MaximumLikelihoodMSM), and t_i = -lag dt / ln|lambda_i| for the
    ``n_timescales`` largest non-unit eigenvalues. Returns ``{"lags_ps": [...], "timescales_ns":
    [[t_1, ..., t_n] per lag], "n_active_states": [...], "reason": str|None}``; a timescale that
    cannot be estimated (lag >= F, fewer active states than n_timescales + 1, lambda <= 0 or 1)
    is None and the reason says why.
    """
    d = _dtraj_list(dtrajs)
    d = [r for r in d if len(r)]
    lags = [int(x) for x in lags_frames]
    out = {"lags_ps": [float(l * dt_ps) for l in lags], "timescales_ns": [], "n_active_states": [],
           "reason": None}
    reasons = []
    if not d:
        out["timescales_ns"] = [[None] * n_timescales for _ in lags]
        out["n_active_states"] = [0 for _ in lags]
        out["reason"] = "no discrete trajectory"
        return out
    n_states = int(max(r.max() for r in d)) + 1
    longest = max(len(r) for r in d)
    for lag in lags:
        ts = [None] * n_timescales
        n_act = 0
        if lag < 1 or lag >= longest:
            reasons.append(f"lag {lag} frames: not in [1, {longest - 1}] (trajectory length)")
        else:
            cm = _count_model(d, lag, n_states).submodel_largest()
            n_act = int(cm.n_states)
            if n_act < 2 or cm.count_matrix.sum() == 0:
                reasons.append(f"lag {lag} frames: largest connected set has {n_act} state(s)")
            else:
                msm = _msm(cm)
                k = min(n_timescales, n_act - 1)
                ev = np.sort(np.abs(np.real(msm.eigenvalues(k + 1))))[::-1][1:]
                for i, lam in enumerate(ev):
                    if 0 < lam < 1:
                        ts[i] = _num(-lag * dt_ps / np.log(lam) / 1000.0)
                if k < n_timescales:
                    reasons.append(f"lag {lag} frames: only {n_act} active states, "
                                   f"{n_act - 1} timescale(s)")
                if any(t is None for t in ts[:k]):
                    reasons.append(f"lag {lag} frames: eigenvalue 0 or 1 (no finite timescale)")
        out["timescales_ns"].append(ts)
        out["n_active_states"].append(n_act)
    out["reason"] = "; ".join(reasons) if reasons else None
    return out


def ck_test(dtrajs, lag_frames: int, dt_ps: float) -> dict:
    """Chapman-Kolmogorov test: one 2-lag jump against two lag jumps.

    Reversible maximum-likelihood MSMs T(lag) and T(2 lag) (sliding counts, deeptime) are estimated
    on a common active set: the intersection of the largest connected sets at both lags, repeated
    until both restricted count matrices are connected on it. With P = T(lag)^2 (prediction) and
    E = T(2 lag) (estimate):

    - ``per_state_error[i]`` = |P_ii - E_ii|: for each active state, the error of the predicted
      probability to be in that state again after 2 lag, having started in it;
    - ``max_abs_error`` = max_i per_state_error[i];
    - ``weighted_mean_abs_error`` = sum_i pi_i |P_ii - E_ii| with pi the stationary distribution
      of T(lag) (less sensitive to rarely visited states);
    - ``max_abs_error_matrix`` = max_ij |P_ij - E_ij|.

    Also ``states`` (the active state labels), ``predicted_diagonal``, ``estimated_diagonal``,
    ``lag_ps`` and ``reason`` (None when the test could be made). Errors are None when it could
    not (lag too long, fewer than 2 common active states).
    """
    d = [r for r in _dtraj_list(dtrajs) if len(r)]
    out = {"lag_ps": float(lag_frames * dt_ps), "max_abs_error": None, "per_state_error": [],
           "weighted_mean_abs_error": None, "max_abs_error_matrix": None, "states": [],
           "predicted_diagonal": [], "estimated_diagonal": [], "reason": None}
    lag = int(lag_frames)
    longest = max((len(r) for r in d), default=0)
    if lag < 1 or 2 * lag >= longest:
        out["reason"] = f"2 x lag = {2 * lag} frames is not shorter than the trajectories ({longest})"
        return out
    n_states = int(max(r.max() for r in d)) + 1
    c1 = _count_model(d, lag, n_states)
    c2 = _count_model(d, 2 * lag, n_states)
    common = np.arange(n_states)
    for _ in range(20):
        s1 = c1.submodel(common).submodel_largest().state_symbols
        s2 = c2.submodel(common).submodel_largest().state_symbols
        new = np.intersect1d(s1, s2)
        if len(new) == len(common):
            break
        common = new
        if len(common) < 2:
            break
    if len(common) < 2:
        out["reason"] = "fewer than 2 states connected at both lag and 2 x lag"
        return out
    m1 = _msm(c1.submodel(common))
    m2 = _msm(c2.submodel(common))
    if not (np.array_equal(m1.count_model.state_symbols, common)
            and np.array_equal(m2.count_model.state_symbols, common)):
        out["reason"] = "could not find a common connected active set"
        return out
    t1 = m1.transition_matrix
    p = t1 @ t1
    e = m2.transition_matrix
    diff = np.abs(np.diag(p) - np.diag(e))
    pi = m1.stationary_distribution
    out.update({
        "max_abs_error": _num(diff.max()),
        "per_state_error": [_num(v) for v in diff],
        "weighted_mean_abs_error": _num((pi * diff).sum()),
        "max_abs_error_matrix": _num(np.abs(p - e).max()),
        "states": [int(s) for s in common],
        "predicted_diagonal": [_num(v) for v in np.diag(p)],
        "estimated_diagonal": [_num(v) for v in np.diag(e)],
    })
    return out


# ----------------------------------------------------------------------------------- strong error
def strong_error(pos_pred, pos_ref, heavy_atoms, phi_quad, psi_quad) -> dict:
    """Strong (pathwise) error per jump index, RMS over replicas.

    pos_pred, pos_ref: (R, K, A, 3) positions (nm) of R replicas after each of K jumps (entry k is
    pos[:, k]); heavy_atoms: indices of the heavy atoms; phi_quad, psi_quad: (4,) atom indices.
    Returns lists over k (length K):

    - ``heavy_rmsd_raw_nm``: sqrt(mean_r RMSD_r^2), RMSD over heavy atoms without superposition;
    - ``heavy_rmsd_aligned_nm``: the same after optimal superposition (Kabsch, internal motion);
    - ``dphi_deg``, ``dpsi_deg``: sqrt(mean_r d_r^2), d the wrapped angle difference in degrees;
    - ``<metric>_se`` beside each: delta-method standard error of the RMS over replicas,
      SE(mean d^2) / (2 RMS), SE(mean d^2) = std(d^2, ddof=1) / sqrt(R) (None when R < 2);

    plus ``jump_index`` (0..K-1) and ``n_replicas``.
    """
    pp = np.asarray(pos_pred, dtype=np.float64)
    pr = np.asarray(pos_ref, dtype=np.float64)
    if pp.shape != pr.shape or pp.ndim != 4:
        raise ValueError(f"need matching (R, K, A, 3) arrays, got {pp.shape} and {pr.shape}")
    R, K = pp.shape[:2]
    h = np.asarray(heavy_atoms, dtype=int)
    sq = {
        "heavy_rmsd_raw_nm": rmsd(pp[:, :, h], pr[:, :, h]) ** 2,
        "heavy_rmsd_aligned_nm": kabsch_rmsd(pp[:, :, h], pr[:, :, h]) ** 2,
        "dphi_deg": np.degrees(angle_difference(dihedral_angles(pp, phi_quad),
                                                dihedral_angles(pr, phi_quad))) ** 2,
        "dpsi_deg": np.degrees(angle_difference(dihedral_angles(pp, psi_quad),
                                                dihedral_angles(pr, psi_quad))) ** 2,
    }
    out: dict = {"jump_index": list(range(K)), "n_replicas": int(R)}
    for name, s in sq.items():  # s: (R, K)
        rms = np.sqrt(s.mean(0))
        out[name] = [_num(v) for v in rms]
        if R >= 2:
            se_ms = s.std(0, ddof=1) / np.sqrt(R)
            with np.errstate(divide="ignore", invalid="ignore"):
                se = np.where(rms > 0, se_ms / (2 * rms), 0.0)
            out[name + "_se"] = [_num(v) for v in se]
        else:
            out[name + "_se"] = [None] * K
    return out
