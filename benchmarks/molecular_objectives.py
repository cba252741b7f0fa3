"""Benchmark (issue #10): sample-mode fidelity of molecular flow maps trained with each objective.

For every objective (``energy``: the #8 joint energy score on Cartesian features; ``whitened_crps``:
plus whitened internal coordinates and per-coordinate CRPS, :mod:`molflow.training.objective`) it
trains one map on the same data with the same settings and seed, rolls it out free-running in
``sample`` mode at each tau from states spread over the reference, evaluates the rollouts with
``molflow.evaluate`` and reports, beside the reference MD's own numbers:

- per-bond length standard deviation, samples / reference (worst |ratio - 1| and share within 10%);
- kinetic temperature (K) against the thermostat's 300 K (target: within 2%);
- potential-energy mean minus the reference's (kJ/mol; target: within 2);
- phi flip rates (core-set transitions, per ns) and the slowest implied timescale at lag tau (ns),
  samples / reference (target: within 20%); JS(phi, psi);
- the sampler's guard restarts and stopped replicas (a map that does not hold bonds explodes).

    python benchmarks/molecular_objectives.py --data data_20fs.h5 --reference ref_100fs.h5 --size small \\
        --out benchmarks/results/molecular_objectives_cpu_small.json
    # lent GPU (full size: 20000 steps, 64 features, 3 layers, 256 replicas x 1 ns per tau)
    python benchmarks/molecular_objectives.py --data data_20fs.h5 --reference ref_100fs.h5 --size full \\
        --device cuda --out benchmarks/results/molecular_objectives_gpu.json

Training data: ``molflow simulate alanine_dipeptide --out data_20fs.h5 --replicas 8 --time-ps 50
--frame-fs 20``; reference: ``--replicas 4 --time-ps 500 --frame-fs 100`` (made here when absent).
Prints a table and writes JSON (hardware, versions, settings, every number).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import molflow
from molflow.md.engine import hardware_description
from molflow.sampling import start_states_from_run
from molflow.trajectory import Trajectory

#: objectives compared: the #8 one (energy score, no training noise) and the new default, with the
#: pieces apart (whitened internal coordinates + CRPS; training noise on the start positions)
VARIANTS = {
    "energy": {"objective": "energy", "input_noise_nm": 0.0},
    "whitened_crps": {"objective": "whitened_crps", "input_noise_nm": 0.0},
    "energy_noise": {"objective": "energy", "input_noise_nm": 0.003},
    "whitened_crps_noise": {"objective": "whitened_crps", "input_noise_nm": 0.003},
    "whitened_crps_noise6": {"objective": "whitened_crps", "input_noise_nm": 0.006},
    "whitened_crps_noise10": {"objective": "whitened_crps", "input_noise_nm": 0.010},
}
SIZES = {
    "small": dict(steps=2000, n_features=32, n_layers=2, batch_size=16, replicas=32, rollout_ps=50.0),
    "full": dict(steps=20000, n_features=64, n_layers=3, batch_size=64, replicas=256, rollout_ps=1000.0),
}


def bond_std(path, bonds) -> np.ndarray:
    """Standard deviation (nm) of every bond's length over all finite frames (after frame 0) of a run."""
    with Trajectory(path) as t:
        x = np.asarray(t.positions[:, 1:], dtype=np.float64)
    x = x[np.isfinite(x).all(axis=(2, 3))]
    return np.linalg.norm(x[:, bonds[:, 0]] - x[:, bonds[:, 1]], axis=-1).std(0)


def energy_mean(metrics_dir: Path, path) -> float | None:
    """Mean potential energy (kJ/mol) of the finite frames; sampled runs get it recomputed by OpenMM."""
    from molflow.evaluation.report import load_run

    with Trajectory(path) as t:
        system = t.system()
    run = load_run(path, system, "x")
    return None if run.energies is None else float(np.nanmean(run.structure_energies))


