"""Where a long free-running rollout's phi law departs from the umbrella law, and how it crosses (issue 17).

    python benchmarks/phi_stationary_analysis.py --rollout W/rollout_shipped25_tau0.5.h5 \\
        --umbrella W/umbrella.npz --out benchmarks/results/phi_stationary_shipped.json

For a rollout file of ``benchmarks/fidelity_cpu.py`` (or any run file of alanine dipeptide):

- **handedness**: per replica, the share of frames whose Calpha is inverted (D-alanine; molflow's
  sampler now restarts such jumps, older rollouts have them); the statistics below use each replica's
  frames before its first inversion only (a D replica's phi is the mirror of an L one's: its alpha_R
  lands in alpha_L's range);
- **free-energy difference** dF(phi) = -ln(p_rollout / p_umbrella) per 10-degree bin, in kT, offset so
  that the beta/alpha_R core (-150..-30 deg) carries the same mass in both;
- **crossings**: entries into and exits from the alpha_L core (evaluator's core sets, hysteresis) split
  by route — through phi = 0 or through phi = +-180 deg (the sign of the unwrapped change) — and the
  rates per ns of time spent in the core left;
- one-frame crossings of the phi ~ 120-180 deg barrier: consecutive frames, one in the alpha_L core
  range (30..100 deg) and one at phi <= -100 deg (the short way round is through +-180), per ns spent
  in the alpha_L core;
- the alpha_L population (evaluator's basin definition).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def analyse(path: str, umbrella: str) -> dict:
    import molflow
    from molflow.boltzmann.geometry import ChiralityChecker
    from molflow.evaluation.dihedrals import phi_psi
    from molflow.evaluation.metrics import basin_populations, phi_core_states

    system = molflow.load_system("alanine_dipeptide")
    chk = ChiralityChecker.for_system(system)
    phis, psis, inverted = [], [], []
    routes = {"entries": {"via_0": 0, "via_180": 0}, "exits": {"via_0": 0, "via_180": 0}}
    t_in = t_out = 0.0
    one_frame_180 = 0
    with molflow.Trajectory(path) as t:
        dt = float(t.frame_interval_ps)
        for r in range(t.n_replicas):
            x = np.asarray(t.positions[r], dtype=np.float64)
            x = x[np.isfinite(x).all(axis=(1, 2))]
            ok = chk.classify(x) == 1
            inverted.append(float((~ok).mean()) if len(ok) else 0.0)
            if not ok.all():
                x = x[:int(np.argmin(ok))]
            if len(x) < 2:
                continue
            ph, ps = (np.asarray(a).ravel() for a in phi_psi(x[None], system))
            phis.append(ph)
            psis.append(ps)
            st = phi_core_states(ph)
            deg = np.degrees(ph)
            a, b = deg[:-1], deg[1:]
            one_frame_180 += int((((a >= 30) & (a <= 100) & (b <= -100)) | ((b >= 30) & (b <= 100) & (a <= -100))).sum())
            t_in += (st == 1).sum() * dt
            t_out += (st == 0).sum() * dt
            u = np.unwrap(ph)
            last = {0: None, 1: None}  # the last frame inside each core
            for i in range(len(st)):
                deg = np.degrees(ph[i])
                if -150 <= deg <= -30:
                    last[0] = i
                elif 30 <= deg <= 100:
                    last[1] = i
                if i and st[i] != st[i - 1] and st[i - 1] >= 0:
                    j = last[st[i - 1]]
                    up = u[i] - u[j] > 0
                    if st[i] == 1:
                        routes["entries"]["via_0" if up else "via_180"] += 1
                    else:
                        routes["exits"]["via_0" if not up else "via_180"] += 1
    ph, ps = np.concatenate(phis), np.concatenate(psis)
    z = np.load(umbrella)
    bins = np.linspace(-np.pi, np.pi, 37)
    hm = np.histogram(ph, bins)[0].astype(float)
    hu = np.histogram(z["phi"], bins, weights=z["weight"])[0]
    hm, hu = hm / hm.sum(), hu / hu.sum()
    c = np.degrees(0.5 * (bins[1:] + bins[:-1]))
    core = (c >= -150) & (c <= -30)
    with np.errstate(divide="ignore"):
        dF = -(np.log(hm) - np.log(hu)) + np.log(hm[core].sum() / hu[core].sum())
    n_e = sum(routes["entries"].values())
    n_x = sum(routes["exits"].values())
    return {"rollout": path, "replicas": len(inverted), "frame_ps": dt,
            "share_inverted_per_replica": inverted, "replicas_with_inversion": int(sum(v > 0 for v in inverted)),
            "l_frames_ns": len(ph) * dt / 1000.0,
            "alpha_L_population": float(basin_populations(ph, ps, n_bootstrap=0)["alpha_L_C7ax"]["population"]),
            "routes": routes, "entry_rate_per_ns": n_e / t_out * 1000.0 if t_out else None,
            "exit_rate_per_ns": n_x / t_in * 1000.0 if t_in else None,
            "one_frame_crossings_via_180": one_frame_180, "time_in_alpha_L_core_ns": t_in / 1000.0,
            "one_frame_crossings_via_180_per_ns_in_alpha_L": one_frame_180 / t_in * 1000.0 if t_in else None,
            "dF_kT_vs_umbrella": {f"{ci:g}": (None if not np.isfinite(d) else float(d)) for ci, d in zip(c, dF)},
            "p_rollout": hm.tolist(), "p_umbrella": hu.tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollout", action="append", required=True)
    ap.add_argument("--umbrella", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = [analyse(p, args.umbrella) for p in args.rollout]
    for r in res:
        print(f"{r['rollout']}: {r['replicas_with_inversion']} of {r['replicas']} replicas inverted; "
              f"L frames {r['l_frames_ns']:.0f} ns, alpha_L {r['alpha_L_population']:.4f}, entries {r['routes']['entries']} "
              f"({r['entry_rate_per_ns']:.4f}/ns), exits {r['routes']['exits']} ({r['exit_rate_per_ns']:.3f}/ns); "
              f"one-frame crossings through 180: {r['one_frame_crossings_via_180']} "
              f"({r['one_frame_crossings_via_180_per_ns_in_alpha_L']:.3f} per ns in alpha_L)")
        print("  dF/kT: " + " ".join(f"{k}:{v:.2f}" for k, v in r["dF_kT_vs_umbrella"].items() if v is not None))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "phi_stationary_analysis", "umbrella": args.umbrella,
                                          "results": res}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
