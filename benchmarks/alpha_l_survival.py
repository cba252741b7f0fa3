"""Does a map stay in alpha_L when it starts there? (issue 17)

    python benchmarks/alpha_l_survival.py --model systems/alanine_dipeptide/flowmap.pt \\
        --umbrella W/umbrella.npz --variant as-is --variant flat-landscape --variant no-drive \\
        --out benchmarks/results/alpha_l_survival_cpu.json

Starts ``--replicas`` free-running rollouts at tau_max from alpha_L frames (phi > 0.3 rad) drawn by
their unbiasing weights from umbrella windows (``benchmarks/phi_umbrella.py --samples-out``), with
Maxwell-Boltzmann velocities and the map's recommended finish, and reports the fraction of replicas
at phi > 0 after 0.5, 1, 5, 25 and 100 ps. In MD alpha_L is left at about 0.5 per ns (the 100-ns
reference: 2 visits of 0.9 and 2.95 ns; umbrella sampling puts 2.65% of the Boltzmann law there), so
most replicas should still be there after 100 ps. Variants isolate the parts of the map: ``as-is``;
``flat-landscape`` (the torsion drive's landscape tables set to zero); ``no-drive`` (the drive's turn
set to zero: the network's jump and the finish only).
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


def survival(model: str, umbrella: str, variant: str, replicas: int, seed: int) -> dict:
    import molflow
    from molflow.evaluation.dihedrals import phi_psi
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
    phi = np.asarray(phi_psi(x.reshape(-1, x.shape[2], 3), fm.system)[0]).reshape(x.shape[0], x.shape[1])
    inside = phi > 0
    return {"variant": variant, "replicas": replicas, "tau_ps": tau,
            "fraction_in_alpha_L": {f"{t:g}ps": float(inside[:, int(round(t / tau))].mean()) for t in CHECK_PS},
            "phi_after_first_jump_deg": np.degrees(phi[:, 1]).round(1).tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--umbrella", required=True, help="phi_umbrella.py --samples-out file (with positions)")
    ap.add_argument("--variant", action="append", help="as-is | flat-landscape | no-drive (repeat; default as-is)")
    ap.add_argument("--replicas", type=int, default=32)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import molflow
    from molflow.md.engine import hardware_description

    rows = []
    for v in args.variant or ["as-is"]:
        rows.append(survival(args.model, args.umbrella, v, args.replicas, args.seed))
        print(f"{v}: fraction at phi > 0 after " + ", ".join(f"{k} {f:.2f}" for k, f in rows[-1]["fraction_in_alpha_L"].items()),
              flush=True)
    res = {"benchmark": "alpha_l_survival", "model": args.model, "rows": rows, "hardware": hardware_description("CPU"),
           "torch": torch.__version__, "molflow": molflow.__version__, "python": platform.python_version(),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
