"""Benchmark: one-jump quality of the molecular flow map on alanine dipeptide (not a test).

For each N in --coefficients it records (or reuses) reference data at 20 fs frames, trains a flow map
up to tau_max, and on held-out frames measures, for tau in --tau-ps:
  strong error after one jump in `mean` and `sample` modes (heavy-atom RMSD raw and aligned, phi/psi
  RMS error), against (a) BAOAB with step tau driven by the same path increment and (b) the floor
  (`molflow.floor`): mean mode vs floor/sqrt(2), sample mode vs floor;
  kinetic temperature of one-jump samples (on-step, like the reference data) and their phi spread
  against the reference's conditional spread (floor N pair RMS / sqrt(2));
  training throughput (items/s) and inference throughput (molecule-jumps/s).
Prints a table and writes JSON (hardware, versions, settings, every number).

    OMP_NUM_THREADS=1 python benchmarks/flowmap_quality.py --size small --out flowmap_quality_cpu.json
    python benchmarks/flowmap_quality.py --size full --device cuda --out flowmap_quality_gpu.json

Both sizes cover N = 1, 3, 8; the small size uses the same steps and items for every N (about
5 minutes per N on one shared CPU core).
"""
from __future__ import annotations

import argparse
import json
import platform as _pf
import sys
import time
from pathlib import Path

import numpy as np
import torch

import molflow
from molflow.evaluation.dihedrals import phi_psi
from molflow.evaluation.structure import angle_difference, kabsch_rmsd, rmsd
from molflow.md.engine import EnergyEvaluator, hardware_description
from molflow.units import kinetic_temperature
from molflow.training.data import FrameData

SIZES = {
    "small": dict(replicas=4, time_ps=40.0, steps=800, batch_size=16, n_features=32, n_layers=2,
                  floor_starts=8, eval_items=64, coefficients=[1, 3, 8], taus=[0.05, 0.1, 0.2, 0.5]),
    "full": dict(replicas=64, time_ps=500.0, steps=20000, batch_size=64, n_features=64, n_layers=3,
                 floor_starts=32, eval_items=512, coefficients=[1, 3, 8], taus=[0.05, 0.1, 0.2, 0.5, 1.0]),
}


def baoab_one_step(mol, x, v, L0, tau):
    """One BAOAB step of length tau (the engine's scheme at dt = tau) with the path increment L0."""
    ev = EnergyEvaluator(mol, "Reference")
    m = mol.masses_amu[:, None]
    a = np.exp(-mol.friction_per_ps * tau)
    b = np.sqrt(1 - a * a)
    kT = mol.kT_kj_mol
    out_x, out_v = [], []
    for xi_x, xi_v, dW in zip(x, v, L0):
        xi = dW / np.sqrt(tau)
        vv = xi_v + 0.5 * tau * ev.forces(xi_x) / m
        xx = xi_x + 0.5 * tau * vv
        vv = a * vv + b * np.sqrt(kT / m) * xi
        xx = xx + 0.5 * tau * vv
        vv = vv + 0.5 * tau * ev.forces(xx) / m if np.all(np.isfinite(xx)) else vv * np.nan
        out_x.append(xx)
        out_v.append(vv)
    return np.array(out_x), np.array(out_v)


