"""Benchmark: the molecular map's base, ``identity`` vs the exact free-particle ``ou`` (not a test).

Same data, seed and settings for both (alanine dipeptide, 4 x 40 ps at 20 fs, N = 3, PaiNN F = 32,
2 layers, 600 optimiser steps, tau_max 0.2 ps); on 64 held-out items per tau, one jump in `mean` and
`sample` mode: aligned heavy-atom RMSD to the recorded frame, and the spread of bond lengths (std of
length / start length, all bonds) against the recorded frames' own spread. Prints a table, writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/base_compare.py --out benchmarks/results/base_compare_cpu.json
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
from molflow.evaluation.structure import kabsch_rmsd
from molflow.md.engine import cpu_description
from molflow.training.data import FrameData

TAUS = (0.02, 0.06, 0.1, 0.2)
SETTINGS = dict(tau_max_ps=0.2, steps=600, seed=7, config={"batch_size": 16}, n_features=32, n_layers=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="benchmark-base")
    ap.add_argument("--data", help="reuse a 20 fs run (default: record 4 x 40 ps, seed 2026)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else work / "data_20fs.h5"
    if not data.exists():
        molflow.simulate("alanine_dipeptide", data, replicas=4, time_ps=40.0, frame_fs=20.0, n_coefficients=3,
                         equilibrate_ps=10.0, seed=2026).close()
    fd = FrameData([str(data)], 3)
    result = {"benchmark": "base_compare", "settings": SETTINGS, "data": str(data), "hardware": cpu_description(),
              "torch": torch.__version__, "python": platform.python_version(), "rows": {}}
    for base in ("identity", "ou"):
        model = work / f"model_{base}.pt"
        t0 = time.perf_counter()
        molflow.train("alanine_dipeptide", data=[str(data)], out=model, device="cpu", progress=True, base=base,
                      **SETTINGS)
        fm = molflow.FlowMap.load(model, device="cpu")
        b = np.asarray(fm.system.bonds)
        heavy = fm.system.heavy_atoms
        rng = np.random.default_rng(0)
        row = {"train_wall_s": time.perf_counter() - t0}
        for tau in TAUS:
            it = fd.batch(64, int(round(tau / fd.h0_ps)), rng, split="val")
            x0, x1 = it["x0"].double().numpy(), it["x1"].double().numpy()
            ref_len = np.linalg.norm(x0[:, b[:, 0]] - x0[:, b[:, 1]], axis=-1).mean(0)
            true_spread = (np.linalg.norm(x1[:, b[:, 0]] - x1[:, b[:, 1]], axis=-1) / ref_len).std()
            for mode in ("mean", "sample"):
                xt, _ = fm.jump(it["x0"], it["v0"], it["L"], tau, mode, torch.Generator().manual_seed(1))
                xt = xt.double().numpy()
                ratio = np.linalg.norm(xt[:, b[:, 0]] - xt[:, b[:, 1]], axis=-1) / ref_len
                row[f"{tau:g}_{mode}"] = {
                    "aligned_rmsd_nm": float(np.sqrt((kabsch_rmsd(xt[:, heavy], x1[:, heavy]) ** 2).mean())),
                    "bond_ratio_std": float(ratio.std()), "bond_ratio_std_reference": float(true_spread)}
        result["rows"][base] = row
    print(f"{'base':9s} {'mode':6s} " + " ".join(f"{'tau ' + format(t, 'g'):>20s}" for t in TAUS))
    for base, row in result["rows"].items():
        for mode in ("mean", "sample"):
            cells = [f"{row[f'{t:g}_{mode}']['aligned_rmsd_nm']:.4f} / {row[f'{t:g}_{mode}']['bond_ratio_std']:.3f}"
                     for t in TAUS]
            print(f"{base:9s} {mode:6s} " + " ".join(f"{c:>20s}" for c in cells))
    print("cells: aligned heavy RMSD (nm) / bond-length spread; reference spread "
          + ", ".join(f"{result['rows']['identity'][f'{t:g}_mean']['bond_ratio_std_reference']:.3f}" for t in TAUS))
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
