"""Benchmark: aggregate simulated ns/day of the reference engine (not a test).

For R = 1, 8, 64, 512, 2048 replicas of alanine dipeptide on every OpenMM platform present, with
and without coefficient recording (N = 3 vs 0), it runs the real engine (`molflow.simulate`, the
platform's default replica layout) and reads its steady-state throughput (setup and
equilibration excluded), then prints a table and writes JSON with hardware, versions and settings.

    python benchmarks/md_throughput.py --size small --out md_throughput.json   # CPU-sized
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
from molflow.md.engine import GPU_PLATFORMS, available_platforms, hardware_description

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "full"], default="small")
    ap.add_argument("--platforms", nargs="+", help="default: every platform present")
    ap.add_argument("--out", default="md_throughput.json")
    args = ap.parse_args(argv)
    platforms = args.platforms or [p for p in available_platforms() if p in ("Reference", "CPU", *GPU_PLATFORMS)]
    rows = []
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
        "benchmark": "md_throughput", "size": args.size, "system": "alanine_dipeptide",
        "settings": {"frame_fs": 100, "timestep_fs": 1.0, "equilibrate_ps": 0.0,
                     "rate": "steady state after the first written chunk (setup excluded)"},
        "hardware": {p: hardware_description(p) for p in platforms}, "cpu_count": os.cpu_count(),
        "versions": {"molflow": molflow.__version__, "openmm": openmm.__version__, "numpy": np.__version__,
                     "h5py": h5py.__version__, "torch": torch.__version__, "python": _pf.python_version()},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'platform':10s}{'R':>6s}{'N':>3s}{'ns/day agg':>14s}{'x single':>10s}")
    for r in rows:
        sp = r["speedup_vs_single_copy"]
        print(f"{r['platform']:10s}{r['replicas']:6d}{r['n_coefficients']:3d}{r['ns_per_day_aggregate']:14.1f}"
              f"{(f'{sp:10.2f}' if sp else '         -')}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
