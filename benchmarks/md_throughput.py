"""Benchmark: the reference engine against stock OpenMM, and its aggregate ns/day (not a test).

Part 1, per core against stock OpenMM (DESIGN.md section 10: speed is a ratio measured in one run).
One replica of alanine dipeptide, 1 fs steps, frames every ``--frame-fs``: stock OpenMM's
``LangevinMiddleIntegrator`` (same force field and protocol, NoCutoff, on the faster of Reference
and CPU with one thread, chosen by measurement in the run; a position read per frame, as a
reporter would) against molflow's engine as ``molflow simulate`` runs it (platform and layout
from ``plan_layout``, the engine's own ``Group``: steps, coefficient read-out, frame read, guards;
HDF5 writing excluded) at N = 0, 3, 8. They run interleaved, ``--rounds`` rounds of
``--frames`` frames each in alternating order; per round the ratio stock time / molflow time is
taken, and the table reports medians: us per step by thread CPU time (the machine's other core
may be busy; the CPU time of one thread is what "per core" means) and by wall clock.
Target (issue 18): N = 3 at >= 0.8x stock's steps per second. On CPU platforms the engine draws the
per-step Gaussians in numpy (host noise, :func:`molflow.md.engine.host_noise_for`); ``--openmm-noise 3``
adds an N = 3 row with OpenMM drawing them and accumulating the coefficients (the GPU program), in
the same interleaved rounds.

Part 2: for R = 1, 8, 64, 512, 2048 replicas of alanine dipeptide on every OpenMM platform present, with
and without coefficient recording (N = 3 vs 0), it runs the real engine (`molflow.simulate`, the
platform's default replica layout) and reads its steady-state throughput (setup and
equilibration excluded), then prints a table and writes JSON with hardware, versions and settings.

    python benchmarks/md_throughput.py --size small --out md_throughput.json   # CPU-sized
    python benchmarks/md_throughput.py --compare-only --out md_throughput_stock.json  # part 1 only
    python benchmarks/md_throughput.py --size full --platforms CUDA --out md_throughput_gpu.json

Target on a GPU (issue #2): >= 300 us/day aggregate with recording at 512+ copies on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _pf
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import molflow
from molflow.md.engine import (GPU_PLATFORMS, Group, GroupStart, RunSpec, available_platforms, cpu_description,
                               hardware_description, host_noise_for, minimise, plan_layout, resolve_platform)
from molflow.md.multicopy import default_cutoff_nm
from molflow.md.stock import stock_context, stock_speed, time_call
from molflow.systems import load_system

SIZES = {  # replicas -> simulated ps per replica (enough chunks for a steady-state rate)
    "small": {"CPU": {1: 20, 8: 5, 64: 1}, "Reference": {1: 20, 8: 3}, "GPU": {1: 20, 8: 20, 64: 20, 512: 10, 2048: 5}},
    "full": {"CPU": {1: 50, 8: 20, 64: 4, 512: 1, 2048: 0.5}, "Reference": {1: 50, 8: 10, 64: 2},
             "GPU": {1: 50, 8: 50, 64: 50, 512: 20, 2048: 10}},
}


def run_one(platform: str, replicas: int, time_ps: float, n_coefficients: int, workdir: Path) -> dict:
    out = workdir / f"{platform}_{replicas}_{n_coefficients}.h5"
    t0 = time.perf_counter()
    traj = molflow.simulate("alanine_dipeptide", out, replicas=replicas, time_ps=time_ps, frame_fs=100,
                            n_coefficients=n_coefficients, equilibrate_ps=0.0, platform=platform, seed=1,
                            overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    a = traj.attrs
    traj.close()
    out.unlink()
    rate = float(a.get("throughput_ns_per_day", float("nan")))
    return {"platform": platform, "replicas": replicas, "n_coefficients": n_coefficients,
            "time_ps_per_replica": time_ps, "copies_per_context": a["copies_per_context"],
            "platform_used": a["platform"], "ns_per_day_aggregate": rate, "us_per_day_aggregate": rate / 1000,
            "ns_per_day_per_replica": rate / replicas, "wall_s_total": wall}


def stock_comparison(frame_fs: float, frames: int, rounds: int, n_values=(0, 3, 8), openmm_noise_n=()) -> dict:
    """Part 1 (module docstring): interleaved stock OpenMM vs molflow's engine, per core.

    ``openmm_noise_n``: N values also run with OpenMM drawing the Gaussians and accumulating the
    coefficients (the GPU program) instead of the engine's choice for this platform."""
    mol = load_system("alanine_dipeptide")
    x0 = minimise(mol)
    K = int(round(frame_fs / mol.timestep_fs))
    # stock OpenMM on its best CPU platform (one thread), chosen by measurement
    trial_run = stock_speed(mol, steps=500, x0=x0)
    trial, stock_platform = trial_run["us_per_step_by_platform"], trial_run["platform"]
    s_ctx, s_integ = stock_context(mol, x0, stock_platform, seed=7)

    def stock_frames():
        for _ in range(frames):
            s_integ.step(K)
            s_ctx.getState(getPositions=True).getPositions(asNumpy=True)

    # molflow's engine exactly as `molflow simulate` plans one replica on this machine
    platform, cpc = plan_layout(mol, 1, "auto", resolve_platform("auto"), None, os.cpu_count() or 1)
    ours, groups = {}, {}
    for n, noise in [(n, None) for n in n_values] + [(n, "openmm") for n in openmm_noise_n]:
        spec = RunSpec(pdb_text=mol.pdb_text, forcefield=tuple(mol.forcefield_files), name=mol.name,
                       temperature_K=mol.temperature_K, friction_per_ps=mol.friction_per_ps,
                       timestep_fs=mol.timestep_fs, steps_per_frame=K, n_coefficients=n, platform=platform,
                       threads=1, deterministic=False, cutoff_nm=default_cutoff_nm(mol.positions_nm), seed=11,
                       equilibration_steps=1000, start_positions_nm=x0)
        g = Group(spec, 0, cpc, mol, host_noise=False if noise == "openmm" else None)
        g.start(GroupStart("fresh"))
        name = f"molflow N={n}" + (", openmm noise" if noise else "")
        groups[name] = g
        gen = g.run(10 ** 9)
        ours[name] = lambda gen=gen: [next(gen) for _ in range(frames)]
    runs = {"stock": stock_frames, **ours}
    cpu = {k: [] for k in runs}
    wall = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            c, w = time_call(runs[k])
            cpu[k].append(c / (frames * K) * 1e6)
            wall[k].append(w / (frames * K) * 1e6)
    rows = []
    for k in names:
        c, w = np.array(cpu[k]), np.array(wall[k])
        rows.append({"what": k, "platform": stock_platform if k == "stock" else platform,
                     "copies_per_context": 1 if k == "stock" else cpc,
                     "n_coefficients": None if k == "stock" else groups[k].spec.n_coefficients,
                     "substeps_per_call": None if k == "stock" else groups[k].substeps,
                     "noise": None if k == "stock" else ("host" if groups[k].host_noise else "openmm"),
                     "us_per_step_cpu_median": float(np.median(c)), "us_per_step_wall_median": float(np.median(w)),
                     "ratio_stock_over_this_cpu_median": float(np.median(np.array(cpu["stock"]) / c)),
                     "ratio_stock_over_this_wall_median": float(np.median(np.array(wall["stock"]) / w)),
                     "us_per_step_cpu_all": [round(x, 2) for x in c]})
    return {"frame_fs": float(frame_fs), "steps_per_frame": K, "frames_per_round": frames, "rounds": rounds,
            "stock": {"integrator": "LangevinMiddleIntegrator", "platform": stock_platform, "threads": 1,
                      "platform_trial_us_per_step_cpu": trial, "per_frame": "getState(positions)"},
            "molflow": {"platform": platform, "copies_per_context": cpc,
                        "noise": "host" if host_noise_for(platform) else "openmm",
                        "per_frame": "positions, velocities, forces, energy, N coefficients, guards "
                                     "(Group.run; HDF5 writing excluded)"},
            "rows": rows}


