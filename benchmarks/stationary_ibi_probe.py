"""Probe (issue 17; not shipped): one iterative-Boltzmann-inversion update of a map's landscapes read from
its own long free run instead of 0.2-ns rollouts.

    python benchmarks/stationary_ibi_probe.py --model systems/alanine_dipeptide/flowmap.pt \\
        --rollout W/long/rollout_shipped25_tau0.5.h5 --umbrella W/umbrella.npz --out W/flowmap_stationary_ibi.pt

The update is landscape_ibi's (``ibi_update`` on the 1-D end-angle tables, ``ibi_pair_update`` on the pair
table) with damping 1 and ``--clip`` kT, the rollout's counts rescaled to the umbrella counts' total so that
the pseudo-counts leave bins neither visits alone. Measured on the shipped map from its 410-ns run:
README (issue 17), benchmarks/results/fidelity_cpu_long_stationary_ibi_probe.json.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def main() -> int:
    import molflow
    from molflow.checkpoint import load_checkpoint, save_checkpoint
    from molflow.training.landscape_ibi import (LandscapeIBIConfig, _kind_counts, _pair_counts, end_angles,
                                                ibi_pair_update, ibi_update)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rollout", required=True, help="a long free run of --model (benchmarks/fidelity_cpu.py --work)")
    ap.add_argument("--umbrella", required=True)
    ap.add_argument("--clip", type=float, default=6.0)
    ap.add_argument("--phi-window", type=float, nargs=2, metavar=("LO", "HI"),
                    help="change only the phi table, at nodes with LO <= phi <= HI (deg); psi and pair tables kept")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    drive = molflow.FlowMap.load(args.model, device="cpu").model.drive
    cm, cp = np.zeros((2, drive.n_landscape)), np.zeros((drive.n_pair, drive.n_pair))
    with molflow.Trajectory(args.rollout) as t:
        for r in range(t.n_replicas):
            e, w = end_angles(drive, np.asarray(t.positions[r], dtype=np.float64))
            cm += _kind_counts(drive, e, w)
            cp += _pair_counts(drive, e, w)
    z = np.load(args.umbrella)
    e, w = end_angles(drive, z["positions"].astype(np.float64), z["weight"])
    cd, cpd = _kind_counts(drive, e, w), _pair_counts(drive, e, w)
    cm *= cd.sum(1, keepdims=True) / cm.sum(1, keepdims=True)
    cp *= cpd.sum() / cp.sum()
    pseudo = LandscapeIBIConfig().pseudo_count
    d1 = ibi_update(cm, cd, 1.0, args.clip, pseudo)
    dp = ibi_pair_update(cp, cpd, 1.0, args.clip, pseudo)
    if args.phi_window:
        nodes = np.degrees(-np.pi + 2 * np.pi * np.arange(drive.n_landscape) / drive.n_landscape)
        d1[0] = np.where((nodes >= args.phi_window[0]) & (nodes <= args.phi_window[1]), d1[0], 0.0)
        d1[1] = 0.0
        dp = np.zeros_like(dp)
    print("phi table change (kT):", np.round(d1[0], 2).tolist())
    print("psi table change (kT):", np.round(d1[1], 2).tolist())
    ck = load_checkpoint(args.model)
    for k in ("model", "ema"):
        ck[k]["drive.landscape"] = ck[k]["drive.landscape"] + torch.as_tensor(d1, dtype=ck[k]["drive.landscape"].dtype)
        ck[k]["drive.landscape_pair"] = ck[k]["drive.landscape_pair"] + torch.as_tensor(
            dp, dtype=ck[k]["drive.landscape_pair"].dtype)
    save_checkpoint(args.out, {k: v for k, v in ck.items() if k not in ("format", "molflow_version")})
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
