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


def ibi_refine(table: np.ndarray, sample_counts: Callable[[np.ndarray, int], np.ndarray], c_data: np.ndarray,
               cfg: LandscapeIBIConfig, log: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[dict]]:
    """Iterate :func:`ibi_update`: ``sample_counts(table, iteration)`` returns the sampler's counts
    (K, n) with the landscape ``table`` (K, n) kT in place. Returns the refined table and one record
    per iteration (the counts' JS against the data before that iteration's update; the last record
    measures the final table)."""
    table = np.array(table, dtype=np.float64)
    records = []
    for it in range(cfg.iterations + 1):
        t0 = time.perf_counter()
        c_map = np.asarray(sample_counts(table, it), dtype=np.float64)
        rec = {"iteration": it, "js_end_angle_vs_data": [js_divergence(a, b) for a, b in zip(c_map, c_data)],
               "seconds": time.perf_counter() - t0}
        if it < cfg.iterations:
            step = ibi_update(c_map, c_data, cfg.damping * cfg.damping_decay ** it, cfg.clip_kT, cfg.pseudo_count)
            table += step
            rec["max_change_kT"] = float(np.abs(step).max())
        records.append(rec)
        if log:
            log(f"landscape IBI {it}/{cfg.iterations}: JS(end angle vs data) "
                + " ".join(f"{j:.4f}" for j in rec["js_end_angle_vs_data"]) + f" ({rec['seconds']:.0f} s)")
    return table, records


def end_angle_counts(drive, positions_nm: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """Counts (2, n) of each torsion kind's end angle e = chirality sign * dihedral (the landscape's
    frame) over ``positions_nm`` (M, A, 3), binned to the nearest node of the drive's landscape grid
    (node i at -pi + 2 pi i / n rad); frames with non-finite positions are left out."""
    n = drive.n_landscape
    if not n:
        raise InputError("the map's torsion drive has no landscape (torsion_drive_landscape = 0)")
    kind = drive.kinds.argmax(1).cpu().numpy()
    counts = np.zeros((2, n))
    x_all = np.asarray(positions_nm, dtype=np.float64)
    x_all = x_all[np.isfinite(x_all).all(axis=(1, 2))]  # a stopped rollout's frames are NaN: not counted
    with torch.no_grad():
        for s in range(0, len(x_all), chunk):
            x = torch.as_tensor(x_all[s:s + chunk], device=drive.quads.device)
            e = (drive._chirality(x) * dihedral_and_gradient(x, drive.quads)[0]).cpu().numpy()
            idx = np.round((e + np.pi) / (2 * np.pi) * n).astype(np.int64) % n
            for q, k in enumerate(kind):
                counts[k] += np.bincount(idx[:, q], minlength=n)
    return counts


def refine_landscape(fm, data_positions_nm: np.ndarray, start_states: tuple[np.ndarray, np.ndarray],
                     cfg: LandscapeIBIConfig | None = None, finish=None, progress: bool = True) -> list[dict]:
    """Refine the landscape of ``fm``'s (a :class:`molflow.sampling.FlowMap`) binned torsion drive in
    place against the end-angle marginals of ``data_positions_nm`` (M, A, 3) training frames, with
    free-running rollouts from ``start_states`` (x nm, v nm/ps) at the map's recommended finish (or
    ``finish``). Returns the per-iteration records (:func:`ibi_refine`)."""
    cfg = cfg or LandscapeIBIConfig()
    drive = getattr(fm.model, "drive", None)
    if drive is None or not getattr(drive, "n_landscape", 0):
        raise InputError("refine_landscape needs a map with a binned torsion drive and a landscape")
    tau = float(cfg.tau_ps or fm.tau_max_ps)
    c_data = end_angle_counts(drive, data_positions_nm)
    A = fm.system.n_atoms

    def sample_counts(table: np.ndarray, it: int) -> np.ndarray:
        with torch.no_grad():
            drive.landscape.copy_(torch.as_tensor(table, dtype=drive.landscape.dtype))
        r = fm.sample(start_states, cfg.jumps, tau, replicas=cfg.replicas, seed=cfg.seed + it, finish=finish)
        return end_angle_counts(drive, r["positions"][:, cfg.burn_jumps + 1:].reshape(-1, A, 3))

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None
    table, records = ibi_refine(drive.landscape.detach().cpu().numpy(), sample_counts, c_data, cfg, say)
    with torch.no_grad():
        drive.landscape.copy_(torch.as_tensor(table, dtype=drive.landscape.dtype))
    return records


def records_summary(records: list[dict[str, Any]]) -> str:
    """One line: the end-angle JS against the data before and after the refinement."""
    first, last = records[0]["js_end_angle_vs_data"], records[-1]["js_end_angle_vs_data"]
    return ("end-angle JS vs data " + "/".join(f"{j:.4f}" for j in first) + " -> "
            + "/".join(f"{j:.4f}" for j in last) + f" in {len(records) - 1} iterations")
