"""Refine a binned torsion drive's landscape by iterative Boltzmann inversion (issue 17).

A drive's landscape (:mod:`molflow.models.torsion_drive`) is a potential of mean force (kT) of each
torsion kind's end angle, subtracted from the logits of the turn's bins. :mod:`.drive_fit` fits it
with the rest of the drive by the log-likelihood of *one* jump. Free-running, small one-jump errors
add up: the shipped alanine-dipeptide map (one-jump law close to MD's) visited the sparse region
between alpha_R and beta through psi ~ -120 deg about five times as often as MD does (4 kJ/mol too
low in free energy there), which dominated its 1-D free-energy errors. Iterative Boltzmann inversion
corrects the landscape for the *stationary* law instead, against the training data's own torsion
marginals (never the evaluation reference):

    U <- U + damping_k * clip(smooth(ln p_map(e) - ln p_data(e)), +-clip_kT)

where e is each torsion's end angle in the landscape's frame (the dihedral times the residue's
chirality sign, as the drive reads it), binned on the landscape's grid, p_map from free-running
rollouts of the map with its recommended finish, p_data from the training frames (both with a
pseudo-count per bin), smoothed by a (1/4, 1/2, 1/4) periodic kernel; damping_k = damping *
damping_decay**k (a decay below 1 averages the rollouts' sampling noise over the iterations). Raising the landscape where the
map over-visits lowers the probability of turns that end there. Nothing but the landscape changes;
the one-jump law stays that of the fitted drive elsewhere.

A drive with a **pair landscape** (a residue's joint (phi end, psi end) table applied to psi's turn)
gets, from the same rollouts, the part of the joint log-ratio the marginals do not explain:

    P <- P + damping_k * clip(smooth2(r(phi, psi) - r_phi(phi) - r_psi(psi)), +-clip_kT)

with r = ln p_map - ln p_data on the pair grid and r_phi, r_psi the log-ratios of its marginals
(the 1-D tables take those): psi's law given phi's end then moves by r(phi, psi) - r_phi(phi) in
all, the conditional log-ratio. Measured on alanine dipeptide: README, issue 17.

**Starts.** Rollouts of 0.2 ns are far shorter than alanine dipeptide's alpha_L exchange (about 2
ns), so their histogram reads how the starts' law drifts: a target whose rare basin holds 2.7% of
the law needs starts in that basin in exactly that share, or the binomial noise of a few starts there
moves the table (measured: an overshoot to 8% alpha_L, README, issue 17). ``start_weights`` weigh
each rollout's frames by its start's weight: with :func:`stratified_starts` (a fixed share of starts
in the rare basin, each group drawn by weight, each start weighted by its group's mass over its
number of starts) the weighted starts are the target law without that noise, and the fixed point is
a map that keeps the target law stationary over the rollouts. That fixed point does not pin a flux
the rollouts rarely show: the shipped map, refined so, enters alpha_L about three times as often as
MD (README, issue 17).

:func:`ibi_refine` is the loop on any table and any sampler (tested on an exact toy);
:func:`refine_landscape` runs it on a molecular flow map.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from ..errors import InputError
from ..evaluation.metrics import js_divergence
from ..models.torsion_drive import dihedral_and_gradient


@dataclasses.dataclass
class LandscapeIBIConfig:
    """Settings of :func:`refine_landscape` (defaults: the shipped alanine-dipeptide map's)."""

    iterations: int = 3  # landscape updates (each after one set of rollouts)
    replicas: int = 32  # free-running rollouts per iteration
    jumps: int = 800  # jumps per rollout (at tau_ps)
    burn_jumps: int = 40  # jumps dropped at the start of each rollout
    tau_ps: float | None = None  # None: the map's tau_max
    damping: float = 0.7  # share of the log-ratio applied at the first iteration
    damping_decay: float = 1.0  # iteration k applies damping * damping_decay**k (< 1 averages the
    # rollouts' sampling noise over iterations instead of chasing the last one)
    clip_kT: float = 2.0  # largest change of a node per iteration (kT)
    pseudo_count: float = 0.5  # added to every bin of both histograms
    seed: int = 100  # rollout seeds: seed + iteration


def ibi_update(c_map: np.ndarray, c_data: np.ndarray, damping: float, clip_kT: float,
               pseudo_count: float) -> np.ndarray:
    """The landscape change (kT) for counts ``c_map`` and ``c_data`` (K, n) on the landscape's grid
    (module docstring): damped, clipped, smoothed log-ratio of the two normalised histograms."""
    c_map, c_data = np.asarray(c_map, dtype=np.float64), np.asarray(c_data, dtype=np.float64)
    if c_map.shape != c_data.shape or c_map.ndim != 2:
        raise InputError(f"count tables must both be (kinds, nodes), got {c_map.shape} and {c_data.shape}")
    n = c_map.shape[1]
    pm = (c_map + pseudo_count) / (c_map.sum(1, keepdims=True) + pseudo_count * n)
    pd = (c_data + pseudo_count) / (c_data.sum(1, keepdims=True) + pseudo_count * n)
    d = np.log(pm) - np.log(pd)
    d = 0.25 * np.roll(d, 1, 1) + 0.5 * d + 0.25 * np.roll(d, -1, 1)
    return damping * np.clip(d, -clip_kT, clip_kT)


def _smooth(d: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The periodic (1/4, 1/2, 1/4) kernel along each of ``axes``."""
    for ax in axes:
        d = 0.25 * np.roll(d, 1, ax) + 0.5 * d + 0.25 * np.roll(d, -1, ax)
    return d


def _log_ratio(c_map: np.ndarray, c_data: np.ndarray, pseudo_count: float, axes: tuple[int, ...]) -> np.ndarray:
    """ln p_map - ln p_data of two count tables normalised over ``axes``, pseudo-count per bin."""
    pm, pd = c_map + pseudo_count, c_data + pseudo_count
    return np.log(pm / pm.sum(axes, keepdims=True)) - np.log(pd / pd.sum(axes, keepdims=True))


def ibi_pair_update(c_map: np.ndarray, c_data: np.ndarray, damping: float, clip_kT: float,
                    pseudo_count: float) -> np.ndarray:
    """The pair landscape's change (kT) for joint counts ``c_map`` and ``c_data`` (n, n) of (phi end,
    psi end) on its grid: the damped, clipped, smoothed joint log-ratio less its marginals' (module
    docstring): zero where the log-ratio is the sum of its marginals' (map and data both independent
    in phi and psi, say)."""
    c_map, c_data = np.asarray(c_map, dtype=np.float64), np.asarray(c_data, dtype=np.float64)
    if c_map.shape != c_data.shape or c_map.ndim != 2 or c_map.shape[0] != c_map.shape[1]:
        raise InputError(f"pair count tables must both be (n, n), got {c_map.shape} and {c_data.shape}")
    r = _log_ratio(c_map, c_data, pseudo_count, (0, 1))
    n = c_map.shape[0]  # the marginals carry the pseudo-counts of their n bins each
    r_phi = _log_ratio(c_map.sum(1), c_data.sum(1), pseudo_count * n, (0,))
    r_psi = _log_ratio(c_map.sum(0), c_data.sum(0), pseudo_count * n, (0,))
    return damping * np.clip(_smooth(r - r_phi[:, None] - r_psi[None, :], (0, 1)), -clip_kT, clip_kT)


def ibi_refine(table: np.ndarray, sample_counts: Callable[..., Any], c_data: np.ndarray,
               cfg: LandscapeIBIConfig, log: Callable[[str], None] | None = None,
               pair: np.ndarray | None = None, c_pair_data: np.ndarray | None = None
               ) -> tuple[np.ndarray, list[dict]] | tuple[np.ndarray, np.ndarray, list[dict]]:
    """Iterate :func:`ibi_update`: ``sample_counts(table, iteration)`` returns the sampler's counts
    (K, n) with the landscape ``table`` (K, n) kT in place. Returns the refined table and one record
    per iteration (the counts' JS against the data before that iteration's update; the last record
    measures the final table). With a pair table ``pair`` (m, m) kT and the data's joint counts
    ``c_pair_data``, ``sample_counts(table, pair, iteration)`` returns (counts, joint counts), both
    tables are updated from the same rollouts (:func:`ibi_pair_update`) and (table, pair, records)
    come back."""
    table = np.array(table, dtype=np.float64)
    if pair is not None:
        pair = np.array(pair, dtype=np.float64)
        if c_pair_data is None:
            raise InputError("a pair table needs the data's joint counts (c_pair_data)")
    records = []
    for it in range(cfg.iterations + 1):
        t0 = time.perf_counter()
        c_pair = None
        if pair is None:
            c_map = np.asarray(sample_counts(table, it), dtype=np.float64)
        else:
            c_map, c_pair = (np.asarray(c, dtype=np.float64) for c in sample_counts(table, pair, it))
        rec = {"iteration": it, "js_end_angle_vs_data": [js_divergence(a, b) for a, b in zip(c_map, c_data)],
               "seconds": time.perf_counter() - t0}
        if c_pair is not None:
            rec["js_pair_vs_data"] = js_divergence(c_pair, c_pair_data)
        if it < cfg.iterations:
            damping = cfg.damping * cfg.damping_decay ** it
            step = ibi_update(c_map, c_data, damping, cfg.clip_kT, cfg.pseudo_count)
            table += step
            rec["max_change_kT"] = float(np.abs(step).max())
            if c_pair is not None:
                step = ibi_pair_update(c_pair, c_pair_data, damping, cfg.clip_kT, cfg.pseudo_count)
                pair += step
                rec["max_pair_change_kT"] = float(np.abs(step).max())
        records.append(rec)
        if log:
            log(f"landscape IBI {it}/{cfg.iterations}: JS(end angle vs data) "
                + " ".join(f"{j:.4f}" for j in rec["js_end_angle_vs_data"])
                + (f", joint {rec['js_pair_vs_data']:.4f}" if c_pair is not None else "")
                + f" ({rec['seconds']:.0f} s)")
    return (table, records) if pair is None else (table, pair, records)


def _frames(positions_nm: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Finite frames (a stopped rollout's are NaN: not counted) and their weights, scaled to sum to
    their Kish effective number (so a weighted table counts like that many frames beside the
    pseudo-counts; unweighted: 1 each)."""
    x = np.asarray(positions_nm, dtype=np.float64)
    if weights is None:
        w = np.ones(len(x))
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if len(w) != len(x) or not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise InputError(f"need one finite, non-negative weight per frame ({len(x)}), not {w.shape}")
    ok = np.isfinite(x).all(axis=(1, 2))
    x, w = x[ok], w[ok]
    if weights is not None and w.sum() > 0:
        w = w * (w.sum() / float((w * w).sum()))  # sum = Kish ESS
    return x, w


