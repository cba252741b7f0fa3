"""Benchmark: peak memory of the training data, all-in-memory (before issue 18) vs streamed (not a test).

The training data are 10x the default (default: 8 replicas x 50 ps at 20 fs frames, N = 3): here
10 files x 8 replicas x 2501 frames of alanine dipeptide (22 atoms), the layout and chunking of
``molflow simulate`` files, with random numbers in place of simulated frames (memory and read time
do not depend on the values) and the attributes of a real run. Each variant runs in a fresh
process: build ``FrameData`` over the 10 files, then draw 100 training batches of 16 jumps of
k = 25 frames (tau = 0.5 ps) and read them; the process reports its peak RSS (``ru_maxrss``), the
RSS after imports (torch, h5py, molflow) and the times. The old variant is the ``FrameData`` of
commit 586f4f2 (before streaming), read from git.

    python benchmarks/data_memory.py --dir /tmp/fd10x --out benchmarks/results/data_memory_cpu.json

Rounds alternate old/new (``--rounds``); the table shows medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _pf
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OLD_COMMIT = "586f4f2"
FILES, REPLICAS, FRAMES, N, FRAME_FS = 10, 8, 2501, 3, 20.0


def make_data(folder: Path) -> list[Path]:
    """10 files like `molflow simulate --replicas 8 --time-ps 50 --frame-fs 20` makes (random values)."""
    import h5py

    import molflow
    from molflow.trajectory import FORMAT_NAME

    folder.mkdir(parents=True, exist_ok=True)
    template = folder / "template.h5"
    if not template.exists():  # the attributes of a real run (system, PDB, force field, settings)
        molflow.simulate("alanine_dipeptide", template, replicas=1, time_ps=0.04, frame_fs=FRAME_FS,
                         n_coefficients=N, equilibrate_ps=0.0, seed=1, progress=False, platform="Reference").close()
    with h5py.File(template, "r") as t:
        attrs = dict(t.attrs)
        x0 = t["positions"][0, 0]
    A = x0.shape[0]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(FILES):
        p = folder / f"data{i:02d}.h5"
        paths.append(p)
        if p.exists():
            continue
        tmp = p.with_suffix(".tmp")
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["format"] = FORMAT_NAME
            f.attrs["n_replicas"] = REPLICAS
            f.attrs["seed"] = i + 1
            vec = dict(shape=(REPLICAS, FRAMES, A, 3), dtype="f4", chunks=(1, 16, A, 3))
            for name in ("positions", "velocities", "forces"):
                ds = f.create_dataset(name, **vec)
                for r in range(REPLICAS):
                    noise = rng.standard_normal((FRAMES, A, 3)).astype(np.float32)
                    ds[r] = x0 + 0.05 * noise if name == "positions" else noise
            f.create_dataset("potential_energy", data=rng.standard_normal((REPLICAS, FRAMES)) - 60.0,
                             chunks=(REPLICAS, 64))
            b = f.create_dataset("brownian", shape=(REPLICAS, FRAMES - 1, N, A, 3), dtype="f4", chunks=(1, 16, N, A, 3))
            for r in range(REPLICAS):
                b[r] = 0.08 * rng.standard_normal((FRAMES - 1, N, A, 3)).astype(np.float32)
            f.create_dataset("time", data=np.arange(FRAMES) * FRAME_FS / 1000.0, chunks=(256,))
            f.attrs["n_frames"] = FRAMES
            f.attrs["time_ps_requested"] = (FRAMES - 1) * FRAME_FS / 1000.0
        os.replace(tmp, p)
    return paths


def _old_framedata():
    """The FrameData of commit OLD_COMMIT (everything in memory), loaded from git."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:molflow/training/data.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from ..", "from molflow.")
    ns: dict = {"__name__": "old_framedata"}
    exec(compile(src, f"{OLD_COMMIT}:molflow/training/data.py", "exec"), ns)
    return ns["FrameData"]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(variant: str, paths: list[str], batches: int, batch_size: int, k: int) -> dict:
    """In this (fresh) process: build FrameData, read `batches` batches; peak RSS and times."""
    import torch

    import molflow  # noqa: F401
    from molflow.training.data import FrameData as New

    cls = _old_framedata() if variant == "old" else New
    torch.set_num_threads(1)
    rss_imports = _rss_mb()
    t0 = time.perf_counter()
    data = cls(paths)
    t_init = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = data.batch(batch_size, k, rng)
    t_batches = time.perf_counter() - t0
    assert b["L"].shape == (batch_size, N, 22, 3)
    return {"variant": variant, "rss_after_imports_mb": rss_imports, "rss_end_mb": _rss_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "init_s": t_init, "batches_s": t_batches, "ms_per_batch": 1000 * t_batches / batches}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="where the synthetic data go (default: a temporary folder)")
    ap.add_argument("--out", default="data_memory.json")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--measure", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:  # child process
        print(json.dumps(measure(args.measure, args.paths, args.batches, args.batch_size, args.k)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        t0 = time.perf_counter()
        paths = [str(p) for p in make_data(folder)]
        print(f"data: {len(paths)} files x {REPLICAS} replicas x {FRAMES} frames in {folder} "
              f"({sum(os.path.getsize(p) for p in paths) / 2**20:.0f} MB on disk, made in {time.perf_counter() - t0:.0f} s)",
              flush=True)
        rows = []
        for r in range(args.rounds):
            for variant in (("old", "new") if r % 2 == 0 else ("new", "old")):
                cmd = [sys.executable, __file__, "--measure", variant, "--batches", str(args.batches),
                       "--batch-size", str(args.batch_size), "--k", str(args.k), *paths]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                res["round"] = r
                rows.append(res)
                print(f"round {r} {variant}: peak RSS {res['peak_rss_mb']:.0f} MB (after imports "
                      f"{res['rss_after_imports_mb']:.0f} MB), init {res['init_s']:.1f} s, "
                      f"{res['ms_per_batch']:.1f} ms/batch", flush=True)
        data_mb = sum(os.path.getsize(p) for p in paths) / 2**20
    summary = {}
    for v in ("old", "new"):
        sel = [r for r in rows if r["variant"] == v]
        summary[v] = {key: float(np.median([r[key] for r in sel]))
                      for key in ("peak_rss_mb", "rss_after_imports_mb", "init_s", "ms_per_batch")}
        summary[v]["peak_minus_imports_mb"] = summary[v]["peak_rss_mb"] - summary[v]["rss_after_imports_mb"]
    import h5py
    import torch

    import molflow
    from molflow.md.engine import cpu_description

    result = {"benchmark": "data_memory", "data": {"files": FILES, "replicas_per_file": REPLICAS, "frames": FRAMES,
                                                   "frame_fs": FRAME_FS, "n_coefficients": N, "atoms": 22,
                                                   "on_disk_mb": data_mb, "values": "random (synthetic)"},
              "load": {"batches": args.batches, "batch_size": args.batch_size, "k": args.k},
              "old": f"molflow/training/data.py at {OLD_COMMIT} (all frames in memory)",
              "new": "molflow/training/data.py streaming (default cache_mb)",
              "cpu": cpu_description(), "load_average_at_end": list(os.getloadavg()),
              "versions": {"molflow": molflow.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
                           "numpy": np.__version__, "torch": torch.__version__, "python": _pf.python_version()},
              "rows": rows, "median": summary}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'':5s}{'peak RSS MB':>13s}{'after imports':>15s}{'peak - imports':>16s}{'init s':>8s}{'ms/batch':>10s}")
    for v in ("old", "new"):
        s = summary[v]
        print(f"{v:5s}{s['peak_rss_mb']:13.0f}{s['rss_after_imports_mb']:15.0f}{s['peak_minus_imports_mb']:16.0f}"
              f"{s['init_s']:8.2f}{s['ms_per_batch']:10.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