def summarise(metrics: dict, ref_bond: np.ndarray, smp_bond: np.ndarray, e_ref: float, e_smp: float | None) -> dict:
    st, kin = metrics["stationary"], metrics["kinetics"]
    ratio = smp_bond / ref_bond
    kr, ks = kin["reference"], kin["samples"]
    def its(k):
        v = k.get("implied_timescale_ns", {})
        ts = v.get("timescales_ns") if isinstance(v, dict) else None
        return ts[0][0] if ts and ts[0] and ts[0][0] is not None else None
    def rel(a, b):
        return None if a is None or b in (None, 0) else a / b
    t_s = st["kinetic_temperature_k"]["samples"]
    return {
        "bond_std_ratio_by_bond": ratio.tolist(),
        "bond_std_ratio_worst_abs_dev": float(np.max(np.abs(ratio - 1))),
        "bond_std_share_within_10pct": float(np.mean(np.abs(ratio - 1) <= 0.10)),
        "kinetic_temperature_k": t_s,
        "kinetic_temperature_rel_dev": None if t_s is None else t_s / 300.0 - 1,
        "energy_mean_kj_mol": e_smp, "energy_mean_minus_reference_kj_mol": None if e_smp is None else e_smp - e_ref,
        "js_phi_psi": st["js_phi_psi"],
        "rate_neg_to_pos_ratio": rel(ks.get("rate_neg_to_pos_per_ns"), kr.get("rate_neg_to_pos_per_ns")),
        "rate_pos_to_neg_ratio": rel(ks.get("rate_pos_to_neg_per_ns"), kr.get("rate_pos_to_neg_per_ns")),
        "slowest_its_ns": its(ks), "slowest_its_reference_ns": its(kr), "slowest_its_ratio": rel(its(ks), its(kr)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="training data (20 fs frames); made when absent")
    ap.add_argument("--reference", required=True, help="reference MD (100 fs frames); made when absent")
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--objectives", default="energy,whitened_crps_noise", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--taus", default="0.2,0.5,1.0", help="jump lengths in ps")
    ap.add_argument("--steps", type=int, help="override the size's optimiser steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="benchmark-objectives")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    z = dict(SIZES[args.size])
    if args.steps:
        z["steps"] = args.steps
    taus = [float(t) for t in args.taus.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not Path(args.data).exists():
        molflow.simulate("alanine_dipeptide", args.data, replicas=8, time_ps=50.0, frame_fs=20.0, n_coefficients=3,
                         equilibrate_ps=10.0, seed=20261123).close()
    if not Path(args.reference).exists():
        molflow.simulate("alanine_dipeptide", args.reference, replicas=4, time_ps=500.0, frame_fs=100.0,
                         n_coefficients=3, equilibrate_ps=10.0, seed=99).close()
    system = molflow.load_system("alanine_dipeptide")
    bonds = np.asarray(system.bonds, dtype=int)
    ref_bond = bond_std(args.reference, bonds)
    e_ref = energy_mean(work, args.reference)
    x0, v0 = start_states_from_run(args.reference, z["replicas"])
    result = {"settings": {**z, "taus_ps": taus, "data": str(args.data), "reference": str(args.reference), "seed": 7, "variants": VARIANTS},
              "hardware": hardware_description("CPU") if not torch.cuda.is_available() else torch.cuda.get_device_name(),
              "versions": {"molflow": molflow.__version__, "torch": torch.__version__, "python": platform.python_version()},
              "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "reference": {"bond_std_nm": ref_bond.tolist(), "energy_mean_kj_mol": e_ref}, "objectives": {}}
    for obj in args.objectives.split(","):
        model = work / f"model_{obj}.pt"
        t0 = time.perf_counter()
        if not model.exists():
            molflow.train("alanine_dipeptide", data=[args.data], out=model, tau_max_ps=max(taus), steps=z["steps"],
                          device=args.device, seed=7, config={"batch_size": z["batch_size"], **VARIANTS[obj]},
                          n_features=z["n_features"], n_layers=z["n_layers"])
        res = {"train_wall_s": time.perf_counter() - t0}
        fm = molflow.FlowMap.load(model, device=args.device)
        for tau in taus:
            samples = work / f"samples_{obj}_{tau:g}ps.h5"
            n_jumps = int(round(z["rollout_ps"] / tau))
            t0 = time.perf_counter()
            try:
                fm.sample((x0, v0), n_jumps=n_jumps, tau_ps=tau, seed=2, mode="sample", out=samples,
                          overwrite=True, progress=True).close()
            except molflow.SimulationError as exc:
                res[f"{tau:g}"] = {"all_stopped": str(exc)}
                print(obj, tau, "all replicas stopped", flush=True)
                continue
            wall = time.perf_counter() - t0
            with Trajectory(samples) as t:
                a = t.attrs
            row = {"sample_wall_s": wall, "jumps": n_jumps, "replicas": z["replicas"],
                   "n_restarts": int(a.get("n_restarts", 0)), "n_stopped": int(a.get("n_stopped", 0))}
            try:
                metrics = molflow.evaluate(args.reference, samples, work / f"eval_{obj}_{tau:g}ps", progress=False)
                row.update(summarise(metrics, ref_bond, bond_std(samples, bonds), e_ref, energy_mean(work, samples)))
            except Exception as exc:  # noqa: BLE001 - a benchmark records what failed and goes on
                row["evaluation_error"] = f"{type(exc).__name__}: {exc}"
            res[f"{tau:g}"] = row
            print(obj, tau, {k: v for k, v in row.items() if k != "bond_std_ratio_by_bond"}, flush=True)
        result["objectives"][obj] = res
        Path(args.out).write_text(json.dumps(result, indent=2))
    keys = ["n_restarts", "n_stopped", "bond_std_ratio_worst_abs_dev", "bond_std_share_within_10pct",
            "kinetic_temperature_k", "energy_mean_minus_reference_kj_mol", "js_phi_psi", "rate_neg_to_pos_ratio",
            "rate_pos_to_neg_ratio", "slowest_its_ratio"]
    print("objective      tau  " + "  ".join(k[:14] for k in keys))
    for obj, res in result["objectives"].items():
        for tau in taus:
            r = res.get(f"{tau:g}", {})
            cells = [("-" if r.get(k) is None else f"{r[k]:.3g}") for k in keys]
            print(f"{obj:14s} {tau:4g}  " + "  ".join(f"{c:>14s}" for c in cells))
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