def errors(mol, pred_x, true_x, x0):
    heavy = mol.heavy_atoms
    pp, ps = phi_psi(pred_x, mol)
    tp, ts = phi_psi(true_x, mol)
    finite = np.all(np.isfinite(pred_x), axis=(1, 2))
    if not finite.all():
        return {"heavy_rmsd_raw_nm": None, "heavy_rmsd_aligned_nm": None, "dphi_deg": None, "dpsi_deg": None,
                "note": f"{(~finite).sum()} of {len(finite)} jumps blew up"}
    rms = lambda a: float(np.sqrt(np.mean(np.asarray(a) ** 2)))  # noqa: E731
    return {"heavy_rmsd_raw_nm": rms(rmsd(pred_x[:, heavy], true_x[:, heavy])),
            "heavy_rmsd_aligned_nm": rms(kabsch_rmsd(pred_x[:, heavy], true_x[:, heavy])),
            "dphi_deg": rms(np.degrees(angle_difference(pp, tp))), "dpsi_deg": rms(np.degrees(angle_difference(ps, ts)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default="flowmap_quality_work")
    ap.add_argument("--out", default="flowmap_quality.json")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    cfg = SIZES[args.size]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    mol = molflow.load_system("alanine_dipeptide")
    t0 = time.perf_counter()
    data_path = work / "data_20fs.h5"
    if not data_path.exists():
        molflow.simulate(mol, data_path, replicas=cfg["replicas"], time_ps=cfg["time_ps"], frame_fs=20.0,
                         n_coefficients=8, equilibrate_ps=10.0, seed=args.seed, progress=True).close()
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    floor = molflow.floor(mol, tau_ps=cfg["taus"], n_coefficients=sorted(set(cfg["coefficients"]) | {0}),
                          starts=cfg["floor_starts"], seed=args.seed, progress=True)
    floor_s = time.perf_counter() - t0
    floor_rows = {(r["tau_ps"], r["n_coefficients"]): r for r in floor["rows"]}
    rows = []
    train_info = {}
    for N in cfg["coefficients"]:
        model_path = work / f"model_N{N}.pt"
        t0 = time.perf_counter()
        molflow.train(mol, [str(data_path)], model_path, tau_max_ps=max(cfg["taus"]), n_coefficients=N,
                      steps=cfg["steps"], device=args.device, seed=args.seed,
                      config=dict(batch_size=cfg["batch_size"], n_features=cfg["n_features"],
                                  n_layers=cfg["n_layers"], validate_every=10**9, checkpoint_every=500))
        train_s = time.perf_counter() - t0
        fm = molflow.FlowMap.load(model_path, device=args.device)
        n_params = sum(p.numel() for p in fm.model.parameters())
        train_info[N] = {"train_wall_s": train_s, "params": n_params,
                         "train_items_per_s": cfg["steps"] * cfg["batch_size"] / train_s}
        data = FrameData([str(data_path)], n_coefficients=N)
        rng = np.random.default_rng(7)
        for tau in cfg["taus"]:
            k = int(round(tau / data.h0_ps))
            b = data.batch(cfg["eval_items"], k, rng, split="val", device=fm.device)
            x0, x1 = b["x0"].cpu().numpy(), b["x1"].cpu().numpy()
            row = {"n_coefficients": N, "tau_ps": tau}
            gen = torch.Generator(device=fm.device).manual_seed(1)
            for mode in ("mean", "sample"):
                xt, vt = fm.jump(b["x0"], b["v0"], b["L"], tau, mode=mode, generator=gen)
                e = errors(mol, xt.cpu().numpy(), x1, x0)
                row.update({f"{mode}_{k2}": v for k2, v in e.items()})
                if mode == "sample":
                    v = vt.cpu().numpy()
                    row["sample_kinetic_temperature_K"] = float(kinetic_temperature(v, mol.masses_amu).mean())
                    p_pred, _ = phi_psi(xt.cpu().numpy(), mol)
                    p_0, _ = phi_psi(x0, mol)
                    row["sample_phi_spread_deg"] = float(np.degrees(np.std(angle_difference(p_pred, p_0))))
            row["reference_kinetic_temperature_K"] = float(kinetic_temperature(b["v1"].cpu().numpy(), mol.masses_amu).mean())
            p1, _ = phi_psi(x1, mol)
            row["reference_phi_spread_deg"] = float(np.degrees(np.std(angle_difference(p1, phi_psi(x0, mol)[0]))))
            bx, _ = baoab_one_step(mol, x0.astype(np.float64), b["v0"].cpu().numpy().astype(np.float64),
                                   b["L"].cpu().numpy()[:, 0].astype(np.float64), tau)
            row.update({f"baoab_{k2}": v for k2, v in errors(mol, bx, x1, x0).items()})
            fl = floor_rows.get((tau, N))
            if fl:
                row["floor_heavy_rmsd_raw_nm"] = fl["heavy_rmsd_raw_nm"]
                row["floor_heavy_rmsd_aligned_nm"] = fl["heavy_rmsd_aligned_nm"]
                row["floor_dphi_deg"] = fl["dphi_deg"]
                row["conditional_phi_spread_deg"] = fl["dphi_deg"] / np.sqrt(2)
            rows.append(row)
        # inference throughput: molecule-jumps per second at batch 256
        B = 256
        x = b["x0"][:1].expand(B, -1, -1).contiguous()
        v = b["v0"][:1].expand(B, -1, -1).contiguous()
        L = b["L"][:1].expand(B, -1, -1, -1).contiguous()
        fm.jump(x, v, L, 0.1)
        if fm.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            fm.jump(x, v, L, 0.1)
        if fm.device.type == "cuda":
            torch.cuda.synchronize()
        train_info[N]["inference_molecule_jumps_per_s"] = reps * B / (time.perf_counter() - t0)
    import openmm

    result = {"benchmark": "flowmap_quality", "size": args.size, "system": "alanine_dipeptide",
              "settings": {**cfg, "frame_fs": 20.0, "seed": args.seed, "device": str(fm.device)},
              "hardware": {"torch_device": str(fm.device), "md": hardware_description("CPU"),
                           "torch_threads": torch.get_num_threads(),
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "versions": {"molflow": molflow.__version__, "torch": torch.__version__, "openmm": openmm.__version__,
                           "python": _pf.python_version()},
              "timing_s": {"data": data_s, "floor": floor_s}, "training": train_info, "rows": rows,
              "floor": floor}
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    f = lambda v: "   n/a  " if v is None else f"{v:8.4f}"  # noqa: E731
    print(f"\n{'N':>2s} {'tau':>5s} | {'mean raw':>8s} {'mean aln':>8s} {'floor/√2':>8s} | {'samp raw':>8s} "
          f"{'samp aln':>8s} {'floor':>8s} | {'baoab':>8s} | {'T_samp':>6s} {'T_ref':>6s} | {'dphi_m':>6s} {'dphi_s':>6s} {'fl dphi':>7s}")
    for r in rows:
        fa = r.get("floor_heavy_rmsd_aligned_nm")
        print(f"{r['n_coefficients']:2d} {r['tau_ps']:5.2f} | {f(r['mean_heavy_rmsd_raw_nm'])} {f(r['mean_heavy_rmsd_aligned_nm'])} "
              f"{f(fa / np.sqrt(2) if fa else None)} | {f(r['sample_heavy_rmsd_raw_nm'])} {f(r['sample_heavy_rmsd_aligned_nm'])} "
              f"{f(fa)} | {f(r['baoab_heavy_rmsd_raw_nm'])} | {r['sample_kinetic_temperature_K']:6.1f} "
              f"{r['reference_kinetic_temperature_K']:6.1f} | {r['mean_dphi_deg']:6.1f} {r['sample_dphi_deg']:6.1f} "
              f"{r.get('floor_dphi_deg', float('nan')):7.1f}")
    for N, info in train_info.items():
        print(f"N={N}: {info['params']} params, training {info['train_wall_s']:.0f} s "
              f"({info['train_items_per_s']:.0f} items/s), inference {info['inference_molecule_jumps_per_s']:.0f} molecule-jumps/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
