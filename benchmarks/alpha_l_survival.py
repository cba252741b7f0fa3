"""Does a map stay in alpha_L when it starts there, and does it leave as fast as MD? (issue 17)

    python benchmarks/alpha_l_survival.py --model systems/alanine_dipeptide/flowmap.pt \\
        --umbrella W/umbrella.npz --variant as-is --variant flat-landscape --variant no-drive \\
        --out benchmarks/results/alpha_l_survival_cpu.json
    python benchmarks/alpha_l_survival.py --model systems/alanine_dipeptide/flowmap.pt \\
        --exit-md W/md_alpha_l_2ns.h5 --record-md --out benchmarks/results/alpha_l_exit_rate_cpu.json

Starts ``--replicas`` free-running rollouts at tau_max from alpha_L frames (phi > 0.3 rad) drawn by
their unbiasing weights from umbrella windows (``benchmarks/phi_umbrella.py --samples-out``), with
Maxwell-Boltzmann velocities and the map's recommended finish, and reports the fraction of replicas
at phi > 0 after 0.5, 1, 5, 25 and 100 ps. In MD alpha_L is left at about 0.5 per ns (the 100-ns
reference: 2 visits of 0.9 and 2.95 ns; umbrella sampling puts 2.65% of the Boltzmann law there), so
most replicas should still be there after 100 ps. Variants isolate the parts of the map: ``as-is``;
``flat-landscape`` (the torsion drive's landscape tables set to zero); ``no-drive`` (the drive's turn
set to zero: the network's jump and the finish only).

**Exit rate against MD** (``--exit-md FILE``): the slowest process of alanine dipeptide is the alpha_L
exchange, and 100 ns of MD hold two visits, too few to judge a map's phi kinetics. Instead, MD and
the map both start in alpha_L and the rate of leaving it is counted: ``--record-md`` first records
FILE with stock OpenMM (``molflow.simulate``: the built-in structure turned to (phi, psi) = (1.0,
0.6) rad, minimised, 5 ps of equilibration per replica, ``--md-replicas`` x ``--md-ns``, 0.5-ps
frames, seed 20261208); the map then runs from each MD replica's first frame (positions and
velocities) for as long, with its recommended finish. A replica has left when phi reaches the
beta/alpha_R core (-150 to -30 deg; core sets as the evaluator's flip count, molflow.evaluation.
metrics.phi_core_states). The exit rate is the exponential law's maximum-likelihood estimate, exits
over the total time spent before exit or the run's end (censored), with a Poisson standard error
rate / sqrt(exits). Since alpha_L is rare (2.65% of the law), the slowest implied timescale is
about 1 / exit rate and the flip rate 2 pi_alpha_L x exit rate: their ratios to MD's follow.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

CHECK_PS = (0.5, 1.0, 5.0, 25.0, 100.0)


def phi_per_frame(x_nm: np.ndarray, system) -> np.ndarray:
    """phi (rad) of every frame of runs x (R, F, A, 3) nm, as (R, F)."""
    from molflow.evaluation.dihedrals import phi_psi

    return np.asarray(phi_psi(x_nm.reshape(-1, x_nm.shape[2], 3), system)[0]).reshape(x_nm.shape[:2])


def survival(model: str, umbrella: str, variant: str, replicas: int, seed: int) -> dict:
    import molflow
    from molflow.sampling import maxwell_boltzmann_velocities

    fm = molflow.FlowMap.load(model, device="cpu")
    drive = fm.model.drive
    if variant == "flat-landscape":
        with torch.no_grad():
            for name in ("landscape", "landscape_pair"):
                if hasattr(drive, name):
                    getattr(drive, name).zero_()
    elif variant == "no-drive":
        drive.delta = lambda inv, pseudo, tau: torch.zeros(pseudo.shape[:-1], dtype=pseudo.dtype)
    elif variant != "as-is":
        raise SystemExit(f"unknown variant {variant!r}")
    z = np.load(umbrella)
    w = z["weight"] * (z["phi"] > 0.3)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(w), size=replicas, p=w / w.sum())
    x0 = z["positions"][pick].astype(np.float64)
    m = fm.system.masses_amu
    v0 = maxwell_boltzmann_velocities(fm.system, replicas, rng)
    v0 -= (v0 * m[None, :, None]).sum(1, keepdims=True) / m.sum()  # no drift of the centre of mass
    tau = fm.tau_max_ps
    n_jumps = int(round(max(CHECK_PS) / tau))
    r = fm.sample((x0, v0), n_jumps, tau, replicas=replicas, seed=seed, progress=False)
    x = r["positions"]
    phi = phi_per_frame(x, fm.system)
    inside = phi > 0
    return {"variant": variant, "replicas": replicas, "tau_ps": tau,
            "fraction_in_alpha_L": {f"{t:g}ps": float(inside[:, int(round(t / tau))].mean()) for t in CHECK_PS},
            "phi_after_first_jump_deg": np.degrees(phi[:, 1]).round(1).tolist()}


def exit_rate(phi_rad: np.ndarray, dt_ps: float) -> dict:
    """Exits from the alpha_L core to the beta/alpha_R core in phi (R, F) rad, frames every dt_ps."""
    from molflow.evaluation.metrics import phi_core_states

    states = phi_core_states(phi_rad)
    R, F = states.shape
    exits, time_ps, first = 0, 0.0, []
    for r in range(R):
        out = np.flatnonzero(states[r] == 0)
        if out.size:
            exits += 1
            time_ps += out[0] * dt_ps
            first.append(out[0] * dt_ps)
        else:
            time_ps += (F - 1) * dt_ps
    rate = exits / time_ps * 1000.0 if time_ps > 0 else float("nan")
    return {"replicas": R, "run_ps": (F - 1) * dt_ps, "exits": exits, "time_in_alpha_L_ps": time_ps,
            "exit_rate_per_ns": rate, "exit_rate_se_per_ns": rate / np.sqrt(exits) if exits else float("nan"),
            "started_in_alpha_L_core": int((states[:, 0] == 1).sum()),
            "first_exit_ps": sorted(first)}


def record_md(path: str, replicas: int, ns: float) -> float:
    """MD started in alpha_L (module docstring); returns its wall seconds."""
    import time

    import molflow
    from molflow.md.umbrella import system_at_backbone_dihedrals

    t0 = time.perf_counter()
    start = system_at_backbone_dihedrals(molflow.load_system("alanine_dipeptide"), 1.0, 0.6)
    molflow.simulate(start, path, replicas=replicas, time_ps=1000.0 * ns, frame_fs=500.0, n_coefficients=0,
                     equilibrate_ps=5.0, seed=20261208, workers=2, resume=True, progress=True).close()
    return time.perf_counter() - t0


def exit_rates(model: str, md_path: str, seed: int) -> dict:
    """The map's and MD's alpha_L exit rates from the MD file's first frames (module docstring)."""
    import time

    import molflow

    fm = molflow.FlowMap.load(model, device="cpu")
    with molflow.Trajectory(md_path) as t:
        x_md = np.asarray(t.positions[:, :], dtype=np.float64)
        x0, v0 = x_md[:, 0], np.asarray(t.velocities[:, 0], dtype=np.float64)
        dt = t.frame_interval_ps
    R, F = x_md.shape[:2]
    phi_md = phi_per_frame(x_md, fm.system)
    tau = fm.tau_max_ps
    n_jumps = int(round((F - 1) * dt / tau))
    t0 = time.perf_counter()
    r = fm.sample((x0, v0), n_jumps, tau, replicas=R, seed=seed, progress=True)
    map_s = time.perf_counter() - t0
    phi_map = phi_per_frame(r["positions"], fm.system)
    md, mp_ = exit_rate(phi_md, dt), exit_rate(phi_map, tau)
    ratio = mp_["exit_rate_per_ns"] / md["exit_rate_per_ns"]
    ratio_se = ratio * np.sqrt(1 / max(md["exits"], 1) + 1 / max(mp_["exits"], 1))
    return {"md": md, "map": mp_, "map_wall_s": map_s, "map_restarts": int(r["restarts_per_replica"].sum()),
            "exit_rate_ratio_map_over_md": ratio, "exit_rate_ratio_se": ratio_se,
            "slowest_its_ratio_map_over_md_approx": 1.0 / ratio}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--umbrella", help="phi_umbrella.py --samples-out file (with positions; for --variant)")
    ap.add_argument("--exit-md", metavar="FILE", help="MD started in alpha_L (see --record-md): compare exit rates")
    ap.add_argument("--record-md", action="store_true", help="record --exit-md first (resumes a partial file)")
    ap.add_argument("--md-replicas", type=int, default=64)
    ap.add_argument("--md-ns", type=float, default=2.0)
    ap.add_argument("--variant", action="append", help="as-is | flat-landscape | no-drive (repeat; default as-is)")
    ap.add_argument("--replicas", type=int, default=32)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import molflow
    from molflow.md.engine import hardware_description

    rows = []
    res = {}
    if args.exit_md:
        if args.record_md:
            res["md_wall_s"] = record_md(args.exit_md, args.md_replicas, args.md_ns)
        res["exit"] = e = exit_rates(args.model, args.exit_md, args.seed)
        for k in ("md", "map"):
            print(f"{k}: {e[k]['exits']} exits of {e[k]['replicas']} in {e[k]['run_ps']:g} ps, "
                  f"rate {e[k]['exit_rate_per_ns']:.3f} +- {e[k]['exit_rate_se_per_ns']:.3f} per ns", flush=True)
        print(f"map / MD exit rate {e['exit_rate_ratio_map_over_md']:.2f} +- {e['exit_rate_ratio_se']:.2f}", flush=True)
    elif not args.umbrella:
        raise SystemExit("--variant needs --umbrella")
    for v in (args.variant or ["as-is"]) if args.umbrella else []:
        rows.append(survival(args.model, args.umbrella, v, args.replicas, args.seed))
        print(f"{v}: fraction at phi > 0 after " + ", ".join(f"{k} {f:.2f}" for k, f in rows[-1]["fraction_in_alpha_L"].items()),
              flush=True)
    res = {"benchmark": "alpha_l_survival", "model": args.model, "rows": rows, **res, "hardware": hardware_description("CPU"),
           "torch": torch.__version__, "molflow": molflow.__version__, "python": platform.python_version(),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
