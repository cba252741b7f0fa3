"""Visits to phi > 0 (alpha_L side) in runs or rollouts: how often and how long (issue 17).

    python benchmarks/alpha_l_visits.py --run ref_100fs.h5 --every 5 --run rollout.h5 --out visits.json

For each file (frames every ``--every`` recorded frames, default 1): entries from phi < 0 to phi > 0
(and how many went past -pi, i.e. with a negative wrapped change), the share of frames at phi > 0 per
replica (largest first), the residence of each visit in frames, and whether each replica ends at
phi > 0. Frame spacing is the file's frame interval times ``--every`` (0.5 ps for 100-fs reference
frames with --every 5, the sampler's 0.5-ps jumps with --every 1).

``--record-alpha-l FILE`` first records MD started in alpha_L (as probe b3's extra data, README issue
17): the built-in structure turned strain-free to (phi, psi) = (1.0, 0.6) rad about its backbone
bonds, then ``molflow.simulate`` (minimised, 5 ps equilibration, 32 replicas x 50 ps, 20-fs frames,
N = 3, seed 20261207; about a minute on 2 cores), and adds FILE to the runs (use --every 25).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import numpy as np

import molflow
from molflow.evaluation.dihedrals import phi_psi
from molflow.evaluation.metrics import wrap_angle


def visits(path: str, every: int) -> dict:
    with molflow.Trajectory(path) as t:
        system = molflow.load_system(t.attrs["system"])
        phi = np.array([np.asarray(phi_psi(np.asarray(t.positions[r, ::every], dtype=np.float64), system))[0]
                        for r in range(t.n_replicas)])
        time_ps = np.asarray(t.time)
        dt_ps = float(time_ps[1] - time_ps[0]) * every
    pos = phi > 0
    ok = np.isfinite(phi)
    p0, p1 = phi[:, :-1], phi[:, 1:]
    enter = (p0 < 0) & (p1 > 0)
    runs = []
    for row in pos:
        n = 0
        for v in row:
            if v:
                n += 1
            elif n:
                runs.append(n)
                n = 0
        if n:
            runs.append(n)
    return {"file": path, "every": every, "frame_spacing_ps": dt_ps, "replicas": int(phi.shape[0]),
            "frames_per_replica": int(phi.shape[1]), "finite_frames": int(ok.sum()),
            "entries": int(enter.sum()), "entries_past_minus_pi": int((enter & (wrap_angle(p1 - p0) < 0)).sum()),
            "share_phi_positive": float(pos.mean()),
            "share_phi_positive_per_replica_largest": sorted(pos.mean(1).round(4).tolist(), reverse=True)[:8],
            "residences_frames_largest": sorted(runs, reverse=True)[:12],
            "one_frame_visits": int(sum(1 for r in runs if r == 1)),
            "replicas_ending_at_phi_positive": int(pos[:, -1].sum())}


def record_alpha_l(out: str) -> None:
    """MD started in alpha_L (module docstring)."""
    from molflow.md.umbrella import system_at_backbone_dihedrals

    start = system_at_backbone_dihedrals(molflow.load_system("alanine_dipeptide"), 1.0, 0.6)
    molflow.simulate(start, out, replicas=32, time_ps=50.0, frame_fs=20.0, n_coefficients=3, equilibrate_ps=5.0,
                     seed=20261207, overwrite=True, progress=False).close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="run or rollout file (repeat)")
    ap.add_argument("--every", action="append", type=int, help="frame stride per --run (default 1)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--record-alpha-l", metavar="FILE", help="first record MD started in alpha_L to FILE and add it")
    args = ap.parse_args()
    if args.record_alpha_l:
        record_alpha_l(args.record_alpha_l)
        args.run.append(args.record_alpha_l)
    strides = args.every or []
    rows = [visits(p, strides[i] if i < len(strides) else 1) for i, p in enumerate(args.run)]
    for r in rows:
        print(json.dumps({k: r[k] for k in ("file", "entries", "entries_past_minus_pi", "share_phi_positive",
                                               "replicas_ending_at_phi_positive")}))
    out = {"benchmark": "alpha_l_visits", "command": "python benchmarks/alpha_l_visits.py " + " ".join(sys.argv[1:]),
           "rows": rows, "python": platform.python_version(),
           "molflow": molflow.__version__}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
