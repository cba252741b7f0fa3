"""One jump of a flow map against the recorded data: is its slow (phi, psi) conditional law wide enough?

    python benchmarks/one_jump_torsions.py --model systems/alanine_dipeptide/flowmap.pt \\
        --data train_20fs.h5 --out benchmarks/results/one_jump_torsions_cpu.json

1. Torsion-step spread (what training logs as ``val_phi/psi_step_std_ratio_*``): ``--items`` held-out
   jumps per tau from the data (FrameData's validation split), one raw jump of the map (sample mode,
   no finish); std of the wrapped change of phi and psi, map / recorded.
2. Basin changes per jump at ``--tau-ps``: data states every 2 ps (after the first 10 ps) of every
   replica, one jump of the map with its recommended finish, against the recorded frame tau later:
   the fraction of starts in beta / alpha_R that end in the other basin; and from the same starts
   (fresh path coefficients, as free-running sampling draws them) the spread of the phi / psi change
   with the finish and without it, map / recorded: the finish undoes whatever part of a torsion
   change the map made by straining the atoms that define it.
3. The beta basin's edge (same starts, phi < ``--edge-rad``, default -2.5 rad): MD moves phi back up
   (mean +0.73 rad in 0.5 ps) and never past -pi; the mean phi change and the fraction of jumps that
   end at phi > 0 (past -pi, into the alpha_L side), map with and without the finish against MD. A
   one-jump law that is wide enough but not pulled back here fills alpha_L in free-running rollouts.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a 20 fs run of the same system (the map's training data)")
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--taus", default="0.02,0.1,0.5")
    ap.add_argument("--tau-ps", type=float, default=0.5, help="jump of part 2")
    ap.add_argument("--edge-rad", type=float, default=-2.5, help="part 3: starts with phi below this (rad)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import molflow
    from molflow.evaluation import metrics as M
    from molflow.evaluation.dihedrals import phi_psi
    from molflow.md.engine import cpu_description
    from molflow.sampling import FlowMap
    from molflow.training.data import FrameData
    from molflow.training.loop import torsion_step_spread

    torch.set_num_threads(1)
    fm = FlowMap.load(args.model, device="cpu")
    s = fm.system
    data = FrameData([args.data])
    rng = np.random.default_rng(12345)
    gen = torch.Generator().manual_seed(12345)
    spread = {}
    for tau in (float(t) for t in args.taus.split(",")):
        k = max(1, int(round(tau / data.h0_ps)))
        b = data.batch(args.items, k, rng, split="val")
        with torch.no_grad():
            xt, _ = fm.jump(b["x0"], b["v0"], b["L"], k * data.h0_ps, mode="sample", generator=gen)
        spread.update(torsion_step_spread(b["x0"], xt, b["x1"], s, f"{k * data.h0_ps:g}ps"))
    m = int(round(args.tau_ps / data.h0_ps))
    with molflow.Trajectory(args.data) as t:
        first = int(round(10.0 / data.h0_ps))
        every = int(round(2.0 / data.h0_ps))
        x = np.asarray(t.positions[:, first:-m:every], dtype=np.float64)
        v = np.asarray(t.velocities[:, first:-m:every], dtype=np.float64)
        x1 = np.asarray(t.positions[:, first + m::every][:, :x.shape[1]], dtype=np.float64)
    x, v, x1 = (a.reshape(-1, s.n_atoms, 3) for a in (x, v, x1))
    out = fm.sample((x, v), n_jumps=1, tau_ps=args.tau_ps, seed=3)
    b0, b1, bm = (M.basin_assignment(*phi_psi(a, s)) for a in (x, x1, out["positions"][:, 1]))
    names = {0: "beta", 1: "alpha_R"}
    changes = {}
    for k, name in names.items():
        sel = b0 == k
        other = 1 - k
        changes[f"{name}_starts"] = int(sel.sum())
        changes[f"{name}_to_{names[other]}_md"] = float((b1[sel] == other).mean()) if sel.any() else None
        changes[f"{name}_to_{names[other]}_map"] = float((bm[sel] == other).mean()) if sel.any() else None
    a0, a1 = np.array(phi_psi(x, s)), np.array(phi_psi(x1, s))
    free = {}
    edge = a0[0] < args.edge_rad
    edge_res = {"edge_rad": args.edge_rad, "starts": int(edge.sum()),
                "dphi_mean_md": float(M.wrap_angle(a1[0] - a0[0])[edge].mean()),
                "end_phi_positive_md": float((a1[0][edge] > 0).mean())}
    for label, o in (("finish", out), ("no_finish", fm.sample((x, v), n_jumps=1, tau_ps=args.tau_ps, seed=3, finish=0))):
        am = np.array(phi_psi(o["positions"][:, 1].astype(np.float64), s))
        for i, name in enumerate(("phi", "psi")):
            free[f"{name}_step_std_ratio_{label}"] = float(M.wrap_angle(am[i] - a0[i]).std() / M.wrap_angle(a1[i] - a0[i]).std())
        edge_res[f"dphi_mean_map_{label}"] = float(M.wrap_angle(am[0] - a0[0])[edge].mean())
        edge_res[f"end_phi_positive_map_{label}"] = float((am[0][edge] > 0).mean())
    res = {"benchmark": "one_jump_torsions", "model": args.model, "data": args.data, "settings": vars(args),
           "torsion_step_std_ratio": spread, "basin_changes_per_jump": changes,
           "free_running_step_std_ratio": free, "beta_edge": edge_res, "finish": fm.default_finish().to_attrs(), "hardware": cpu_description(), "torch": torch.__version__,
           "python": platform.python_version(), "molflow": molflow.__version__}
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({"torsion_step_std_ratio": spread, "basin_changes_per_jump": changes,
                      "free_running_step_std_ratio": free, "beta_edge": edge_res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