def end_angles(drive, positions_nm: np.ndarray, weights: np.ndarray | None = None,
               chunk: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Each torsion's end angle e = chirality sign * dihedral (the landscape's frame; rad, (M', Q))
    over the finite frames of ``positions_nm`` (M, A, 3), and their weights (:func:`_frames`)."""
    x_all, w_all = _frames(positions_nm, weights)
    out = [np.zeros((0, drive.quads.shape[0]))]
    with torch.no_grad():
        for s in range(0, len(x_all), chunk):
            x = torch.as_tensor(x_all[s:s + chunk], device=drive.quads.device)
            out.append((drive._chirality(x) * dihedral_and_gradient(x, drive.quads)[0]).cpu().numpy())
    return np.concatenate(out), w_all


def _nearest_node(e: np.ndarray, n: int) -> np.ndarray:
    """Index of the nearest node of an n-node periodic grid (node i at -pi + 2 pi i / n rad)."""
    return np.round((e + np.pi) / (2 * np.pi) * n).astype(np.int64) % n


def _kind_counts(drive, e: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted counts (2, n) of end angles e (M, Q) per torsion kind on the landscape's grid."""
    n = drive.n_landscape
    idx = _nearest_node(e, n)
    counts = np.zeros((2, n))
    for q, k in enumerate(drive.kinds.argmax(1).cpu().numpy()):
        counts[k] += np.bincount(idx[:, q], weights=w, minlength=n)
    return counts


def _pair_counts(drive, e: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted joint counts (m, m) of each residue's (phi, psi) end angles on the pair grid."""
    m = drive.n_pair
    phis = np.flatnonzero(drive.kinds[:, 0].cpu().numpy() > 0.5)
    idx = _nearest_node(e, m)
    counts = np.zeros((m, m))
    for a, b in zip(phis, drive.partners.cpu().numpy()[phis]):
        counts += np.bincount(idx[:, a] * m + idx[:, b], weights=w, minlength=m * m).reshape(m, m)
    return counts


def stratified_starts(weights: np.ndarray, n: int, labels: np.ndarray, shares: dict[int, float],
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` start frames drawn from a weighted pool (``weights`` (M,), e.g. umbrella frames' MBAR
    weights) with a fixed share of starts per label (``labels`` (M,) ints, e.g. 1 for alpha_L;
    ``shares`` {label: share}, the rest of the starts from the other labels; counts by largest
    remainder so they sum to ``n``), each group drawn by weight with systematic resampling. Returns
    (indices (n,), start weights (n,), mean 1): each start weighs its group's share of the pool's
    weight over the group's number of starts, so the weighted starts are the pool's law, a rare basin
    getting its starts without binomial noise (``refine_landscape(..., start_weights=)``)."""
    w = np.asarray(weights, dtype=np.float64)
    lab = np.asarray(labels)
    if w.shape != lab.shape or w.ndim != 1 or not (np.isfinite(w).all() and (w >= 0).all()) or w.sum() <= 0:
        raise InputError("need one finite, non-negative weight (not all zero) and one label per frame")
    rest = np.flatnonzero(~np.isin(lab, list(shares)))
    groups = [np.flatnonzero(lab == k) for k in shares] + [rest]
    want = np.array([*shares.values(), max(0.0, 1.0 - sum(shares.values())) if len(rest) else 0.0])
    want = want / want.sum() * n
    k = np.floor(want).astype(int)
    k[np.argsort(k - want)[:n - k.sum()]] += 1  # largest remainders
    rng = np.random.default_rng(seed)
    idx_out, w_out = [], []
    for idx, m in zip(groups, k):
        if m <= 0:
            if len(idx) and w[idx].sum() > 0:
                raise InputError(f"a group with weight {w[idx].sum() / w.sum():.3g} of the pool got no start; "
                                 "raise n or its share")
            continue
        if len(idx) == 0 or w[idx].sum() <= 0:
            raise InputError(f"no weighted frames to draw {m} starts from (labels {sorted(set(lab.tolist()))})")
        c = np.cumsum(w[idx]) / w[idx].sum()
        idx_out.append(idx[np.minimum(np.searchsorted(c, (rng.uniform() + np.arange(m)) / m), len(idx) - 1)])
        w_out.append(np.full(m, w[idx].sum() / w.sum() / m))
    sw = np.concatenate(w_out)
    return np.concatenate(idx_out), sw / sw.mean()


def end_angle_counts(drive, positions_nm: np.ndarray, chunk: int = 20000,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """Counts (2, n) of each torsion kind's end angle (:func:`end_angles`) over ``positions_nm`` (M, A,
    3), binned to the nearest node of the drive's landscape grid (node i at -pi + 2 pi i / n rad);
    frames with non-finite positions are left out. With ``weights`` (M,) (e.g. umbrella frames'
    unbiasing weights) each frame counts by its weight, the total being the weights' effective number."""
    if not drive.n_landscape:
        raise InputError("the map's torsion drive has no landscape (torsion_drive_landscape = 0)")
    return _kind_counts(drive, *end_angles(drive, positions_nm, weights, chunk))


def pair_counts(drive, positions_nm: np.ndarray, chunk: int = 20000,
                weights: np.ndarray | None = None) -> np.ndarray:
    """Joint counts (m, m) of each residue's (phi end, psi end) angles in the landscape's frame over
    ``positions_nm`` (M, A, 3), binned to the nearest node of the drive's pair grid (node i at
    -pi + 2 pi i / m rad); frames with non-finite positions are left out; ``weights`` as
    :func:`end_angle_counts`."""
    if not getattr(drive, "n_pair", 0):
        raise InputError("the map's torsion drive has no pair landscape (torsion_drive_landscape_pair = 0)")
    return _pair_counts(drive, *end_angles(drive, positions_nm, weights, chunk))


def refine_landscape(fm, data_positions_nm: np.ndarray, start_states: tuple[np.ndarray, np.ndarray],
                     cfg: LandscapeIBIConfig | None = None, finish=None, progress: bool = True,
                     data_weights: np.ndarray | None = None, start_weights: np.ndarray | None = None) -> list[dict]:
    """Refine the landscape of ``fm``'s (a :class:`molflow.sampling.FlowMap`) binned torsion drive in
    place against the end-angle marginals of ``data_positions_nm`` (M, A, 3) training frames, with
    free-running rollouts from ``start_states`` (x nm, v nm/ps) at the map's recommended finish (or
    ``finish``). A drive with a pair landscape has it refined from the same rollouts. ``data_weights``
    (M,) weigh the target frames (biased sampling, e.g. umbrella windows with their MBAR weights).
    ``start_weights`` (S,) weigh each rollout's frames by its start's weight (:func:`stratified_starts`;
    module docstring). Returns the per-iteration records (:func:`ibi_refine`)."""
    cfg = cfg or LandscapeIBIConfig()
    if start_weights is not None:
        sw = np.asarray(start_weights, dtype=np.float64).ravel()
        if len(sw) != len(start_states[0]) or not (np.isfinite(sw).all() and (sw >= 0).all() and sw.sum() > 0):
            raise InputError(f"need one finite, non-negative weight per start state ({len(start_states[0])})")
        if cfg.replicas != len(sw):
            raise InputError(f"start_weights need one rollout per start: replicas {cfg.replicas} != {len(sw)} starts")
    drive = getattr(fm.model, "drive", None)
    if drive is None or not getattr(drive, "n_landscape", 0):
        raise InputError("refine_landscape needs a map with a binned torsion drive and a landscape")
    tau = float(cfg.tau_ps or fm.tau_max_ps)
    e_data, w_data = end_angles(drive, data_positions_nm, data_weights)  # once, for both tables
    c_data = _kind_counts(drive, e_data, w_data)
    A = fm.system.n_atoms

    def rollout(table: np.ndarray, pair: np.ndarray | None, it: int) -> tuple[np.ndarray, np.ndarray]:
        """The rollouts' end angles (M, Q) over their finite frames and the frames' weights."""
        set_tables(table, pair)
        r = fm.sample(start_states, cfg.jumps, tau, replicas=cfg.replicas, seed=cfg.seed + it, finish=finish)
        # one rollout per start (checked above): replica i starts from start state i
        x = r["positions"][:, cfg.burn_jumps + 1:]
        w = None if start_weights is None else np.repeat(sw, x.shape[1])
        return end_angles(drive, x.reshape(-1, A, 3), w)

    def set_tables(table: np.ndarray, pair: np.ndarray | None) -> None:
        with torch.no_grad():
            drive.landscape.copy_(torch.as_tensor(table, dtype=drive.landscape.dtype))
            if pair is not None:
                drive.landscape_pair.copy_(torch.as_tensor(pair, dtype=drive.landscape_pair.dtype))

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None
    table0 = drive.landscape.detach().cpu().numpy()
    if getattr(drive, "n_pair", 0):
        def sample_both(table, pair, it):
            e, w = rollout(table, pair, it)
            return _kind_counts(drive, e, w), _pair_counts(drive, e, w)

        table, pair, records = ibi_refine(table0, sample_both, c_data, cfg, say,
                                          pair=drive.landscape_pair.detach().cpu().numpy(),
                                          c_pair_data=_pair_counts(drive, e_data, w_data))
    else:
        pair = None
        table, records = ibi_refine(table0, lambda t, it: _kind_counts(drive, *rollout(t, None, it)),
                                    c_data, cfg, say)
    set_tables(table, pair)
    return records


def records_summary(records: list[dict[str, Any]]) -> str:
    """One line: the end-angle JS against the data before and after the refinement."""
    first, last = records[0]["js_end_angle_vs_data"], records[-1]["js_end_angle_vs_data"]
    pair = (f", joint {records[0]['js_pair_vs_data']:.4f} -> {records[-1]['js_pair_vs_data']:.4f}"
            if "js_pair_vs_data" in records[0] else "")
    return ("end-angle JS vs data " + "/".join(f"{j:.4f}" for j in first) + " -> "
            + "/".join(f"{j:.4f}" for j in last) + pair + f" in {len(records) - 1} iterations")
