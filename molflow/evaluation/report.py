"""``molflow evaluate``: judge a sampled (or MD) run against long reference MD, files in, report out.

    >>> molflow.evaluate("ref.h5", "samples.h5", "report/")

Writes ``report/metrics.json`` (nested, snake_case, units in names), ``report/report.md`` and PNG
figures. Conventions (DESIGN.md section 7) are stated in both, with the dihedral atoms actually used.

**Rows, and what each is judged against.** The reference is split once (``reference_split`` in
metrics.json, stated in report.md): with two or more replicas, whole replicas are held out — H the
first R // 2 evaluated replicas, the judge J the others; with one replica (fallback) H is its first
and J its second time half, independent only as far as each half is much longer than the slowest
correlation time. Every row's stationary metrics are taken against the same J, so the rows are
comparable and none contains the data it is judged against:

- the main row: the samples against J (J, not the whole reference: judged against more data than
  the calibration rows, the sampler would get a less noisy judge than they do);
- ``equal_cost``: the first frames of H holding the simulated time the reference engine made in
  the sampler's wall-clock (spread over H's replicas; all of H when the wall-clock buys more, and
  then the row equals the noise floor), against J;
- ``noise_floor``: all of H against J.

``stationary_vs_whole_reference`` gives the samples against the whole reference, for information
(not comparable with the two calibration rows). Kinetics are reported side by side, not as a
distance: the main row's ``kinetics.reference`` is the whole reference, the calibration rows' is J.
``js_phi_psi_se`` is a delete-one-block jackknife standard error (time blocks). A samples file that did not finish (every
replica stopped by the sampler's guard, or fewer frames than planned) is flagged at the top of
report.md and in ``run_status`` (``reference_run_status`` for the reference); its counts and the
evaluated replicas x frames come from the same arrays (:func:`run_status`). A number the data
cannot estimate is ``null`` with its reason beside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..trajectory import Trajectory
from ..units import kinetic_temperature
from . import metrics as M
from .dihedrals import dihedral_angles

MAX_STRUCTURE_FRAMES = 4000  # frames (over all replicas) used for bond/energy distributions
CONVENTIONS = {
    "dihedrals": "central residue phi/psi from the topology (alanine dipeptide: (4,6,8,14), (6,8,14,16), 0-based)",
    "js": "Jensen-Shannon divergence of (phi, psi), 64x64 bins on [-pi, pi]^2, natural log, divergence not root; "
          "js_phi_psi_se: delete-one-block jackknife standard error (about 20 contiguous time blocks per "
          "run, both runs; conservative for independent blocks, optimistic where a block is not much longer than "
          "the slowest correlation time)",
    "free_energy": "F = -kT ln p on the same grid; RMSE (kJ/mol) over bins populated in the reference after "
                   "removing the best constant offset",
    "kinetics": "core-set transitions of phi (beta/alphaR core -150..-30 deg <-> alphaL/C7ax core 30..100 deg) "
                "with hysteresis; MSM implied timescales on a 6x6 (phi, psi) grid at lags that are multiples of the "
                "samples' tau (frame interval for MD); Chapman-Kolmogorov: one 2tau estimate vs two tau steps",
    "rows": "the reference is split into a held-out part H and a judge part J (see reference_split); every row's "
            "stationary metrics are taken against J: samples vs J; equal_cost = the first frames of H holding the "
            "simulated time the reference engine made in the sampler's wall-clock, vs J; noise_floor = all of H vs J",
}


def conventions(system) -> dict[str, str]:
    """:data:`CONVENTIONS`, with the dihedral atoms actually used for ``system`` named."""
    phi_q, psi_q = system.central_dihedrals()
    atoms = list(system.topology.atoms())

    def name(q):
        return "-".join(f"{atoms[i].residue.name}{atoms[i].residue.index + 1}:{atoms[i].name}" for i in q)

    res = atoms[int(phi_q[2])].residue
    return {**CONVENTIONS, "dihedrals": (
        f"central residue {res.name}{res.index + 1} of {system.name} from the topology: phi = atoms "
        f"{tuple(int(i) for i in phi_q)} ({name(phi_q)}), psi = atoms {tuple(int(i) for i in psi_q)} "
        f"({name(psi_q)}), 0-based")}


@dataclasses.dataclass
class RunData:
    """What the evaluator needs from one run (angles radians, times ps)."""

    label: str
    phi: np.ndarray  # (R, F)
    psi: np.ndarray
    dt_ps: float
    positions: np.ndarray  # (R, S, A, 3) strided frame subsample for structure/energy distributions
    energies: np.ndarray | None  # (R, S)
    struct_frames: np.ndarray  # (S,) frame index of each subsampled frame
    attrs: dict[str, Any]
    t_kin: np.ndarray | None = None  # (R, S) kinetic temperature (K) of the subsampled frames
    weights: np.ndarray | None = None

    @property
    def simulated_ns(self) -> float:
        return self.phi.shape[0] * max(self.phi.shape[1] - 1, 0) * self.dt_ps / 1000.0

    @property
    def structure_positions(self) -> np.ndarray:
        return self.positions.reshape(-1, *self.positions.shape[2:])

    @property
    def structure_energies(self) -> np.ndarray | None:
        return None if self.energies is None else self.energies.reshape(-1)

    def subset(self, replicas: slice | None = None, frames: slice | None = None, label: str | None = None) -> "RunData":
        """Some replicas and/or a frame range (its structure subsample follows along)."""
        r = slice(None) if replicas is None else replicas
        f = slice(None) if frames is None else frames
        start, stop, _ = f.indices(self.phi.shape[1])
        keep = (self.struct_frames >= start) & (self.struct_frames < stop)
        if not keep.any():  # a very short piece: take its first frame from the trajectory subsample
            keep = self.struct_frames == self.struct_frames[self.struct_frames <= start].max()
        return dataclasses.replace(
            self, label=label or self.label, phi=self.phi[r, f], psi=self.psi[r, f],
            positions=self.positions[r][:, keep], struct_frames=self.struct_frames[keep] - start,
            energies=None if self.energies is None else self.energies[r][:, keep],
            t_kin=None if self.t_kin is None else self.t_kin[r][:, keep])


def load_run(path: str | os.PathLike, system, label: str) -> RunData:
    """φ/ψ of every frame (read chunk by chunk) and a structure subsample of a run file."""
    phi_q, psi_q = system.central_dihedrals()
    with Trajectory(path) as t:
        if t.n_frames < 2:
            raise InputError(f"{path} has {t.n_frames} frame(s); evaluation needs trajectories")
        phis, psis = [], []
        for _, chunk in t.iter_chunks(2000):
            x = chunk["positions"]
            phis.append(dihedral_angles(x, phi_q))
            psis.append(dihedral_angles(x, psi_q))
        stride = max(1, int(np.ceil(t.n_replicas * t.n_frames / MAX_STRUCTURE_FRAMES)))
        idx = np.arange(0, t.n_frames, stride)
        pos = np.asarray(t.positions[:, idx])
        energies = np.asarray(t.potential_energy[:, idx]) if t.potential_energy is not None else None
        t_kin = kinetic_temperature(np.asarray(t.velocities[:, idx], dtype=np.float64), system.masses_amu)
        attrs = t.attrs
        dt = t.frame_interval_ps
    phi, psi = np.concatenate(phis, 1), np.concatenate(psis, 1)
    status = run_status(phi, psi, attrs, dt)
    keep = np.asarray(status["replicas_evaluated"], dtype=int)
    n = status["n_frames_evaluated"]
    if len(keep) == 0 or n < 2:
        raise InputError(f"{path}: {status['note']}; nothing to evaluate")
    if status["note"]:
        attrs["evaluation_note"] = status["note"]
    attrs["run_status"] = status
    if len(keep) < len(phi) or n < phi.shape[1]:
        sel = idx < n
        phi, psi = phi[keep, :n], psi[keep, :n]
        idx, pos, t_kin = idx[sel], pos[keep][:, sel], t_kin[keep][:, sel]
        energies = None if energies is None else energies[keep][:, sel]
    if energies is None:  # sampled runs carry no energies: recompute them with OpenMM
        energies = _energies(system, pos)
    return RunData(label, phi, psi, dt, pos, energies, idx, attrs, t_kin)


def run_status(phi: np.ndarray, psi: np.ndarray, attrs: dict[str, Any], dt_ps: float) -> dict[str, Any]:
    """Whether a run file is complete, and which replicas x frames are evaluated (one set of arrays).

    ``phi``, ``psi`` (R, F) as read from the file; ``attrs`` the file's attributes (a sampler's
    ``n_jumps_requested``, ``stopped_at_jump``; MD's ``time_ps_requested``). Every count in the
    returned dict and in its ``note`` comes from the same arrays: ``first_nonfinite`` (per replica,
    the first frame with a non-finite angle, F when none) decides what is evaluated — the replicas
    complete over the frames present, or, when none is, every replica up to the first non-finite
    frame of any — and ``stopped_at_jump`` (1-based jump, -1 never) says which replicas the
    sampler's guard stopped (one stopped at jump j has frames 0..j-1; the frame of the jump that
    stopped the last replica is never written, so that replica can be complete over the frames
    present). ``status``: ``complete``; ``replicas_stopped`` (some replicas stopped, the run
    finished); ``incomplete`` (fewer frames than planned: killed, resumable); ``aborted`` (every
    replica stopped: the sampler ended the run).
    """
    R, F = phi.shape
    finite = np.isfinite(phi) & np.isfinite(psi)
    first_bad = np.where(finite.all(1), F, np.argmin(finite, axis=1))
    raw = attrs.get("stopped_at_jump")
    stopped_at = np.asarray([-1] * R if raw is None else raw, dtype=np.int64).reshape(-1)
    if stopped_at.shape != (R,):
        stopped_at = np.full(R, -1, dtype=np.int64)
    stopped = stopped_at >= 0
    planned_jumps = attrs.get("n_jumps_requested")
    if planned_jumps is None and attrs.get("time_ps_requested") and dt_ps > 0:
        planned_jumps = int(round(float(attrs["time_ps_requested"]) / dt_ps))
    planned_jumps = None if planned_jumps is None else int(planned_jumps)
    whole = first_bad == F
    if whole.any():
        keep, n = np.nonzero(whole)[0], F
    else:
        keep, n = np.arange(R), int(first_bad.min())
    if stopped.all() and R > 0:
        state = "aborted"
    elif planned_jumps is not None and F - 1 < planned_jumps:
        state = "incomplete"
    elif stopped.any() or not whole.all():
        state = "replicas_stopped"
    else:
        state = "complete"
    parts = []
    if state == "aborted":
        parts.append(f"ABORTED RUN: the sampler's guard stopped every replica ({int(stopped.sum())} of {R}), "
                     f"the last at jump {int(stopped_at.max())}")
    elif stopped.any():
        parts.append(f"{int(stopped.sum())} of {R} replicas stopped by the sampler's guard")
    if planned_jumps is not None and F - 1 < planned_jumps:
        parts.append(f"the file holds {F} frames ({F - 1} of the {planned_jumps} jumps/intervals planned)")
    if stopped.any():
        parts.append("stopped at jump " + ", ".join(f"{int(j)} (replica {i})" for i, j in enumerate(stopped_at) if j >= 0))
    late = stopped & (stopped_at >= F)
    if late.any():
        parts.append(f"{int(late.sum())} stopped replica(s) stopped at a jump whose frame was never written, so "
                     "they are complete over the frames present")
    left = R - len(keep)
    if left or n < F:
        what = f"{left} replica(s) with non-finite frames left out" if left else \
            f"every replica has non-finite frames: frames 0..{n - 1} are used"
        parts.append(what)
    note = ""
    if parts or state != "complete":
        note = "; ".join(parts) + f". Evaluated: {len(keep)} replica(s) x {n} frames"
    return {"status": state, "n_replicas": R, "n_frames": F, "n_jumps_present": F - 1,
            "n_jumps_planned": planned_jumps, "n_stopped": int(stopped.sum()),
            "stopped_at_jump": stopped_at.tolist(), "first_nonfinite_frame": first_bad.tolist(),
            "replicas_evaluated": keep.tolist(), "n_replicas_evaluated": int(len(keep)),
            "n_frames_evaluated": int(n), "note": note}


def _energies(system, positions: np.ndarray) -> np.ndarray:
    """Single-molecule NoCutoff potential energies (kJ/mol) of (R, S, A, 3) positions; non-finite
    structures get NaN."""
    from ..md.engine import EnergyEvaluator

    ev = EnergyEvaluator(system, "Reference")
    flat = positions.reshape(-1, *positions.shape[2:]).astype(np.float64)
    out = np.array([ev(x) if np.isfinite(x).all() else np.nan for x in flat])
    return out.reshape(positions.shape[:2])


def _stationary(ref: RunData, cand: RunData, system) -> dict[str, Any]:
    kT = system.kT_kj_mol
    n = cand.phi.size
    p_ref = M.phi_psi_histogram(ref.phi.ravel(), ref.psi.ravel())
    p = M.phi_psi_histogram(cand.phi.ravel(), cand.psi.ravel())
    out = {
        "js_phi_psi": M.js_divergence(p_ref, p),
        "js_phi_psi_se": M.js_block_jackknife_se(M.phi_psi_block_histograms(ref.phi, ref.psi),
                                                 M.phi_psi_block_histograms(cand.phi, cand.psi)),
        "fes_rmse_kj_mol": {"phi": M.fes_rmse_1d(ref.phi.ravel(), cand.phi.ravel(), kT),
                            "psi": M.fes_rmse_1d(ref.psi.ravel(), cand.psi.ravel(), kT),
                            "phi_psi": M.fes_rmse(p_ref, p, kT, n_samples=n)},
        "basin_populations": {"reference": M.basin_populations(ref.phi, ref.psi),
                              "samples": M.basin_populations(cand.phi, cand.psi)},
        "bond_w1_nm": M.bond_length_w1(ref.structure_positions, cand.structure_positions, system.bonds),
        "spread_ratios": M.spread_ratios(ref.structure_positions, cand.structure_positions, system.bonds,
                                         system.angles),
    }
    if ref.energies is not None and cand.energies is not None:
        out["energy_w1_kj_mol"] = M.wasserstein_1d(ref.structure_energies, cand.structure_energies)
    else:
        out["energy_w1_kj_mol"] = None
        out["energy_w1_kj_mol_reason"] = "no potential energies recorded in one of the files"
    # on-step velocities: BAOAB's reference runs read ~2% below the thermostat at 1 fs (DESIGN.md 7)
    out["kinetic_temperature_k"] = {"reference": _mean(ref.t_kin), "samples": _mean(cand.t_kin),
                                    "target": system.temperature_K}
    return out


def _mean(a: np.ndarray | None) -> float | None:
    if a is None or not np.isfinite(a).any():
        return None
    return float(np.nanmean(a))


def _lags(dt_ps: float, tau_ps: float, n_frames: int) -> list[int]:
    """Lags in frames of a run with frame interval dt_ps: multiples 1, 2, 4, ... of tau_ps."""
    base = max(1, int(round(tau_ps / dt_ps)))
    return [base * m for m in (1, 2, 4, 8, 16) if base * m < n_frames // 2]


def _kinetics(run: RunData, tau_ps: float) -> dict[str, Any]:
    states = M.phi_core_states(run.phi)
    out: dict[str, Any] = dict(M.transition_kinetics(states, run.dt_ps))
    max_lag = min(run.phi.shape[1] - 1, max(1, int(round(20.0 / run.dt_ps))))  # up to 20 ps
    out["autocorr_phi"] = {"lag_ps": (np.arange(max_lag + 1) * run.dt_ps).tolist(),
                           "value": M.autocorrelation(run.phi, max_lag).tolist()}
    out["autocorr_psi"] = {"lag_ps": (np.arange(max_lag + 1) * run.dt_ps).tolist(),
                           "value": M.autocorrelation(run.psi, max_lag).tolist()}
    lags = _lags(run.dt_ps, tau_ps, run.phi.shape[1])
    dtrajs = M.discretise(run.phi, run.psi)
    if lags:
        out["implied_timescale_ns"] = M.implied_timescales(dtrajs, lags, run.dt_ps)
        out["ck_test"] = M.ck_test(dtrajs, lags[0], run.dt_ps)
    else:
        reason = f"trajectories too short for a lag of {tau_ps:g} ps"
        out["implied_timescale_ns"] = {"value": None, "reason": reason}
        out["ck_test"] = {"value": None, "reason": reason}
    return out


def _cost(run: RunData) -> dict[str, Any]:
    wall = run.attrs.get("wall_clock_s")
    if not wall:
        return {"ns_per_wall_s": None, "ess_per_s_phi": None, "reason": "no wall_clock_s attribute in the file"}
    ess = M.effective_sample_size(run.phi, run.dt_ps)
    return {"ns_per_wall_s": run.simulated_ns / wall, "ess_per_s_phi": ess / wall, "wall_clock_s": wall,
            "simulated_ns": run.simulated_ns, "hardware": run.attrs.get("hardware")}


def _row(judge: RunData, cand: RunData, system, tau_ps: float, whole: RunData | None = None,
         judge_kinetics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stationary metrics of ``cand`` against ``judge``; kinetics of both side by side; cost of the
    whole reference (``whole``, default ``judge``) and of ``cand``."""
    return {"stationary": _stationary(judge, cand, system),
            "kinetics": {"reference": judge_kinetics if judge_kinetics is not None else _kinetics(judge, tau_ps),
                         "samples": _kinetics(cand, tau_ps)},
            "cost": {"reference": _cost(whole if whole is not None else judge), "samples": _cost(cand)}}


