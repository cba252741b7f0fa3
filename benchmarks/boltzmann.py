"""Benchmark: the few-step Boltzmann sampler on alanine dipeptide (issues #5 and 19; not a test).

``--kind internal`` (default; issue 19): the internal-coordinate sampler (molflow/boltzmann/icflow.py).
Training data: umbrella windows along phi with their MBAR weights (``--train-data W/umbrella.npz``,
or recorded here with molflow.md.umbrella.sample_phi_windows, ~3 minutes on 2 cores); the model is
trained (``train_boltzmann``, the committed recipe below) or reused (``--model``). For 0 (the fitted
base alone), 1, 2, 4 and 10 map steps: weighted samples (every one kept, exact weights) evaluated by
``molflow.evaluate`` against the reference (``--reference``, >= 100 ns for the alpha_L population)
and, with ``--umbrella``, against the umbrella law (JS, 2-D FES RMSE, basin populations); ESS/N,
invertibility failures with causes, wall clock per sample (map, energies), effective samples per
CPU-second beside MD's (integrated autocorrelation times of phi and psi in the reference, stock
OpenMM timed in the same run).

    OMP_NUM_THREADS=1 python benchmarks/boltzmann.py --kind internal --reference ref_100fs.h5 \
        --train-data umbrella.npz --umbrella umbrella.npz --out benchmarks/results/boltzmann_internal_cpu.json

``--kind vp`` (issue #5): records (or reuses) training MD and an independent reference MD, trains a Boltzmann map
(``molflow.train_boltzmann``), and for 1, 2, 4 and 10 map steps draws conformations without weights
(many) and with exact Boltzmann weights (fewer: the float64 Jacobian costs ~63 map evaluations per
sample and step), evaluates both with ``molflow.evaluate`` against the reference and reports ESS/N,
JS(φ,ψ) and 2-D free-energy RMSE before/after reweighting, basin populations, invertibility and
chirality counts, conformations (and effective conformations) per wall-clock second, and the same
metrics for reference MD of equal cost (the reference shortened to what its engine made in the
sampler's wall-clock) and for the noise floor (two reference halves). Also measured:

- the η scan: ESS/N of path-conditional weights for the *exact* denoiser of a Gaussian-mixture toy
  (2-D and 62-D with 20 stiff directions), so the only error is the SDE's noise (and the steps) —
  the reason the default η is small (``BoltzmannConfig`` docstring);
- one network vs two: parameters, map-step and Jacobian cost per sample (and, with
  ``--compare-networks``, the sample quality of both trained at equal steps).

Prints a table and writes JSON (hardware, versions, settings, every number).

    OMP_NUM_THREADS=1 nice python benchmarks/boltzmann.py --size small --device cpu \\
        --out benchmarks/results/boltzmann_cpu.json
    # the GPU run (lent H100/H200):
    python benchmarks/boltzmann.py --size full --device cuda --platform CUDA \\
        --out benchmarks/results/boltzmann_gpu_full.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import molflow

SIZES = {
    # MD: training frames and the evaluation reference; training; samples per step count
    "small": dict(train_replicas=2, train_ps=200.0, train_frame_fs=200.0, ref_replicas=2, ref_ps=400.0,
                  train_steps=1500, batch_size=32, n_features=32, n_layers=2, n_unweighted=1000, n_weighted=32,
                  eta_scan_samples=300, eta_scan_steps=32, workers=1),
    "tiny": dict(train_replicas=1, train_ps=20.0, train_frame_fs=200.0, ref_replicas=2, ref_ps=20.0,
                 train_steps=6, batch_size=8, n_features=8, n_layers=1, n_unweighted=16, n_weighted=4,
                 eta_scan_samples=20, eta_scan_steps=4, workers=1),  # checks that the script runs
    "full": dict(train_replicas=32, train_ps=1000.0, train_frame_fs=250.0, ref_replicas=64, ref_ps=2000.0,
                 train_steps=20000, batch_size=256, n_features=64, n_layers=3, n_unweighted=100000,
                 n_weighted=10000, eta_scan_samples=2000, eta_scan_steps=64, workers=None),
}
STEPS = (1, 2, 4, 10)
#: the internal-coordinate sampler's recipe and sample counts per size
INTERNAL = {
    "small": dict(train_steps=12000, n_weighted=200000, seed=19),
    "tiny": dict(train_steps=2, n_weighted=64, seed=19),  # checks that the script runs
    "full": dict(train_steps=4000, n_weighted=200000, seed=19),
}
ETAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0)


def eta_scan(n: int, steps: int) -> list[dict]:
    """ESS/N of exact path-conditional weights for the exact denoiser of a mixture toy, per η."""
    from molflow.boltzmann.reweight import (boltzmann_log_weights, gaussian_log_density, jacobian_and_value,
                                            kish_ess, logabsdet, self_normalise)
    from molflow.boltzmann.toy import double_well_2d, draw_path, stiff_toy, toy_map

    rows = []
    for dim, stiff in ((2, 0), (62, 20)):
        target = double_well_2d() if dim == 2 else stiff_toy(dim, stiff)
        for eta in ETAS:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(0)
            z, L, e = draw_path(n, steps, 3, dim, g)
            jac, x = jacobian_and_value(toy_map(target, steps, eta), z, L, e, chunk=100)
            lad, _ = logabsdet(jac)
            lw, keep = boltzmann_log_weights(target.energy(x).numpy(), lad.numpy(), gaussian_log_density(z).numpy())
            w = self_normalise(lw, keep)
            rows.append({"dim": dim, "n_stiff": stiff, "eta": eta, "steps": steps, "n": n,
                         "ess_fraction": kish_ess(w) / n, "var_log_w": float(np.var(lw[keep])),
                         "wall_s": time.perf_counter() - t0})
            print(f"  eta scan d={dim:3d} eta={eta:<5g} ESS/N {rows[-1]['ess_fraction']:.4f}", flush=True)
    return rows


def network_costs(system, n_features: int, n_layers: int, device: torch.device) -> list[dict]:
    """Parameters, float32 map-step time and float64 Jacobian time per sample, one vs two networks."""
    from molflow.boltzmann.model import BoltzmannConfig
    from molflow.boltzmann.reweight import jacobian_and_value
    from molflow.boltzmann.sampler import BoltzmannSampler
    from molflow.boltzmann.training import build_map

    rows = []
    for nets in (1, 2):
        torch.manual_seed(0)
        model = build_map(system, 0.17, BoltzmannConfig(n_features=n_features, n_layers=n_layers, networks=nets))
        bs = BoltzmannSampler(model.to(device), system)
        g = torch.Generator(device=device).manual_seed(0)
        B = 256 if device.type == "cpu" else 4096
        eta, L, eps = bs._draw(B, 1, g)
        t0 = time.perf_counter()
        bs._positions(eta, L, eps, 1)
        t_step = (time.perf_counter() - t0) / B
        m64 = copy.deepcopy(bs.model).double().requires_grad_(False)
        fn = bs._map_fn(m64, 1)
        nj = 8 if device.type == "cpu" else 256
        t0 = time.perf_counter()
        jacobian_and_value(fn, eta[:nj].reshape(nj, -1), L[:nj], eps[:nj], chunk=4 if device.type == "cpu" else 64)
        t_jac = (time.perf_counter() - t0) / nj
        rows.append({"networks": nets, "parameters": sum(p.numel() for p in model.parameters()),
                     "map_step_s_per_sample_float32": t_step, "jacobian_s_per_sample_step_float64": t_jac})
        print(f"  networks={nets}: {rows[-1]['parameters']} parameters, map step {t_step * 1e3:.2f} ms/sample, "
              f"Jacobian {t_jac:.3f} s/sample-step", flush=True)
    return rows


def evaluate_steps(model_path: Path, reference: Path, work: Path, z: dict, device: str, label: str,
                   steps=STEPS, anneal=None) -> list[dict]:
    bs = molflow.BoltzmannSampler.load(model_path, device=device)
    rows = []
    kinds = [("unweighted", z["n_unweighted"], False, None), ("reweighted", z["n_weighted"], True, None)]
    if anneal is not None:  # the same map samples (same seed), then the exact annealed finish
        kinds.append(("annealed", z["n_weighted"], True, anneal))
    for K in steps:
        row = {"model": label, "steps": K}
        for kind, n, rew, ann in kinds:
            conf = work / f"conf_{label}_{K}_{kind}.h5"
            res = bs.sample(n, steps=K, seed=100 + K, reweight=rew, out=conf, overwrite=True, progress=True,
                            anneal=ann)
            a = res["attrs"]
            m = molflow.evaluate(reference, conf, work / f"report_{label}_{K}_{kind}", progress=False)
            s = m["stationary"]
            row[kind] = {
                "n": n, "wall_clock_s": a["wall_clock_s"], "wall_clock_map_s": a["wall_clock_map_s"],
                "wall_clock_reweight_s": a["wall_clock_reweight_s"], "wall_clock_energy_s": a["wall_clock_energy_s"],
                "samples_per_s": n / a["wall_clock_s"],
                "map_samples_per_s": n / a["wall_clock_map_s"] if a["wall_clock_map_s"] else None,
                "js_phi_psi": s["js_phi_psi"], "fes_rmse_kj_mol_2d": s["fes_rmse_kj_mol"]["phi_psi"],
                "fes_rmse_kj_mol_phi": s["fes_rmse_kj_mol"]["phi"], "energy_w1_kj_mol": s["energy_w1_kj_mol"],
                "bond_w1_nm": s["bond_w1_nm"],
                "basin_populations": {b: v["population"] for b, v in s["basin_populations"]["samples"].items()
                                      if isinstance(v, dict)},
                "n_reflected": a["n_reflected"], "n_mixed_chirality": a["n_mixed_chirality"],
                "equal_cost_md": _md_row(m["equal_cost"]),
            }
            if rew:
                sw = m["stationary_weighted"]
                row[kind].update(
                    ess=a["ess"], ess_fraction=a["ess_fraction"], n_invertibility_failures=a["n_invertibility_failures"],
                    n_inverse_other_preimage=a["n_inverse_other_preimage"],
                    n_inverse_not_converged=a["n_inverse_not_converged"], n_singular_jacobian=a["n_singular_jacobian"],
                    max_weight=a["max_weight"], n_weight_zero=a["n_weight_zero"],
                    n_wrong_chirality=a["n_wrong_chirality"], effective_samples_per_s=a["ess"] / a["wall_clock_s"],
                    anneal=json.loads(a["anneal_json"]) if "anneal_json" in a else None,
                    ess_fraction_map=a.get("ess_fraction_map"), wall_clock_anneal_s=a.get("wall_clock_anneal_s"),
                    weighted={"js_phi_psi": sw.get("js_phi_psi"),
                              "fes_rmse_kj_mol_2d": (sw.get("fes_rmse_kj_mol") or {}).get("phi_psi"),
                              "energy_w1_kj_mol": sw.get("energy_w1_kj_mol"),
                              "basin_populations": {b: v["population"] for b, v in
                                                    ((sw.get("basin_populations") or {}).get("samples") or {}).items()
                                                    if isinstance(v, dict)}})
            else:
                row["noise_floor"] = _md_row(m["noise_floor"])
                row["reference_basin_populations"] = {
                    b: v["population"] for b, v in s["basin_populations"]["reference"].items() if isinstance(v, dict)}
                row["reference_md_ns_per_s"] = m["cost"]["reference"].get("ns_per_wall_s")
        rows.append(row)
        u, r = row["unweighted"], row["reweighted"]
        print(f"  K={K:2d} JS {u['js_phi_psi']:.3f} (MD equal cost {_g(u['equal_cost_md'], 'js_phi_psi')}) "
              f"| ESS/N {r['ess_fraction']:.3g} inv.fail {r['n_invertibility_failures']} "
              + (f"| annealed ESS/N {row['annealed']['ess_fraction']:.3g} " if "annealed" in row else "")
              + f"| {u['samples_per_s']:.3g} conf/s, {r['samples_per_s']:.3g} weighted conf/s", flush=True)
    return rows


def md_effective_rate(reference: Path, system) -> dict:
    """MD's figure beside the sampler's (issue 19): effective independent samples of phi and of psi per
    CPU-second of stock OpenMM = (1 / (2 tau_int)) per simulated ps x stock ps per CPU-second, tau_int
    from the reference run's replica-averaged circular ACF (Sokal window; metrics.effective_sample_size's
    convention: N dt / (2 tau) samples), stock OpenMM timed here (molflow.md.stock.stock_speed)."""
    from molflow.evaluation.dihedrals import phi_psi
    from molflow.evaluation.metrics import autocorrelation, integrated_autocorrelation_time
    from molflow.md.stock import stock_speed

    with molflow.Trajectory(reference) as t:
        dt_ps = float(t.frame_interval_ps)
        x = np.asarray(t.positions[:], dtype=np.float64)
    phi, psi = phi_psi(x, system)
    stock = stock_speed(system)
    ps_per_cpu_s = stock["ns_per_cpu_s"] * 1000.0
    out = {"reference": str(reference), "frame_ps": dt_ps, "simulated_ns": float(phi.size * dt_ps / 1000.0),
           "stock_openmm": stock}
    for name, a in (("phi", phi), ("psi", psi)):
        max_lag = min(a.shape[1] - 1, int(round(20000.0 / dt_ps)))  # up to 20 ns
        tau = integrated_autocorrelation_time(autocorrelation(a, max_lag), dt_ps)
        out[f"tau_int_{name}_ps"] = tau
        out[f"effective_samples_{name}_per_cpu_s"] = ps_per_cpu_s / (2.0 * tau) if tau else None
    return out


def _md_row(row: dict) -> dict | None:
    s = (row or {}).get("stationary")
    if not s:
        return {"value": None, "reason": (row or {}).get("reason")}
    return {"js_phi_psi": s["js_phi_psi"], "fes_rmse_kj_mol_2d": s["fes_rmse_kj_mol"]["phi_psi"],
            "energy_w1_kj_mol": s["energy_w1_kj_mol"], "frames": row.get("frames"),
            "simulated_ns": row.get("simulated_ns"), "note": row.get("note")}


def _attr(path: Path, key: str):
    with molflow.Trajectory(path) as t:
        return t.attrs.get(key)


def _g(d, k):
    v = (d or {}).get(k)
    return "n/a" if v is None else f"{v:.3f}"

def _reused(conf: Path, bs, n: int, K: int, seed: int) -> dict | None:
    """An earlier run's sample file for the same model, size, steps and seed (``--reuse-samples``), as
    :meth:`BoltzmannSampler.sample` returns it (its timings are the original run's), else None."""
    if not conf.exists():
        return None
    from molflow.boltzmann.sampler import read_samples

    r = read_samples(conf)
    a = r["attrs"]
    if (a.get("model_fingerprint"), a.get("n_samples"), a.get("steps"), a.get("seed")) != (bs.fingerprint, n, K, seed):
        return None
    return r


def _fes_rmse_where(phi_ref, psi_ref, w_ref, phi, psi, w, kT: float, p_min: float = 1e-4) -> float | None:
    """2-D free-energy RMSE (kJ/mol, 64 x 64 bins) over the bins that hold at least ``p_min`` of the
    reference law (F within about 9 kT of its minimum): the metric's default takes every bin the
    reference touches, and an umbrella law or a weighted sample touches nearly all of them with tiny
    weights, so the default reads the emptiest bins' noise."""
    from molflow.evaluation.metrics import fes_rmse, kish_ess, phi_psi_histogram

    p_ref = phi_psi_histogram(phi_ref, psi_ref, w_ref)
    p_ref = p_ref / p_ref.sum()
    return fes_rmse(np.where(p_ref >= p_min, p_ref, 0.0), phi_psi_histogram(phi, psi, w), kT,
                    n_samples=kish_ess(np.asarray(w, dtype=np.float64)))


def run_internal(args) -> int:
    """The ``--kind internal`` benchmark (module docstring)."""
    import h5py
    import openmm

    from molflow.devices import device_description

    sys.path.insert(0, str(Path(__file__).parent))
    from phi_umbrella import basin_shares, compare_to_umbrella

    z = dict(INTERNAL[args.size])
    if args.n_weighted:
        z["n_weighted"] = args.n_weighted
    steps = [0] + [k for k in args.steps if k != 0]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    system = molflow.load_system("alanine_dipeptide")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    if not args.reference:
        raise SystemExit("--kind internal needs --reference (long reference MD, >= 100 ns for alpha_L)")
    ref = Path(args.reference)
    train = Path(args.train_data) if args.train_data else work / "umbrella.npz"
    t0 = time.perf_counter()
    if not train.exists():
        from molflow.md.umbrella import sample_phi_windows

        u = sample_phi_windows("alanine_dipeptide")
        np.savez_compressed(train, positions=u["positions"], weight=u["weight"], phi=u["phi"], psi=u["psi"],
                            window=u["window"], centres=u["centres"], fingerprint=system.fingerprint)
    timings["training_data_s"] = time.perf_counter() - t0
    model = Path(args.model) if args.model else work / "bg_internal.pt"
    t0 = time.perf_counter()
    if not args.model:
        molflow.train_boltzmann("alanine_dipeptide", train, model, steps=z["train_steps"], seed=z["seed"],
                                config={"kind": "internal"}, overwrite=True)
    timings["training_s"] = time.perf_counter() - t0
    ck = torch.load(model, map_location="cpu", weights_only=True)
    hist = ck["history_json"] if isinstance(ck["history_json"], list) else json.loads(ck["history_json"])
    train_info = {"model": str(model), "steps": int(ck["step"]), "training_wall_clock_s": ck.get("training_wall_clock_s"),
                  "map_config": ck["map_config_json"], "train_config": ck["train_config_json"],
                  "data": ck.get("data_json"), "n_frames": ck.get("n_frames"),
                  "last_validation": next((h for h in reversed(hist) if "val_nll_0" in h), None),
                  "batch_ess_last_200": {k: float(np.mean([h[k] for h in hist[-200:] if k in h]))
                                         for k in hist[-1] if k.startswith("ess_")}}
    umb = None
    if args.umbrella:
        with np.load(args.umbrella) as u:
            umb = (np.asarray(u["phi"]), np.asarray(u["psi"]), np.asarray(u["weight"]))
    bs = molflow.BoltzmannSampler.load(model)
    rows = []
    from molflow.evaluation.dihedrals import phi_psi
    from molflow.evaluation.metrics import fes_rmse_2d, js_phi_psi

    for K in steps:
        conf = work / f"conf_internal_{K}.h5"
        res = _reused(conf, bs, z["n_weighted"], K, 100 + K) if args.reuse_samples else None
        if res is None:
            res = bs.sample(z["n_weighted"], steps=K, seed=100 + K, reweight=True, out=conf, overwrite=True)
        a = res["attrs"]
        m = molflow.evaluate(ref, conf, work / f"report_internal_{K}", progress=False)
        s, sw = m["stationary"], m["stationary_weighted"]
        pops = lambda bp: {b: v for b, v in bp.items() if isinstance(v, dict)}  # noqa: E731
        row = {"steps": K, "n": a["n_samples"], "ess": a["ess"], "ess_fraction": a["ess_fraction"],
               "n_invertibility_failures": a["n_invertibility_failures"], "n_outside_domain": a["n_outside_domain"],
               "n_wrong_chirality": a["n_wrong_chirality"], "n_nonfinite_energy": a["n_nonfinite_energy"],
               "n_weight_zero": a["n_weight_zero"], "max_weight": a["max_weight"],
               "wall_clock_s": a["wall_clock_s"], "wall_clock_map_s": a["wall_clock_map_s"],
               "wall_clock_energy_s": a["wall_clock_energy_s"], "samples_per_s": a["n_samples"] / a["wall_clock_s"],
               "effective_samples_per_s": a["ess"] / a["wall_clock_s"],
               "unweighted": {"js_phi_psi": s["js_phi_psi"], "fes_rmse_kj_mol_2d": s["fes_rmse_kj_mol"]["phi_psi"],
                              "energy_w1_kj_mol": s["energy_w1_kj_mol"]},
               "weighted_vs_reference_judge": {
                   "js_phi_psi": sw.get("js_phi_psi"), "fes_rmse_kj_mol": sw.get("fes_rmse_kj_mol"),
                   "energy_w1_kj_mol": sw.get("energy_w1_kj_mol"), "bond_w1_nm": sw.get("bond_w1_nm"),
                   "basin_populations": pops((sw.get("basin_populations") or {}).get("samples") or {})},
               "noise_floor": _md_row(m["noise_floor"]),
               "reference_basin_populations": pops(s["basin_populations"]["reference"])}
        ph, ps = phi_psi(np.asarray(res["positions"], dtype=np.float64)[None], system)
        ph, ps, w = ph.ravel(), ps.ravel(), np.asarray(res["weights"], dtype=np.float64)
        if umb is not None:
            row["weighted_vs_umbrella"] = compare_to_umbrella(*umb, ph, ps, system.kT_kj_mol, weights=w)
            row["weighted_vs_umbrella"]["fes_rmse_phi_psi_kj_mol_vs_umbrella_where_p_ge_1e-4"] = _fes_rmse_where(
                umb[0], umb[1], umb[2], ph, ps, w, system.kT_kj_mol)
        # the sampler's own noise: its two halves (independent, each exactly weighted) against each other
        h = len(w) // 2
        row["weighted_half_vs_half"] = {
            "js_phi_psi": js_phi_psi(ph[:h], ps[:h], ph[h:], ps[h:], weights_a=w[:h], weights_b=w[h:]),
            "fes_rmse_kj_mol_2d": fes_rmse_2d(ph[:h], ps[:h], ph[h:], ps[h:], system.kT_kj_mol, weights_ref=w[:h],
                                              weights=w[h:]),
            "fes_rmse_kj_mol_2d_where_p_ge_1e-4": _fes_rmse_where(ph[:h], ps[:h], w[:h], ph[h:], ps[h:], w[h:],
                                                                  system.kT_kj_mol),
            "alpha_L_halves": [basin_shares(ph[:h], ps[:h], w[:h])["alpha_L_C7ax"],
                               basin_shares(ph[h:], ps[h:], w[h:])["alpha_L_C7ax"]]}
        rows.append(row)
        wv = row["weighted_vs_reference_judge"]
        print(f"  K={K:2d} ESS/N {row['ess_fraction']:.3f} failures {row['n_invertibility_failures']} "
              f"| weighted JS vs J {wv['js_phi_psi']:.4f} (floor {_g(row['noise_floor'], 'js_phi_psi')}) "
              f"| alpha_L {wv['basin_populations'].get('alpha_L_C7ax', {}).get('population', float('nan')):.4f} "
              f"| {row['samples_per_s']:.0f} conf/s, {row['effective_samples_per_s']:.0f} effective/s", flush=True)
    t0 = time.perf_counter()
    md_rate = md_effective_rate(ref, system)
    timings["md_effective_rate_s"] = time.perf_counter() - t0
    reference_vs_umbrella = None
    if umb is not None:
        with molflow.Trajectory(ref) as t:
            rph, rps = phi_psi(np.asarray(t.positions[:], dtype=np.float64), system)
        reference_vs_umbrella = {"umbrella_populations": basin_shares(*umb),
                                 "reference_all": compare_to_umbrella(*umb, rph, rps, system.kT_kj_mol)}
    timings["total_s"] = time.perf_counter() - t_all
    print(f"\nMD: tau_int phi {md_rate['tau_int_phi_ps']:.3g} ps, psi {md_rate['tau_int_psi_ps']:.3g} ps: "
          f"{md_rate['effective_samples_phi_per_cpu_s']:.3g} / {md_rate['effective_samples_psi_per_cpu_s']:.3g} "
          f"effective samples of phi / psi per CPU-second of stock OpenMM")
    print(f"{'K':>3s} {'ESS/N':>7s} {'fail':>5s} {'JS w vs J':>9s} {'FES2d vs J':>10s} {'JS vs umb':>9s} "
          f"{'FES2d vs umb (p>=1e-4)':>22s} {'FES2d halves (p>=1e-4)':>22s} {'alpha_L':>8s} {'eff/s':>8s}")
    for r in rows:
        wv, wu = r["weighted_vs_reference_judge"], r.get("weighted_vs_umbrella") or {}
        print(f"{r['steps']:3d} {r['ess_fraction']:7.3f} {r['n_invertibility_failures']:5d} "
              f"{wv['js_phi_psi'] or float('nan'):9.4f} {(wv['fes_rmse_kj_mol'] or {}).get('phi_psi') or float('nan'):10.2f} "
              f"{wu.get('js_phi_psi_vs_umbrella') or float('nan'):9.4f} "
              f"{wu.get('fes_rmse_phi_psi_kj_mol_vs_umbrella') or float('nan'):9.2f} "
              f"({wu.get('fes_rmse_phi_psi_kj_mol_vs_umbrella_where_p_ge_1e-4') or float('nan'):5.2f})      "
              f"{r['weighted_half_vs_half']['fes_rmse_kj_mol_2d'] or float('nan'):9.2f} "
              f"({r['weighted_half_vs_half']['fes_rmse_kj_mol_2d_where_p_ge_1e-4'] or float('nan'):5.2f})      "
              f"{(wu.get('populations') or {}).get('alpha_L_C7ax', float('nan')):8.4f} {r['effective_samples_per_s']:8.0f}")
    result = {
        "benchmark": "boltzmann", "kind": "internal", "size": args.size, "system": "alanine_dipeptide",
        "settings": {**z, "steps": steps, "train_data": str(train), "reference": str(ref), "umbrella": args.umbrella,
                     "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "hardware": {"sampler": device_description(torch.device("cpu")), "reference_md": _attr(ref, "hardware")},
        "versions": {"molflow": molflow.__version__, "torch": torch.__version__, "openmm": openmm.__version__,
                     "numpy": np.__version__, "h5py": h5py.__version__, "python": platform.python_version()},
        "training": train_info, "md_effective_rate": md_rate, "reference_vs_umbrella": reference_vs_umbrella,
        "results": rows, "timings_s": timings,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out} ({timings['total_s']:.0f} s)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--device", default="auto", help="torch device for training and sampling")
    ap.add_argument("--platform", default="auto", help="OpenMM platform for the MD")
    ap.add_argument("--train-data", help="reuse this training run")
    ap.add_argument("--reference", help="reuse this reference run")
    ap.add_argument("--model", help="reuse this trained checkpoint")
    ap.add_argument("--compare-networks", action="store_true", help="also train and evaluate networks = 2")
    ap.add_argument("--work", default="benchmark-boltzmann")
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="map step counts (default 1 2 4 10)")
    ap.add_argument("--n-weighted", type=int, help="weighted samples per step count (default: the size's)")
    ap.add_argument("--anneal", type=int, default=0, metavar="J",
                    help="also the exact annealed finish with J temperatures (molflow.boltzmann.anneal)")
    ap.add_argument("--anneal-beta-start", type=float, default=0.25)
    ap.add_argument("--anneal-moves", type=int, default=1)
    ap.add_argument("--anneal-step-fs", type=float, default=1.0)
    ap.add_argument("--anneal-tempered", choices=("bonded", "all"), default="bonded")
    ap.add_argument("--kind", choices=("internal", "vp"), default="internal",
                    help="internal: the internal-coordinate sampler (default); vp: the Cartesian VP-SDE map")
    ap.add_argument("--umbrella", help="umbrella windows (.npz: phi, psi, weight) to score the samples against")
    ap.add_argument("--reuse-samples", action="store_true",
                    help="--kind internal: reuse sample files in --work made by the same model, size, steps and seed")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.kind == "internal":
        return run_internal(args)
    z = dict(SIZES[args.size])
    if args.n_weighted:
        z["n_weighted"] = args.n_weighted
    anneal = None
    if args.anneal:
        from molflow.boltzmann.anneal import AnnealSettings

        anneal = AnnealSettings(args.anneal, args.anneal_beta_start, args.anneal_moves, 10, args.anneal_step_fs / 1000.0,
                                args.anneal_tempered)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    from molflow.devices import device_description, resolve_device

    dev = resolve_device(args.device)
    timings = {}
    train = Path(args.train_data) if args.train_data else work / "train.h5"
    ref = Path(args.reference) if args.reference else work / "reference.h5"
    t0 = time.perf_counter()
    if not train.exists():
        molflow.simulate("alanine_dipeptide", train, replicas=z["train_replicas"], time_ps=z["train_ps"],
                         frame_fs=z["train_frame_fs"], n_coefficients=0, equilibrate_ps=10.0, seed=21,
                         platform=args.platform, workers=z["workers"]).close()
    if not ref.exists():
        molflow.simulate("alanine_dipeptide", ref, replicas=z["ref_replicas"], time_ps=z["ref_ps"], frame_fs=1000.0,
                         n_coefficients=0, equilibrate_ps=10.0, seed=22, platform=args.platform,
                         workers=z["workers"]).close()
    timings["md_s"] = time.perf_counter() - t0
    system = molflow.load_system("alanine_dipeptide")
    print("eta scan (exact denoiser, toy):", flush=True)
    t0 = time.perf_counter()
    scan = eta_scan(z["eta_scan_samples"], z["eta_scan_steps"])
    timings["eta_scan_s"] = time.perf_counter() - t0
    print("one network or two (cost):", flush=True)
    costs = network_costs(system, z["n_features"], z["n_layers"], dev)
    models = {"networks1": 1}
    if args.compare_networks:
        models["networks2"] = 2
    results, train_info = [], {}
    for label, nets in models.items():
        path = Path(args.model) if (args.model and label == "networks1") else work / f"bg_{label}.pt"
        t0 = time.perf_counter()
        if not (args.model and label == "networks1"):
            molflow.train_boltzmann("alanine_dipeptide", train, path, steps=z["train_steps"], device=str(dev), seed=1,
                                    config=dict(kind="vp", n_features=z["n_features"], n_layers=z["n_layers"],
                                                batch_size=z["batch_size"], networks=nets))
        ck = torch.load(path, map_location="cpu", weights_only=True)
        hist = json.loads(ck["history_json"])
        train_info[label] = {"wall_s": time.perf_counter() - t0, "steps": int(ck["step"]),
                             "training_wall_clock_s": ck.get("training_wall_clock_s"),
                             "final_losses": {k: float(np.mean([h[k] for h in hist[-50:] if k in h]))
                                              for k in ("dsm", "local", "semigroup") if any(k in h for h in hist[-50:])}}
        print(f"{label}: trained {train_info[label]}", flush=True)
        t0 = time.perf_counter()
        results += evaluate_steps(path, ref, work, z, str(dev), label, args.steps, anneal)
        timings[f"sampling_evaluation_{label}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    md_rate = md_effective_rate(ref, system)
    timings["md_effective_rate_s"] = time.perf_counter() - t0
    print(f"MD: tau_int phi {md_rate['tau_int_phi_ps']} ps, psi {md_rate['tau_int_psi_ps']} ps; effective samples per "
          f"CPU-s of stock OpenMM: phi {md_rate['effective_samples_phi_per_cpu_s']}, "
          f"psi {md_rate['effective_samples_psi_per_cpu_s']}", flush=True)
    timings["total_s"] = time.perf_counter() - t_all
    print(f"\n{'model':10s} {'K':>3s} {'JS unw':>7s} {'JS w':>7s} {'FES2d unw':>9s} {'FES2d w':>8s} {'JS MD eq':>8s} "
          f"{'ESS/N':>8s} {'invfail':>7s} {'conf/s':>8s} {'w.conf/s':>8s}")
    for r in results:
        u, w = r["unweighted"], r["reweighted"]
        print(f"{r['model']:10s} {r['steps']:3d} {u['js_phi_psi']:7.3f} {_g(w['weighted'], 'js_phi_psi'):>7s} "
              f"{u['fes_rmse_kj_mol_2d'] or float('nan'):9.2f} {_g(w['weighted'], 'fes_rmse_kj_mol_2d'):>8s} "
              f"{_g(u['equal_cost_md'], 'js_phi_psi'):>8s} {w['ess_fraction']:8.3g} {w['n_invertibility_failures']:7d} "
              f"{u['samples_per_s']:8.3g} {w['samples_per_s']:8.3g}")
    import h5py
    import openmm

    result = {
        "benchmark": "boltzmann", "size": args.size, "system": "alanine_dipeptide",
        "settings": {**z, "steps": list(args.steps), "anneal": None if anneal is None else vars(anneal), "etas": list(ETAS), "device": str(dev), "platform": args.platform,
                     "train_data": str(train), "reference": str(ref), "torch_threads": torch.get_num_threads(),
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "hardware": {"sampler": device_description(dev),
                     "reference_md": _attr(ref, "hardware")},
        "versions": {"molflow": molflow.__version__, "torch": torch.__version__, "openmm": openmm.__version__,
                     "numpy": np.__version__, "h5py": h5py.__version__, "python": platform.python_version()},
        "training": train_info, "md_effective_rate": md_rate, "eta_scan": scan, "network_costs": costs, "results": results, "timings_s": timings,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out} ({timings['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