def print_comparison(cmp: dict) -> None:
    print(f"\nper core, one replica, 1 fs steps, frames every {cmp['frame_fs']:g} fs "
          f"({cmp['rounds']} interleaved rounds of {cmp['frames_per_round']} frames; medians)")
    print(f"{'':28s}{'platform':>10s}{'us/step cpu':>13s}{'us/step wall':>14s}{'stock/this cpu':>16s}"
          f"{'stock/this wall':>17s}")
    for r in cmp["rows"]:
        print(f"{r['what']:28s}{r['platform']:>10s}{r['us_per_step_cpu_median']:13.1f}{r['us_per_step_wall_median']:14.1f}"
              f"{r['ratio_stock_over_this_cpu_median']:16.3f}{r['ratio_stock_over_this_wall_median']:17.3f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "full"], default="small")
    ap.add_argument("--platforms", nargs="+", help="default: every platform present")
    ap.add_argument("--out", default="md_throughput.json")
    ap.add_argument("--compare-only", action="store_true", help="only part 1 (stock OpenMM vs molflow, per core)")
    ap.add_argument("--no-compare", action="store_true", help="only part 2 (aggregate ns/day)")
    ap.add_argument("--frame-fs", type=float, nargs="+", default=[100.0, 20.0],
                    help="frame intervals of part 1 (default 100 20)")
    ap.add_argument("--frames", type=int, default=5, help="frames per round of part 1 at 100 fs (scaled to keep "
                    "the steps per round equal at other intervals)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--openmm-noise", type=int, nargs="*", default=[], metavar="N",
                    help="part 1 also runs molflow at these N with OpenMM drawing the Gaussians and accumulating "
                         "the coefficients (the GPU program) instead of host noise")
    ap.add_argument("--max-substeps", type=int, help="override molflow.md.integrator.MAX_SUBSTEPS for this run "
                                                     "(physical steps per integrator call; default: the engine's)")
    args = ap.parse_args(argv)
    from molflow.md import integrator

    if args.max_substeps:
        integrator.MAX_SUBSTEPS = int(args.max_substeps)  # read by choose_substeps when each Group is built
    platforms = args.platforms or [p for p in available_platforms() if p in ("Reference", "CPU", *GPU_PLATFORMS)]
    comparisons = []
    if not args.no_compare:
        for fr in args.frame_fs:
            cmp = stock_comparison(fr, max(1, int(round(args.frames * 100.0 / fr))), args.rounds,
                                   openmm_noise_n=args.openmm_noise)
            print_comparison(cmp)
            comparisons.append(cmp)
    rows = []
    if args.compare_only:
        platforms = []
    with tempfile.TemporaryDirectory() as tmp:
        for plat in platforms:
            sizes = SIZES[args.size]["GPU" if plat in GPU_PLATFORMS else plat]
            for replicas, time_ps in sizes.items():
                for n in (0, 3):
                    row = run_one(plat, replicas, time_ps, n, Path(tmp))
                    rows.append(row)
                    print(f"{plat:9s} R={replicas:5d} N={n}  {row['ns_per_day_aggregate']:10.1f} ns/day aggregate "
                          f"({row['ns_per_day_per_replica']:7.1f} per replica, {row['copies_per_context']} copies/context, "
                          f"platform {row['platform_used']})", flush=True)
    single = {r["platform"]: r["ns_per_day_aggregate"] for r in rows if r["replicas"] == 1 and r["n_coefficients"] == 3}
    for r in rows:
        base = single.get(r["platform"])
        r["speedup_vs_single_copy"] = r["ns_per_day_aggregate"] / base if base else None
    import h5py
    import openmm
    import torch

    result = {
        "benchmark": "md_throughput", "command": " ".join(["python", "benchmarks/md_throughput.py", *sys.argv[1:]]),
        "size": args.size, "system": "alanine_dipeptide",
        "settings": {"frame_fs": 100, "timestep_fs": 1.0, "equilibrate_ps": 0.0,
                     "max_substeps": integrator.MAX_SUBSTEPS,
                     "rate": "steady state after the first written chunk (setup excluded)"},
        "hardware": {p: hardware_description(p) for p in platforms}, "cpu": cpu_description(),
        "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
        "stock_comparison": comparisons,
        "versions": {"molflow": molflow.__version__, "openmm": openmm.__version__, "numpy": np.__version__,
                     "h5py": h5py.__version__, "torch": torch.__version__, "python": _pf.python_version()},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    for cmp in comparisons:
        print_comparison(cmp)
    print(f"\n{'platform':10s}{'R':>6s}{'N':>3s}{'ns/day agg':>14s}{'x single':>10s}")
    for r in rows:
        sp = r["speedup_vs_single_copy"]
        print(f"{r['platform']:10s}{r['replicas']:6d}{r['n_coefficients']:3d}{r['ns_per_day_aggregate']:14.1f}"
              f"{(f'{sp:10.2f}' if sp else '         -')}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