def _pathwise(reference, samples, ref: RunData, smp: RunData, system, tau_ps: float) -> dict[str, Any]:
    """Strong error vs number of jumps, when the samples were driven by this reference's own path."""
    if not smp.attrs.get("pathwise"):
        return {"value": None, "reason": "samples are free-running (no --pathwise run of this reference)"}
    if smp.attrs.get("brownian_from_seed") != ref.attrs.get("seed") or \
            smp.attrs.get("fingerprint") != ref.attrs.get("fingerprint"):
        return {"value": None, "reason": "samples were driven by another run's path (seeds differ)"}
    m = int(round(tau_ps / ref.dt_ps))
    with Trajectory(samples) as s, Trajectory(reference) as r:
        R = min(s.n_replicas, r.n_replicas)
        K = min(s.n_frames - 1, (r.n_frames - 1) // m)
        if K < 1 or abs(m * ref.dt_ps - tau_ps) > 1e-9:
            return {"value": None, "reason": "no jump of the samples lines up with reference frames"}
        pred = np.asarray(s.positions[:R, 1:K + 1])
        true = np.asarray(r.positions[:R, m: m * K + 1: m])
    whole = np.isfinite(pred).all(axis=(1, 2, 3))  # replicas the sampler's guard stopped are left out
    if not whole.any():
        return {"value": None, "reason": "every pathwise replica was stopped by the sampler's explosion guard"}
    pred, true = pred[whole], true[whole]
    phi_q, psi_q = system.central_dihedrals()
    err = M.strong_error(pred, true, system.heavy_atoms, phi_q, psi_q)
    out: dict[str, Any] = {"jumps": [k + 1 for k in err["jump_index"]], "time_ps": [(k + 1) * tau_ps for k in err["jump_index"]],
                           "n_replicas": err["n_replicas"], "mode": smp.attrs.get("mode")}
    for key, val in err.items():
        if key not in ("jump_index", "n_replicas"):
            out[f"strong_error_{key}"] = val
    out["note"] = ("compare with the floor of a map fed the same N coefficients (`molflow floor`, DESIGN.md 3.1): "
                   "beyond the floor's tau the path no longer pins the motion and the error saturates at the "
                   "spread of the conditional law")
    return out


@dataclasses.dataclass
class ReferenceSplit:
    """The reference cut into a held-out part (for the equal-cost and noise-floor rows) and a judge."""

    held_out: RunData
    judge: RunData
    construction: str  # "replicas" or "time_halves"
    description: str

    def describe(self) -> dict[str, Any]:
        return {"construction": self.construction, "description": self.description,
                "held_out": {"n_replicas": self.held_out.phi.shape[0], "n_frames": self.held_out.phi.shape[1],
                             "simulated_ns": self.held_out.simulated_ns},
                "judge": {"n_replicas": self.judge.phi.shape[0], "n_frames": self.judge.phi.shape[1],
                          "simulated_ns": self.judge.simulated_ns}}


def split_reference(ref: RunData) -> ReferenceSplit:
    """Whole replicas held out when there are >= 2 (the first R // 2 are H, the others the judge J);
    with one replica, time halves (H the first half, J the second: independent only as far as the
    halves are much longer than the slowest correlation time)."""
    R, F = ref.phi.shape
    if R >= 2:
        h = R // 2
        return ReferenceSplit(
            ref.subset(slice(0, h), label="reference, held-out replicas"),
            ref.subset(slice(h, R), label="reference, judge replicas"), "replicas",
            f"independent replicas: held out H = evaluated replicas 0..{h - 1} ({h} of {R}), judge J = replicas "
            f"{h}..{R - 1} ({R - h})")
    h = F // 2
    return ReferenceSplit(
        ref.subset(frames=slice(0, h), label="reference, first half"),
        ref.subset(frames=slice(h, F), label="reference, second half"), "time_halves",
        f"one replica, so time halves (fallback): held out H = frames 0..{h - 1}, judge J = frames {h}..{F - 1}; "
        "the halves are independent only where each is much longer than the slowest correlation time")


def _equal_cost(ref: RunData, samples: RunData, split: ReferenceSplit) -> tuple[RunData | None, str]:
    """The first frames of the held-out replicas holding the simulated time the reference engine made in
    the sampler's wall-clock (spread over H's replicas), or None with the reason."""
    w_ref, w_s = ref.attrs.get("wall_clock_s"), samples.attrs.get("wall_clock_s")
    if not w_ref or not w_s:
        return None, "no wall_clock_s attribute in one of the files"
    ns = ref.simulated_ns / w_ref * w_s  # what the reference engine made in the sampler's wall-clock
    held = split.held_out
    R, F = held.phi.shape
    frames = int(ns * 1000.0 / (R * held.dt_ps)) + 1
    notes = []
    if ref.attrs.get("hardware") != samples.attrs.get("hardware"):
        notes.append(f"different hardware: reference on {ref.attrs.get('hardware')}, samples on "
                     f"{samples.attrs.get('hardware')}")
    if frames < 2:
        return None, " ".join([f"the sampler's wall-clock buys less than one reference frame ({ns:.3g} ns)."] + notes)
    if frames >= F:
        notes.insert(0, f"the sampler's wall-clock buys {ns:.3g} ns, at least all of the held-out part "
                        f"({held.simulated_ns:.3g} ns): this row uses all of it and equals the noise floor")
    n = min(frames, F)
    short = held.subset(frames=slice(0, n), label=f"held-out reference, first {n} frames")
    return short, "; ".join([f"first {n} frames of the held-out part ({R} x {n} frames, "
                             f"{short.simulated_ns:.3g} ns) against the judge part"] + notes)


def evaluate(reference: str | os.PathLike, samples: str | os.PathLike, report: str | os.PathLike,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``samples`` against ``reference``; write metrics.json, report.md and figures in ``report``.

    i.i.d. conformations (``molflow sample-boltzmann``'s conf.h5) go to :func:`evaluate_iid`."""
    from .figures import evaluation_figures

    if is_iid_samples(samples):
        return evaluate_iid(reference, samples, report, progress)

    out_dir = Path(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    with Trajectory(reference) as t:
        system = t.system()
        fp_ref = t.attrs.get("fingerprint")
    with Trajectory(samples) as t:
        if t.attrs.get("fingerprint") not in (None, fp_ref):
            raise InputError(f"{samples} and {reference} are different systems (fingerprints differ)")
    ref = load_run(reference, system, "reference")
    smp = load_run(samples, system, "samples")
    tau_ps = float(smp.attrs.get("tau_ps") or smp.dt_ps)
    split = split_reference(ref)
    result: dict[str, Any] = {"conventions": conventions(system), "system": system.name, "tau_ps": tau_ps,
                              "reference": _describe(reference, ref), "samples": _describe(samples, smp),
                              "run_status": smp.attrs.get("run_status"),
                              "reference_run_status": ref.attrs.get("run_status"),
                              "reference_split": split.describe()}
    judge_kin = _kinetics(split.judge, tau_ps)
    # kinetics are shown side by side, not as a distance: the main row shows the whole reference's
    main = _row(split.judge, smp, system, tau_ps, whole=ref, judge_kinetics=_kinetics(ref, tau_ps))
    result.update(main)
    # for information only: against the whole reference (not comparable with the two rows below)
    result["stationary_vs_whole_reference"] = _stationary(ref, smp, system)
    result["pathwise"] = _pathwise(reference, samples, ref, smp, system, tau_ps)
    short, note = _equal_cost(ref, smp, split)
    if short is None:
        result["equal_cost"] = {"value": None, "reason": note}
    else:
        result["equal_cost"] = {**_row(split.judge, short, system, tau_ps, whole=ref, judge_kinetics=judge_kin),
                                "note": note, "frames": short.phi.shape[1], "n_replicas": short.phi.shape[0],
                                "simulated_ns": short.simulated_ns, "construction": split.construction}
    result["noise_floor"] = {**_row(split.judge, split.held_out, system, tau_ps, whole=ref, judge_kinetics=judge_kin),
                             "construction": split.construction, "note": split.description}
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(result), indent=2))
    figures = evaluation_figures(ref, smp, result, system, out_dir)
    (out_dir / "report.md").write_text(_markdown(result, figures))
    return result


def _describe(path, run: RunData) -> dict[str, Any]:
    out = {"path": str(path), "n_replicas": run.phi.shape[0], "n_frames": run.phi.shape[1],
           "frame_interval_ps": run.dt_ps, "simulated_ns": run.simulated_ns,
           "kind": run.attrs.get("kind", "reference_md"), "hardware": run.attrs.get("hardware")}
    for key in ("mode", "pathwise", "n_restarts", "n_stopped", "evaluation_note"):
        if key in run.attrs:
            out[key] = run.attrs[key]
    st = run.attrs.get("run_status")
    if st:  # the counts of the note and of the rows come from the same arrays
        out["n_stopped"] = st["n_stopped"]
        out.update(status=st["status"], n_replicas_in_file=st["n_replicas"], n_frames_in_file=st["n_frames"],
                   n_jumps_planned=st["n_jumps_planned"])
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _status_banner(st: dict[str, Any] | None, what: str) -> list[str]:
    """The lines at the top of report.md for a run that is not complete (empty when it is)."""
    if not st or st.get("status") == "complete":
        return []
    head = {"aborted": "**WARNING: aborted run.**", "incomplete": "**WARNING: incomplete run.**",
            "replicas_stopped": "**Note: some replicas stopped.**"}[st["status"]]
    return [f"> {head} {what}: {st['note']}.", ""]


def _split_lines(r: dict[str, Any]) -> list[str]:
    sp = r["reference_split"]
    return [f"Rows: every row is judged against the same part J of the reference. Construction: **{sp['construction']}** "
            f"— {sp['description']}. Equal cost = the first frames of H holding the simulated time the reference "
            "engine made in the sampler's wall-clock; noise floor = all of H against J. Neither row contains data "
            "it is judged against. For information, the samples against the whole reference: JS(φ,ψ) "
            f"{_fmt(r.get('stationary_vs_whole_reference', {}).get('js_phi_psi'))} (not comparable with the rows "
            "below, whose judge is J).", ""]


def _markdown(r: dict[str, Any], figures: list[Path]) -> str:
    rows = [("samples vs J", r), ("equal-cost MD (held-out prefix) vs J", r["equal_cost"]),
            ("noise floor (H vs J)", r["noise_floor"])]
    lines = [f"# molflow evaluation: {r['system']}", ""]
    lines += _status_banner(r.get("run_status"), "samples")
    lines += _status_banner(r.get("reference_run_status"), "reference")
    lines += [f"Reference: `{r['reference']['path']}` ({r['reference']['n_replicas']} replicas x "
              f"{r['reference']['n_frames']} frames evaluated, {r['reference']['simulated_ns']:.3g} ns). Samples: "
              f"`{r['samples']['path']}` ({r['samples']['n_replicas']} replicas x {r['samples']['n_frames']} frames "
              f"evaluated, tau = {r['tau_ps']:g} ps).", ""]
    lines += _split_lines(r)
    smp = r["samples"]
    if smp.get("kind") == "flowmap_samples":
        lines += [f"Sampler: {smp.get('mode')} mode, {'pathwise' if smp.get('pathwise') else 'free-running'}; "
                  f"guard restarts {smp.get('n_restarts', 0)}, replicas stopped {smp.get('n_stopped', 0)} of "
                  f"{smp.get('n_replicas_in_file', smp['n_replicas'])}.", ""]
    lines += ["## Conventions", ""]
    lines += [f"- **{k}**: {v}" for k, v in r["conventions"].items()]
    lines += ["", "## Stationary", "", "| row | JS(φ,ψ) | FES RMSE φ | FES RMSE ψ | FES RMSE 2-D | bond W1 (nm) | "
              "energy W1 (kJ/mol) | T_kin samples (K) |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows:
        s = row.get("stationary")
        if not s:
            lines.append(f"| {name} | {row.get('reason', 'n/a')} | | | | | |")
            continue
        f = s["fes_rmse_kj_mol"]
        lines.append(f"| {name} | {_fmt(s['js_phi_psi'])} ± {_fmt(s.get('js_phi_psi_se'), 2)} | {_fmt(f['phi'])} | "
                     f"{_fmt(f['psi'])} | {_fmt(f['phi_psi'])} | "
                     f"{_fmt(s['bond_w1_nm'])} | {_fmt(s['energy_w1_kj_mol'])} | "
                     f"{_fmt(s['kinetic_temperature_k']['samples'], 4)} |")
    sp = r["stationary"].get("spread_ratios") or {}
    if sp.get("n_bonds"):
        lines += ["", f"Bond and angle spreads, std(samples) / std(judge): bonds median {_fmt(sp['bond_ratio_median'])}, "
                  f"range {_fmt(sp['bond_ratio_min'])}–{_fmt(sp['bond_ratio_max'])} ({sp['bonds_within_10pct']} of "
                  f"{sp['n_bonds']} within 10%); angles median {_fmt(sp['angle_ratio_median'])}, range "
                  f"{_fmt(sp['angle_ratio_min'])}–{_fmt(sp['angle_ratio_max'])} ({sp['angles_within_10pct']} of "
                  f"{sp['n_angles']} within 10%). Ratios above 1: bonds too loose (strained molecule)."]
    tk = r["stationary"]["kinetic_temperature_k"]
    lines += ["", f"Kinetic temperature (on-step velocities): reference {_fmt(tk['reference'], 4)} K, samples "
              f"{_fmt(tk['samples'], 4)} K, thermostat {_fmt(tk['target'], 4)} K (BAOAB's on-step velocities "
              "of the reference read about 2% cool at 1 fs)."]
    lines += ["", "## Kinetics (φ core sets)", "", "| run | rate β/αR→αL (1/ns) | rate αL→β/αR (1/ns) | MFPT β/αR→αL (ns) | MFPT αL→β/αR (ns) |",
              "|---|---|---|---|---|"]
    for name, k in (("reference", r["kinetics"]["reference"]), ("samples", r["kinetics"]["samples"])):
        lines.append(f"| {name} | {_fmt(k.get('rate_neg_to_pos_per_ns'))} | {_fmt(k.get('rate_pos_to_neg_per_ns'))} | "
                     f"{_fmt(k.get('mfpt_neg_to_pos_ns'))} | {_fmt(k.get('mfpt_pos_to_neg_ns'))} |")
    reason = r["kinetics"]["samples"].get("reason")
    if reason:
        lines += ["", f"Note: {reason}"]
    pw = r["pathwise"]
    lines += ["", "## Pathwise (samples driven by the reference's recorded path)", ""]
    if pw.get("jumps"):
        lines += ["| jumps | time (ps) | heavy RMSD raw (nm) | heavy RMSD aligned (nm) | Δφ (deg) | Δψ (deg) |",
                  "|---|---|---|---|---|---|"]
        show = sorted({0, 1, 2, 4, 9, 19, 49, 99, len(pw["jumps"]) - 1} & set(range(len(pw["jumps"]))))
        for i in show:
            lines.append(f"| {pw['jumps'][i]} | {pw['time_ps'][i]:g} | {_fmt(pw['strong_error_heavy_rmsd_raw_nm'][i])} | "
                         f"{_fmt(pw['strong_error_heavy_rmsd_aligned_nm'][i])} | {_fmt(pw['strong_error_dphi_deg'][i])} | "
                         f"{_fmt(pw['strong_error_dpsi_deg'][i])} |")
        lines += ["", pw["note"]]
    else:
        lines.append(pw.get("reason", "n/a"))
    c = r["cost"]
    lines += ["", "## Cost", "", f"- reference: {_fmt(c['reference'].get('ns_per_wall_s'))} ns per wall-clock s, "
              f"ESS(φ) per s {_fmt(c['reference'].get('ess_per_s_phi'))} ({c['reference'].get('hardware')})",
              f"- samples: {_fmt(c['samples'].get('ns_per_wall_s'))} ns per wall-clock s, ESS(φ) per s "
              f"{_fmt(c['samples'].get('ess_per_s_phi'))} ({c['samples'].get('hardware')})"]
    if r["equal_cost"].get("note"):
        lines.append(f"- equal cost: {r['equal_cost']['note']}")
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- i.i.d. samples (#5)
IID_KIND = "boltzmann_samples"


def is_iid_samples(path: str | os.PathLike) -> bool:
    """True for a file of i.i.d. conformations (``molflow sample-boltzmann``'s conf.h5)."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return f.attrs.get("kind") == IID_KIND
    except OSError:
        return False


def _read_iid(path) -> dict[str, Any]:
    import h5py

    from ..trajectory import plain_attr

    with h5py.File(path, "r", locking=False) as f:
        out = {k: np.asarray(f[k]) for k in ("positions", "potential_energy", "weights", "log_weights",
                                             "chirality_ok") if k in f}
        out["attrs"] = {k: plain_attr(v) for k, v in f.attrs.items()}
    return out


def _stationary_iid(ref: RunData, phi: np.ndarray, psi: np.ndarray, pos: np.ndarray, energies: np.ndarray | None,
                    weights: np.ndarray | None, system) -> dict[str, Any]:
    """The stationary metrics of i.i.d. samples (optionally weighted) against the reference."""
    kT = system.kT_kj_mol
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    p_ref = M.phi_psi_histogram(ref.phi.ravel(), ref.psi.ravel())
    out = {
        "js_phi_psi": M.js_divergence(p_ref, M.phi_psi_histogram(phi, psi, w)),
        "js_phi_psi_se": None if w is not None else M.js_block_jackknife_se(
            M.phi_psi_block_histograms(ref.phi, ref.psi), M.phi_psi_block_histograms(phi, psi)),
        "fes_rmse_kj_mol": {"phi": M.fes_rmse_1d(ref.phi.ravel(), phi, kT, weights=w),
                            "psi": M.fes_rmse_1d(ref.psi.ravel(), psi, kT, weights=w),
                            "phi_psi": M.fes_rmse_2d(ref.phi.ravel(), ref.psi.ravel(), phi, psi, kT, weights=w)},
        "basin_populations": {"reference": M.basin_populations(ref.phi, ref.psi),
                              "samples": M.basin_populations(phi, psi, w)},
        "bond_w1_nm": M.bond_length_w1(ref.structure_positions, pos, system.bonds, weights=w),
        "n_effective": float(len(phi)) if w is None else float(M.kish_ess(w)),
    }
    if ref.energies is not None and energies is not None:
        out["energy_w1_kj_mol"] = M.wasserstein_1d(ref.structure_energies, energies, weights_b=w)
    else:
        out["energy_w1_kj_mol"] = None
        out["energy_w1_kj_mol_reason"] = "no potential energies in one of the files"
    return out


def evaluate_iid(reference: str | os.PathLike, samples: str | os.PathLike, report: str | os.PathLike,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate i.i.d. conformations (conf.h5) against reference MD: stationary metrics only.

    Rows: the samples unweighted (``stationary``, all samples, mixed chirality included) and, when
    the file has weights, weighted (``stationary_weighted``; self-normalised Boltzmann weights, zero
    where excluded); ``equal_cost`` — the reference shortened to the simulated time its engine made
    in the sampler's wall-clock (sampling, Jacobians and energies) — and ``noise_floor`` (reference
    halves), both with the MD keys. ``weights``: ESS, ESS/N, the counts of excluded samples and the
    log-weight distribution. Kinetics and pathwise metrics are null with their reason.
    """
    from .figures import iid_figures

    out_dir = Path(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    with Trajectory(reference) as t:
        system = t.system()
        fp_ref = t.attrs.get("fingerprint")
    s = _read_iid(samples)
    a = s["attrs"]
    if a.get("fingerprint") not in (None, fp_ref):
        raise InputError(f"{samples} and {reference} are different systems (fingerprints differ)")
    ref = load_run(reference, system, "reference")
    pos = np.asarray(s["positions"], dtype=np.float64)
    phi_q, psi_q = system.central_dihedrals()
    phi, psi = dihedral_angles(pos, phi_q), dihedral_angles(pos, psi_q)
    energies = s.get("potential_energy")
    weights = s.get("weights")
    n = len(pos)
    result: dict[str, Any] = {
        "conventions": {**conventions(system), "weights": "self-normalised Boltzmann importance weights from the file "
                        "(zero where the sampler excluded a sample); n_effective = Kish ESS"},
        "system": system.name, "kind": "iid_samples",
        "reference": _describe(reference, ref),
        "samples": {"path": str(samples), "n_samples": n, "kind": a.get("kind"), "steps": a.get("steps"),
                    "hardware": a.get("hardware"), "wall_clock_s": a.get("wall_clock_s"),
                    "training_wall_clock_s": a.get("training_wall_clock_s"), "reweighted": weights is not None},
    }
    split = split_reference(ref)
    result["reference_run_status"] = ref.attrs.get("run_status")
    result["reference_split"] = split.describe()
    judge = split.judge
    result["stationary"] = _stationary_iid(judge, phi, psi, pos, energies, None, system)
    # for information only: against the whole reference (not comparable with equal_cost / noise_floor)
    result["stationary_vs_whole_reference"] = _stationary_iid(ref, phi, psi, pos, energies, None, system)
    if weights is not None:
        result["stationary_weighted"] = _stationary_iid(judge, phi, psi, pos, energies, weights, system)
        lw = np.asarray(s.get("log_weights", np.log(np.where(weights > 0, weights, np.nan))), dtype=np.float64)
        fin = np.isfinite(lw) & (weights > 0)
        q = np.log10(weights[fin] * n) if fin.any() else np.array([])
        result["weights"] = {
            "ess": M.kish_ess(weights), "ess_fraction": M.kish_ess(weights) / n, "n_samples": n,
            "n_weight_zero": int((~fin).sum()), "max_weight": float(weights.max()) if n else None,
            "log10_n_times_weight_quantiles": {str(p): float(np.quantile(q, p)) for p in (0.01, 0.1, 0.5, 0.9, 0.99)}
            if q.size else None,
            **{k: a.get(k) for k in ("n_invertibility_failures", "n_wrong_chirality", "n_reflected",
                                     "n_mixed_chirality", "n_nonfinite_energy")},
        }
    else:
        reason = "no weights in the samples file (sample without --reweight)"
        result["stationary_weighted"] = {"value": None, "reason": reason}
        result["weights"] = {"value": None, "reason": reason,
                             **{k: a.get(k) for k in ("n_wrong_chirality", "n_reflected", "n_mixed_chirality")}}
    result["kinetics"] = {"value": None, "reason": "i.i.d. samples have no time axis: no kinetics"}
    result["pathwise"] = {"value": None, "reason": "i.i.d. samples are not driven by the reference's path"}
    wall = a.get("wall_clock_s")
    ess = result["weights"].get("ess") if weights is not None else None
    result["cost"] = {"reference": _cost(ref),
                      "samples": {"samples_per_wall_s": n / wall if wall else None,
                                  "effective_samples_per_wall_s": ess / wall if wall and ess is not None else None,
                                  "wall_clock_s": wall, "training_wall_clock_s": a.get("training_wall_clock_s"),
                                  "hardware": a.get("hardware")}}
    pseudo = dataclasses.replace(ref, label="samples", attrs={"wall_clock_s": wall, "hardware": a.get("hardware")})
    short, note = _equal_cost(ref, pseudo, split)
    if short is None:
        result["equal_cost"] = {"value": None, "reason": note}
    else:
        result["equal_cost"] = {"stationary": _stationary(judge, short, system), "note": note,
                                "frames": short.phi.shape[1], "n_replicas": short.phi.shape[0],
                                "simulated_ns": short.simulated_ns, "construction": split.construction}
    result["noise_floor"] = {"stationary": _stationary(judge, split.held_out, system),
                             "construction": split.construction, "note": split.description}
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(result), indent=2))
    figures = iid_figures(ref, phi, psi, weights, result, system, out_dir)
    (out_dir / "report.md").write_text(_markdown_iid(result, figures))
    return result


def _markdown_iid(r: dict[str, Any], figures: list[Path]) -> str:
    smp, ref = r["samples"], r["reference"]
    lines = [f"# molflow evaluation: {r['system']} (i.i.d. conformations)", ""]
    lines += _status_banner(r.get("reference_run_status"), "reference")
    lines += [f"Reference: `{ref['path']}` ({ref['n_replicas']} replicas x {ref['n_frames']} frames, "
             f"{ref['simulated_ns']:.3g} ns). Samples: `{smp['path']}` ({smp['n_samples']} conformations, "
              f"{smp.get('steps')} map steps, {_fmt(smp.get('wall_clock_s'))} s on {smp.get('hardware')}).", ""]
    lines += _split_lines(r)
    lines += ["## Conventions", ""]
    lines += [f"- **{k}**: {v}" for k, v in r["conventions"].items()]
    lines += ["", "## Stationary", "", "| row | JS(φ,ψ) | FES RMSE φ | FES RMSE ψ | FES RMSE 2-D | bond W1 (nm) | "
              "energy W1 (kJ/mol) | n (effective) |", "|---|---|---|---|---|---|---|---|"]
    rows = [("samples vs J, unweighted", r["stationary"]), ("samples vs J, weighted", r["stationary_weighted"]),
            ("equal-cost MD (held-out prefix) vs J", r["equal_cost"].get("stationary")),
            ("noise floor (H vs J)", r["noise_floor"]["stationary"])]
    for name, s in rows:
        if not s or s.get("value", 0) is None:
            why = (s or r["equal_cost"]).get("reason", "n/a")
            lines.append(f"| {name} | {why} | | | | | | |")
            continue
        f = s["fes_rmse_kj_mol"]
        lines.append(f"| {name} | {_fmt(s['js_phi_psi'])} | {_fmt(f['phi'])} | {_fmt(f['psi'])} | "
                     f"{_fmt(f['phi_psi'])} | {_fmt(s['bond_w1_nm'])} | {_fmt(s['energy_w1_kj_mol'])} | "
                     f"{_fmt(s.get('n_effective'))} |")
    lines += ["", "Basin populations (reference | unweighted | weighted):", ""]
    bref = r["stationary"]["basin_populations"]["reference"]
    bu = r["stationary"]["basin_populations"]["samples"]
    bw = (r["stationary_weighted"].get("basin_populations") or {}).get("samples", {})
    for name in M.BASINS:
        lines.append(f"- {name}: {_fmt(bref[name]['population'])} | {_fmt(bu[name]['population'])} | "
                     f"{_fmt((bw.get(name) or {}).get('population'))}")
    w = r["weights"]
    lines += ["", "## Weights", ""]
    if w.get("ess") is not None:
        lines += [f"- Kish ESS {_fmt(w['ess'])} of {w['n_samples']} (ESS/N {_fmt(w['ess_fraction'])}); "
                  f"largest weight {_fmt(w['max_weight'])}",
                  f"- weight zero: {w['n_weight_zero']} (invertibility failures {w.get('n_invertibility_failures')}, "
                  f"mixed chirality {w.get('n_mixed_chirality')}, non-finite energy {w.get('n_nonfinite_energy')}); "
                  f"mirror images reflected back: {w.get('n_reflected')}"]
    else:
        lines.append(f"- {w['reason']}; mirror images reflected back: {w.get('n_reflected')}, mixed chirality: "
                     f"{w.get('n_mixed_chirality')}")
    lines += ["", f"Kinetics: {r['kinetics']['reason']}. Pathwise: {r['pathwise']['reason']}.", "", "## Cost", "",
              f"- samples: {_fmt(r['cost']['samples']['samples_per_wall_s'])} conformations per wall-clock s, "
              f"{_fmt(r['cost']['samples']['effective_samples_per_wall_s'])} effective (weighted) per s; training "
              f"{_fmt(r['cost']['samples']['training_wall_clock_s'])} s (apart)",
              f"- reference MD: {_fmt(r['cost']['reference'].get('ns_per_wall_s'))} ns per wall-clock s, ESS(φ) "
              f"per s {_fmt(r['cost']['reference'].get('ess_per_s_phi'))} ({r['cost']['reference'].get('hardware')})"]
    if r["equal_cost"].get("note"):
        lines.append(f"- equal cost: {r['equal_cost']['note']}")
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"
