"""An umbrella-sampling reference for alanine dipeptide's phi free energy (issue 17).

    python benchmarks/phi_umbrella.py --out benchmarks/results/phi_umbrella_cpu.json \\
        [--compare ref_100fs.h5 W/rollout.h5 ...] [--windows 36] [--k 200] [--ps 400] [--workers 2]

Why: plain MD crosses from phi < 0 into alpha_L / C7ax (phi > 0) about twice per 100 ns, and one
visit lasts from ~0.1 ps to several ns, so the alpha_L population of a 100-ns reference rests on one
or two events (two 100-ns references made with the same protocol: 0.01% and 3.8%). Umbrella sampling
pins it down: ``--windows`` harmonic restraints on phi (``--k`` kJ/mol/rad^2, centres every 360 /
windows deg), each sampled for ``--ps`` ps (after 10 ps of equilibration; frames every 0.1 ps) with
stock OpenMM (LangevinMiddleIntegrator, the system's force field, temperature, friction and step,
Reference platform), in two chains of neighbouring windows (one from phi = -80 deg upwards, one
downwards) on ``--workers`` processes. The windows are unbiased jointly by MBAR (self-consistent
free energies of the windows; every frame gets the weight 1 / sum_k N_k exp(f_k - u_k)), which gives
the Boltzmann law of (phi, psi) without any rare-event wait. Errors: a block bootstrap (blocks of
``--block-ps`` ps resampled within each window, ``--bootstrap`` times).

Reported (JSON and table): the basin populations (molflow.evaluation.metrics.BASINS; alpha_L_C7ax is
phi > 0) and the phi free-energy profile (64 bins, kJ/mol, zero at its minimum); for each
``--compare`` file (a molflow run: a reference or sampled rollouts), its basin populations, JS(phi, psi)
against the umbrella law, also for the law given phi < 0 (beta and alpha_R, both sides renormalised:
what a map that never enters alpha_L can be judged on), and the psi free-energy RMSE
(molflow.evaluation.metrics, the evaluator's conventions; no phi or 2-D RMSE: the umbrella samples
every phi bin up to the barrier tops, which plain MD never visits, and the evaluator's RMSE charges
each such bin), over all its replicas and, for a reference, over each evaluator half.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _phi_profile(phi, w, kT, bins=64) -> list[float | None]:
    h, _ = np.histogram(phi, bins=bins, range=(-np.pi, np.pi), weights=w)
    with np.errstate(divide="ignore"):
        F = -kT * np.log(h / h.sum())
    F -= F[np.isfinite(F)].min()
    return [float(v) if np.isfinite(v) else None for v in F]


def _read_run(path: str, mol, stride_ps: float = 0.5):
    """(phi, psi) (replicas, frames) of a molflow run file, one frame per ``stride_ps`` ps."""
    from molflow import Trajectory
    from molflow.evaluation.dihedrals import phi_psi

    with Trajectory(path) as t:
        time_ps = np.asarray(t.time[:2], dtype=float)
        step = max(1, int(round(stride_ps / float(time_ps[1] - time_ps[0])))) if len(time_ps) > 1 else 1
        x = np.asarray(t.positions[:, ::step], dtype=np.float64)
    R, T = x.shape[:2]
    phi, psi = phi_psi(x.reshape(R * T, -1, 3), mol)
    return np.asarray(phi).reshape(R, T), np.asarray(psi).reshape(R, T)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, default=36)
    ap.add_argument("--k", type=float, default=200.0, help="restraint constant, kJ/mol/rad^2 (default 200)")
    ap.add_argument("--ps", type=float, default=400.0, help="production per window, ps (default 400)")
    ap.add_argument("--equilibrate-ps", type=float, default=10.0)
    ap.add_argument("--frame-fs", type=float, default=100.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--block-ps", type=float, default=20.0)
    ap.add_argument("--bootstrap", type=int, default=20)
    ap.add_argument("--compare", nargs="*", default=[], help="molflow run files to score against the umbrella law")
    ap.add_argument("--samples-out", help="optional .npz with every frame's phi, psi (rad), positions (nm, float32), "
                    "window and unbiasing weight")
    ap.add_argument("--samples-in", help="reuse the windows of an earlier --samples-out (no MD; the JSON says so)")
    args = ap.parse_args()

    import openmm
    import torch

    import molflow
    from molflow.md.engine import hardware_description
    from molflow.md.umbrella import UmbrellaSettings, mbar_weights, reduced_bias, sample_phi_windows
    from molflow.systems import load_system

    mol = load_system("alanine_dipeptide")
    kT = mol.kT_kj_mol
    t0 = time.perf_counter()
    if args.samples_in:  # an earlier run's windows (no MD)
        z = dict(np.load(args.samples_in))
        md_s = None
    else:
        z = sample_phi_windows("alanine_dipeptide", UmbrellaSettings(
            windows=args.windows, k_kj_mol_rad2=args.k, production_ps=args.ps, equilibrate_ps=args.equilibrate_ps,
            frame_fs=args.frame_fs, seed=args.seed, workers=args.workers))
        md_s = time.perf_counter() - t0
        if args.samples_out:  # the windows first: the MD is the expensive part
            np.savez_compressed(args.samples_out, **z)
    cen, phi, psi, win = z["centres"], z["phi"], z["psi"], z["window"]
    n_k = np.bincount(win, minlength=len(cen)).astype(float)
    w = mbar_weights(reduced_bias(phi, cen, args.k, kT), n_k)
    pops = basin_shares(phi, psi, w)

    # block bootstrap within windows (frames every 0.5 ps for speed)
    rng = np.random.default_rng(args.seed)
    block = max(1, int(round(args.block_ps * 1000.0 / args.frame_fs)))
    boot = []
    for _ in range(args.bootstrap):
        idx = []
        for k_ in range(len(cen)):
            lo = int(n_k[:k_].sum())
            nb = int(n_k[k_]) // block
            pick = rng.integers(0, nb, nb)
            idx.append((lo + pick[:, None] * block + np.arange(0, block, 5)[None, :]).ravel())
        idx = np.concatenate(idx)
        nk_b = np.bincount(win[idx], minlength=len(cen)).astype(float)
        wb = mbar_weights(reduced_bias(phi[idx], cen, args.k, kT), nk_b)
        boot.append(basin_shares(phi[idx], psi[idx], wb))
    se = {name: float(np.std([b[name] for b in boot], ddof=1)) for name in boot[0]} if len(boot) > 1 else {}
    pop = {name: {"population": pops[name], "se_block_bootstrap": se.get(name)}
           for name in ("beta", "alpha_R", "alpha_L_C7ax")}
    F = _phi_profile(phi, w, kT)
    print(f"umbrella: {len(cen)} windows x {args.ps:g} ps, k {args.k:g} kJ/mol/rad^2 "
          + (f"({md_s:.0f} s)" if md_s is not None else f"(windows read from {args.samples_in})"))
    print("populations: " + ", ".join(f"{n} {p['population']:.4f} +- {p['se_block_bootstrap'] or 0:.4f}"
                                      for n, p in pop.items()))

    compared = []
    for path in args.compare:
        ph, ps_ = _read_run(path, mol)
        ok = np.isfinite(ph) & np.isfinite(ps_)
        parts = {"all replicas": np.arange(ph.shape[0])}
        if ph.shape[0] >= 2 and ph.shape[0] <= 16:
            h = ph.shape[0] // 2
            parts.update({"held-out half H": np.arange(h), "judge half J": np.arange(h, ph.shape[0])})
        for label, reps in parts.items():
            a, b = ph[reps][ok[reps]], ps_[reps][ok[reps]]
            row = {"file": "/".join(Path(path).parts[-2:]), "part": label, "replicas": int(len(reps)),
                   "frames": int(a.size),
                   "alpha_L_C7ax_per_replica": [float(np.mean(ph[r][ok[r]] > 0)) for r in reps] if len(reps) <= 16 else None,
                   **compare_to_umbrella(phi, psi, w, a, b, kT)}
            bp = row["populations"]
            compared.append(row)
            print(f"{row['file']} ({label}): alpha_L_C7ax {bp['alpha_L_C7ax']:.4f}, alpha_R {bp['alpha_R']:.3f}; "
                  f"vs umbrella: JS {row['js_phi_psi_vs_umbrella']:.4f}, given phi < 0 "
                  f"{row['js_phi_psi_vs_umbrella_given_phi_negative']:.4f}; psi FES RMSE "
                  f"{row['fes_rmse_psi_kj_mol_vs_umbrella']:.2f} kJ/mol")

    result = {"benchmark": "phi_umbrella", "settings": vars(args), "windows_deg": np.degrees(cen).tolist(),
              "frames_per_window": n_k.astype(int).tolist(), "md_wall_s": md_s, "populations": pop,
              "phi_free_energy_kj_mol_64_bins": F, "compared": compared,
              "hardware": hardware_description("CPU"), "openmm": openmm.__version__, "torch": torch.__version__,
              "molflow": molflow.__version__, "python": platform.python_version(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


def compare_to_umbrella(phi_u: np.ndarray, psi_u: np.ndarray, w_u: np.ndarray, phi: np.ndarray, psi: np.ndarray,
                        kT: float, weights: np.ndarray | None = None) -> dict:
    """How samples (phi, psi) (rad, any shape; ``weights`` optional, e.g. importance weights) compare with
    the umbrella law (frames phi_u, psi_u with unbiasing weights w_u): their basin populations, JS(phi,
    psi) against it, also for the law given phi < 0 (both sides renormalised), and the psi and (phi,
    psi) free-energy RMSEs (kJ/mol, over the bins the umbrella law populates)."""
    from molflow.evaluation.metrics import fes_rmse_1d, fes_rmse_2d, js_phi_psi

    a, b = np.asarray(phi, dtype=np.float64).ravel(), np.asarray(psi, dtype=np.float64).ravel()
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(w)
    a, b, w = a[ok], b[ok], w[ok]
    neg, neg_u = a < 0, phi_u < 0
    return {"populations": basin_shares(a, b, w),
            "fes_rmse_psi_kj_mol_vs_umbrella": fes_rmse_1d(psi_u, b, kT, weights_ref=w_u, weights=w),
            "fes_rmse_phi_psi_kj_mol_vs_umbrella": fes_rmse_2d(phi_u, psi_u, a, b, kT, weights_ref=w_u, weights=w),
            "js_phi_psi_vs_umbrella": js_phi_psi(phi_u, psi_u, a, b, weights_a=w_u, weights_b=w),
            "js_phi_psi_vs_umbrella_given_phi_negative": js_phi_psi(phi_u[neg_u], psi_u[neg_u], a[neg], b[neg],
                                                                    weights_a=w_u[neg_u], weights_b=w[neg])}


def basin_shares(phi, psi, w=None) -> dict[str, float]:
    """Basin populations (molflow.evaluation.metrics.BASINS) of (phi, psi) samples with weights w."""
    from molflow.evaluation.metrics import basin_populations

    bp = basin_populations(phi, psi, weights=w, n_bootstrap=0)
    return {n: float(bp[n]["population"]) for n in ("beta", "alpha_R", "alpha_L_C7ax")}


if __name__ == "__main__":
    sys.exit(main())
