"""Which side does a map commit to from the phi barriers, against MD? (issue 17; not a test)

    python benchmarks/barrier_committor.py --model systems/alanine_dipeptide/flowmap.pt \\
        --umbrella W/umbrella.npz --out benchmarks/results/barrier_committor_cpu.json

The map's alpha_L exit rate matches MD's but it enters alpha_L 2.7x too often (README, issue 17). The
entry rate is (equilibrium flux into the barrier region) x (the committor: the chance that a state
there reaches the alpha_L core before the beta/alpha_R core). The landscape IBI matches the
equilibrium law, barrier region included; this script measures the committor. Start states: frames
of the umbrella windows whose phi lies in the two barrier regions between the core sets of the
evaluator (-30..30 deg, and 100..210 deg through +-180), ``--starts`` of them drawn uniformly within
each region's frames, with Maxwell-Boltzmann velocities. From each, ``--shots`` MD shots (stock
OpenMM LangevinMiddleIntegrator, 1 fs, the system's friction and temperature, Reference platform)
and as many free-running map rollouts (its recommended finish), each until it reaches a core or
``--max-ps``; the committor to alpha_L is the fraction reaching the alpha_L core first. Reported per
10-degree bin of the start's phi, MD and map side by side, with binomial errors, and the
unbiasing-weighted mean per region (the mean committor of the equilibrium barrier population).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

CORE_NEG = (np.deg2rad(-150.0), np.deg2rad(-30.0))
CORE_POS = (np.deg2rad(30.0), np.deg2rad(100.0))
REGIONS = {"phi_near_0": (-30.0, 30.0), "phi_near_180": (100.0, 210.0)}


def _wrap(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def first_core(phi: np.ndarray) -> np.ndarray:
    """First core reached along each row of phi (R, F) rad: 1 alpha_L, 0 beta/alpha_R, -1 neither."""
    a = _wrap(phi)
    neg = (a >= CORE_NEG[0]) & (a <= CORE_NEG[1])
    pos = (a >= CORE_POS[0]) & (a <= CORE_POS[1])
    F = a.shape[1]
    i_neg = np.where(neg.any(1), neg.argmax(1), F)
    i_pos = np.where(pos.any(1), pos.argmax(1), F)
    return np.where(i_pos < i_neg, 1, np.where(i_neg < i_pos, 0, -1))


def in_region(phi_deg: np.ndarray, lo: float, hi: float) -> np.ndarray:
    d = np.mod(phi_deg - lo, 360.0)
    return d <= (hi - lo)


def md_shots(system, x0: np.ndarray, v0: np.ndarray, max_ps: float, frame_fs: float, seed: int) -> np.ndarray:
    """phi (R, F) rad of stock-OpenMM shots from (x0, v0) (R, A, 3) nm, nm/ps; each stops at a core."""
    import openmm

    from molflow.evaluation.dihedrals import phi_psi

    omm = system.create_system("nocutoff")
    integ = openmm.LangevinMiddleIntegrator(system.temperature_K, system.friction_per_ps, system.timestep_fs / 1000.0)
    integ.setRandomNumberSeed(int(seed))
    ctx = openmm.Context(omm, integ, openmm.Platform.getPlatformByName("Reference"))
    n_frames = int(round(max_ps * 1000.0 / frame_fs)) + 1
    every = int(round(frame_fs / system.timestep_fs))
    out = np.full((len(x0), n_frames), np.nan)
    for r in range(len(x0)):
        ctx.setPositions(x0[r])
        ctx.setVelocities(v0[r])
        frames = [x0[r]]
        for f in range(1, n_frames):
            integ.step(every)
            frames.append(ctx.getState(getPositions=True).getPositions(asNumpy=True)._value)
            if f % 5 == 0 or f == n_frames - 1:  # stop once a core is reached
                ph = np.asarray(phi_psi(np.asarray(frames)[None], system)[0]).ravel()
                if first_core(ph[None])[0] >= 0:
                    break
        ph = np.asarray(phi_psi(np.asarray(frames)[None], system)[0]).ravel()
        out[r, :len(ph)] = ph
    return out


def committor_table(phi0_deg: np.ndarray, outcome: np.ndarray, weight: np.ndarray) -> dict:
    """Per 10-degree start bin and per region: the fraction of decided shots that reached alpha_L."""
    rows = []
    for lo in np.arange(-180.0, 180.0, 10.0):
        m = in_region(phi0_deg, lo, lo + 10.0) & (outcome >= 0)
        if m.sum():
            p = float((outcome[m] == 1).mean())
            rows.append({"phi_bin_deg": [float(lo), float(lo + 10.0)], "shots": int(m.sum()), "p_alpha_L": p,
                         "se": float(np.sqrt(max(p * (1 - p), 1.0 / m.sum()) / m.sum()))})
    regions = {}
    for name, (lo, hi) in REGIONS.items():
        m = in_region(phi0_deg, lo, hi) & (outcome >= 0)
        if m.sum():
            w = weight[m] / weight[m].sum()
            p = float((w * (outcome[m] == 1)).sum())
            regions[name] = {"shots": int(m.sum()), "undecided": int((in_region(phi0_deg, lo, hi) & (outcome < 0)).sum()),
                             "p_alpha_L_weighted": p, "se": float(np.sqrt((w ** 2 * ((outcome[m] == 1) - p) ** 2).sum()))}
    return {"bins": rows, "regions": regions}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--umbrella", required=True, help="umbrella windows (.npz: positions, phi, weight)")
    ap.add_argument("--starts", type=int, default=128, help="start frames per barrier region")
    ap.add_argument("--shots", type=int, default=2, help="MD shots and map rollouts per start")
    ap.add_argument("--max-ps", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--skip-md", help="reuse the MD shots of this earlier output JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import openmm
    import torch

    import molflow
    from molflow.evaluation.dihedrals import phi_psi
    from molflow.sampling import maxwell_boltzmann_velocities

    torch.set_num_threads(1)
    fm = molflow.FlowMap.load(args.model, device="cpu")
    system = fm.system
    z = np.load(args.umbrella)
    phi_deg = np.degrees(z["phi"])
    rng = np.random.default_rng(args.seed)
    pick = np.concatenate([rng.choice(np.flatnonzero(in_region(phi_deg, lo, hi)), size=args.starts, replace=False)
                           for lo, hi in REGIONS.values()])
    pick = np.repeat(pick, args.shots)
    x0 = z["positions"][pick].astype(np.float64)
    x0 -= x0.mean(1, keepdims=True)
    m = system.masses_amu
    v0 = maxwell_boltzmann_velocities(system, len(pick), rng)
    v0 -= (v0 * m[None, :, None]).sum(1, keepdims=True) / m.sum()
    phi0 = phi_deg[pick]
    weight = z["weight"][pick]
    result = {"benchmark": "barrier_committor", "model": args.model, "umbrella": args.umbrella,
              "settings": vars(args), "core_sets_deg": {"beta_alpha_R": [-150, -30], "alpha_L": [30, 100]}}
    t0 = time.perf_counter()
    if args.skip_md:
        prev = json.loads(Path(args.skip_md).read_text())
        md_out = np.asarray(prev["md_outcome"])
        result["md"] = prev["md"]
    else:
        ph = md_shots(system, x0, v0, args.max_ps, 100.0, args.seed)
        md_out = first_core(ph)
        result["md"] = committor_table(phi0, md_out, weight)
    result["md_wall_s"] = time.perf_counter() - t0
    result["md_outcome"] = md_out.tolist()
    t0 = time.perf_counter()
    tau = fm.tau_max_ps
    n_jumps = int(round(args.max_ps / tau))
    r = fm.sample((x0, v0), n_jumps, tau, replicas=len(pick), seed=args.seed, progress=False)
    xs = r["positions"]
    ph_map = np.asarray(phi_psi(xs.reshape(-1, xs.shape[2], 3), system)[0]).reshape(xs.shape[:2])
    map_out = first_core(ph_map)
    result["map"] = committor_table(phi0, map_out, weight)
    result["map_wall_s"] = time.perf_counter() - t0
    result["map_tau_ps"] = tau
    result["versions"] = {"molflow": molflow.__version__, "torch": torch.__version__, "openmm": openmm.__version__,
                          "python": platform.python_version()}
    result["hardware"] = "2-core CPU (see README)"
    print(f"{'phi bin (deg)':>16s} {'MD p_aL':>9s} {'map p_aL':>9s}")
    mb = {tuple(b["phi_bin_deg"]): b for b in result["map"]["bins"]}
    for b in result["md"]["bins"]:
        k = tuple(b["phi_bin_deg"])
        mp = mb.get(k)
        print(f"{k[0]:7.0f}..{k[1]:<7.0f} {b['p_alpha_L']:5.2f}±{b['se']:.2f} "
              + (f"{mp['p_alpha_L']:5.2f}±{mp['se']:.2f}" if mp else "   n/a"))
    for name in REGIONS:
        a, b = result["md"]["regions"].get(name), result["map"]["regions"].get(name)
        if a and b:
            print(f"{name}: weighted committor to alpha_L, MD {a['p_alpha_L_weighted']:.3f}±{a['se']:.3f}, "
                  f"map {b['p_alpha_L_weighted']:.3f}±{b['se']:.3f} (undecided MD {a['undecided']}, map {b['undecided']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
