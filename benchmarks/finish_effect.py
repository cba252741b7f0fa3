"""What the physical finish (molflow/finish.py) does to a map's free-running rollouts.

    python benchmarks/finish_effect.py --model systems/alanine_dipeptide/flowmap.pt --tau-ps 0.1 \\
        --settings 0:300,10:300,20:300 --out benchmarks/results/finish_effect_cpu.json

Reference: 16 replicas x 100 ps of alanine dipeptide at 20 fs frames (made with ``molflow.simulate``
when ``--reference`` is missing; seed 20261206). Rollouts: ``--replicas`` from states spread over the
reference, ``--jumps`` jumps of ``--tau-ps`` in sample mode, for each finish setting steps:friction
(1/ps). Reports bond- and angle-spread ratios (sampled / reference; median and worst), potential
energy mean minus the reference's (kJ/mol; first 20% of jumps dropped), kinetic temperature (K; the
reference's on-step velocities run ~2% cool), restarts, stopped replicas and ms per replica-jump.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", default="finish_reference_20fs.h5")
    ap.add_argument("--tau-ps", type=float, default=0.1)
    ap.add_argument("--jumps", type=int, default=40)
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--settings", default="0:300,10:300,20:300")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import molflow
    from molflow.evaluation.metrics import bond_angles, bond_lengths
    from molflow.finish import FinishConfig
    from molflow.md.engine import EnergyEvaluator, cpu_description
    from molflow.sampling import FlowMap, start_states_from_run
    from molflow.units import kinetic_temperature

    torch.set_num_threads(1)
    ref = Path(args.reference)
    if not ref.exists():
        molflow.simulate("alanine_dipeptide", ref, replicas=16, time_ps=100, frame_fs=20, n_coefficients=3,
                         seed=20261206, progress=True).close()
    fm = FlowMap.load(args.model, device="cpu")
    mol = fm.system
    b, a = mol.bonds, mol.angles

    def internals(x):
        return bond_lengths(x, b), bond_angles(x, a)

    with molflow.Trajectory(ref) as t:
        xr = np.asarray(t.positions[:, ::5]).reshape(-1, mol.n_atoms, 3).astype(np.float64)
        vr = np.asarray(t.velocities[:, ::5]).reshape(-1, mol.n_atoms, 3).astype(np.float64)
    bl_r, an_r = internals(xr)
    energy = EnergyEvaluator(mol, "Reference")
    e_ref = float(energy(xr[::4]).mean())
    t_ref = float(kinetic_temperature(vr, mol.masses_amu).mean())
    x0, v0 = start_states_from_run(ref, args.replicas)
    rows = []
    for item in args.settings.split(","):
        steps, friction = item.split(":")
        fin = FinishConfig(n_steps=int(steps), friction_per_ps=float(friction))
        t0 = time.perf_counter()
        out = fm.sample((x0, v0), n_jumps=args.jumps, tau_ps=args.tau_ps, seed=1, finish=fin, extrapolate=True)
        wall = time.perf_counter() - t0
        keep = out["stopped_at_jump"] < 0
        x = out["positions"][keep, args.jumps // 5:].reshape(-1, mol.n_atoms, 3).astype(np.float64)
        v = out["velocities"][keep, args.jumps // 5:].reshape(-1, mol.n_atoms, 3).astype(np.float64)
        bl, an = internals(x)
        rb, ra = bl.std(0) / bl_r.std(0), an.std(0) / an_r.std(0)
        row = dict(finish_steps=fin.n_steps, friction_per_ps=fin.friction_per_ps,
                   restarts=int(out["restarts_per_replica"].sum()), stopped=int((~keep).sum()),
                   bond_spread_ratio_median=float(np.median(rb)), bond_spread_ratio_max=float(rb.max()),
                   angle_spread_ratio_median=float(np.median(ra)), angle_spread_ratio_max=float(ra.max()),
                   energy_mean_minus_reference_kj_mol=float(energy(x[::max(1, len(x) // 400)]).mean() - e_ref),
                   kinetic_temperature_K=float(kinetic_temperature(v, mol.masses_amu).mean()),
                   ms_per_replica_jump=1e3 * wall / (args.replicas * args.jumps))
        rows.append(row)
        print(json.dumps(row))
    res = {"benchmark": "finish_effect", "model": args.model, "tau_ps": args.tau_ps, "jumps": args.jumps,
           "replicas": args.replicas, "reference": {"path": str(ref), "energy_mean_kj_mol": e_ref,
                                                    "kinetic_temperature_K": t_ref, "frames": len(xr)},
           "hardware": cpu_description(), "torch": torch.__version__, "python": platform.python_version(),
           "molflow": molflow.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
