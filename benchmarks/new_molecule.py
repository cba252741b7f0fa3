"""A new molecule, end to end (user story 2): simulate -> train -> sample -> evaluate, on CPU.

    python benchmarks/new_molecule.py --size small --out benchmarks/results/new_molecule_cpu_small.json
    python benchmarks/new_molecule.py --size full --device cuda --out benchmarks/results/new_molecule_gpu.json

For each molecule — trialanine (built in) and capped glycine ACE-GLY-NME, which is *not* built in:
its PDB is written by :func:`write_glycine_dipeptide` from the alanine-dipeptide structure (CB
replaced by a hydrogen HA3 on the CA-CB axis, its methyl hydrogens dropped, HA renamed HA2), the
way a user brings a peptide as a PDB file — the script runs the commands a user would run
(``molflow simulate``, ``train``, ``sample``, ``evaluate``, all through the CLI) and records:

- training wall time, skipped steps and restores, and the end-of-training verdict;
- for each tau in 0.1/0.2/0.5 ps (those <= the trained tau_max; longer ones with --extrapolate):
  restarts and stopped replicas, bond-spread ratio (median, worst) against the reference MD,
  kinetic temperature, potential-energy mean minus the reference's, JS(phi, psi) and the
  reference halves' noise floor (from ``molflow evaluate``), and the sampler's speed beside the
  MD's: simulated ns per wall-clock second and molecule-jumps per second, the MD measured on the
  same machine in the same run (``wall_clock_s`` of its file; its frames cost single-molecule energy
  evaluations too, so stock OpenMM is faster still: see benchmarks/md_throughput.py).

Prints a table and writes JSON with the hardware, versions and every setting.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {
    # data: replicas x ps at 20 fs; ref: replicas x ps at 100 fs; steps; sample replicas x jumps
    "tiny": dict(data=(2, 10.0), ref=(2, 20.0), steps=60, tau_max=0.1, taus=(0.1,), replicas=4, jumps=10,
                 config={"n_features": 16, "n_layers": 2, "verdict_replicas": 4, "verdict_jumps": 5}),
    "small": dict(data=(8, 50.0), ref=(4, 500.0), steps=3000, tau_max=0.5, taus=(0.1, 0.2, 0.5), replicas=16,
                  jumps=200, config={"n_features": 32, "n_layers": 2}),
    "full": dict(data=(64, 200.0), ref=(32, 2000.0), steps=50000, tau_max=1.0, taus=(0.1, 0.2, 0.5, 1.0),
                 replicas=256, jumps=1000, config={"n_features": 64, "n_layers": 3}),
}


def write_glycine_dipeptide(path: str | Path) -> Path:
    """Write ACE-GLY-NME (19 atoms) built from the alanine-dipeptide structure: HA -> HA2, CB -> HA3
    at 0.109 nm from CA along CA-CB, HB1-3 dropped. Unminimised: ``molflow simulate`` minimises."""
    from molflow.systems import systems_dir

    out, serial = [], 0
    lines = (systems_dir() / "alanine_dipeptide" / "structure.pdb").read_text().splitlines()
    xyz = {ln[12:16].strip(): np.array([float(ln[30:38]), float(ln[38:46]), float(ln[46:54])])
           for ln in lines if ln.startswith("ATOM") and ln[17:20] == "ALA"}
    for ln in lines:
        if ln.startswith(("ATOM", "HETATM")):
            name, res = ln[12:16].strip(), ln[17:20]
            if res == "ALA":
                if name in ("HB1", "HB2", "HB3"):
                    continue
                if name == "HA":
                    ln = ln[:12] + " HA2" + ln[16:]
                if name == "CB":
                    d = xyz["CB"] - xyz["CA"]
                    p = xyz["CA"] + 1.09 * d / np.linalg.norm(d)  # PDB is in Angstrom
                    ln = f"{ln[:12]} HA3{ln[16:30]}{p[0]:8.3f}{p[1]:8.3f}{p[2]:8.3f}{ln[54:76]} H  "
                ln = ln[:17] + "GLY" + ln[20:]
            serial += 1
            ln = f"{ln[:6]}{serial:5d}{ln[11:]}"
        elif ln.startswith("REMARK"):
            ln = "REMARK   1 ACE-GLY-NME MADE FROM THE ALANINE-DIPEPTIDE STRUCTURE (benchmarks/new_molecule.py)"
        elif ln.startswith("TER"):
            ln = f"TER   {serial + 1:5d}      NME A   3"
        out.append(ln)
    path = Path(path)
    path.write_text("\n".join(out) + "\n")
    return path


def _molflow(*args: str) -> float:
    """Run one molflow command (as a user would); returns its wall time (s)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "molflow", "--quiet", *args], check=True)
    return time.perf_counter() - t0


def run_molecule(name: str, system: str, work: Path, size: dict, device: str, seed: int) -> dict:
    import molflow
    from molflow.checkpoint import load_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    data, ref, model = work / "data.h5", work / "ref.h5", work / "model.pt"
    (r, t), (rr, tr) = size["data"], size["ref"]
    md_s = _molflow("simulate", system, "--out", str(data), "--replicas", str(r), "--time-ps", str(t),
                    "--frame-fs", "20", "--coefficients", "3", "--seed", str(seed), "--overwrite")
    ref_s = _molflow("simulate", system, "--out", str(ref), "--replicas", str(rr), "--time-ps", str(tr),
                     "--frame-fs", "100", "--coefficients", "0", "--seed", str(seed + 1), "--overwrite")
    cfg = work / "config.yaml"
    cfg.write_text(json.dumps(size["config"]))  # JSON is YAML
    train_s = _molflow("train", system, "--data", str(data), "--out", str(model), "--tau-max-ps", str(size["tau_max"]),
                       "--steps", str(size["steps"]), "--seed", str(seed), "--device", device, "--config", str(cfg),
                       "--overwrite")
    ck = load_checkpoint(model)
    health = ck.get("health_json") or {}
    with molflow.Trajectory(ref) as t_ref:
        md_ns_per_s = t_ref.n_replicas * (t_ref.n_frames - 1) * t_ref.frame_interval_ps / 1000 / t_ref.attrs["wall_clock_s"]
    row = {"molecule": name, "system": system, "md_data_wall_s": md_s, "md_reference_wall_s": ref_s,
           "train_wall_s": train_s, "steps": size["steps"], "skipped_steps": health.get("skipped_steps"),
           "restores": health.get("restores"), "teacher_excluded": health.get("teacher_excluded"),
           "verdict": ck.get("verdict_json"), "md_ns_per_wall_s": md_ns_per_s, "taus": []}
    for tau in size["taus"]:
        out = work / f"samples_{tau:g}.h5"
        extra = ["--extrapolate"] if tau > size["tau_max"] + 1e-9 else []
        entry: dict = {"tau_ps": tau}
        try:
            wall = _molflow("sample", str(model), "--from", str(data), "--out", str(out), "--tau-ps", str(tau),
                            "--replicas", str(size["replicas"]), "--jumps", str(size["jumps"]), "--seed", str(seed),
                            "--device", device, "--overwrite", *extra)
        except subprocess.CalledProcessError as exc:
            entry["error"] = f"molflow sample exited {exc.returncode}"
            row["taus"].append(entry)
            continue
        report = work / f"report_{tau:g}"
        _molflow("evaluate", "--reference", str(ref), "--samples", str(out), "--report", str(report))
        metrics = json.loads((report / "metrics.json").read_text())
        with molflow.Trajectory(out) as s:
            a = s.attrs
            jumps = s.n_replicas * (s.n_frames - 1)
            entry.update(restarts=int(a["n_restarts"]), stopped=int(a["n_stopped"]), sample_wall_s=wall,
                         sampler_wall_clock_s=float(a["wall_clock_s"]),
                         molecule_jumps_per_s=jumps / float(a["wall_clock_s"]),
                         ns_per_wall_s=jumps * tau / 1000 / float(a["wall_clock_s"]))
        entry["speed_vs_md"] = entry["ns_per_wall_s"] / md_ns_per_s
        entry.update(_structure(ref, out))
        st = metrics.get("stationary", {})
        entry["js_phi_psi"] = st.get("js_phi_psi")
        entry["js_noise_floor"] = (metrics.get("noise_floor") or {}).get("stationary", {}).get("js_phi_psi") \
            if isinstance(metrics.get("noise_floor"), dict) else None
        row["taus"].append(entry)
    return row


def _structure(ref: Path, samples: Path) -> dict:
    """Bond-spread ratios, kinetic temperature and potential-energy mean vs the reference."""
    import molflow
    from molflow.md.engine import EnergyEvaluator
    from molflow.units import kinetic_temperature

    with molflow.Trajectory(ref) as r, molflow.Trajectory(samples) as s:
        mol = r.system()
        b = np.asarray(mol.bonds, dtype=int).reshape(-1, 2)
        xr = np.asarray(r.positions).reshape(-1, mol.n_atoms, 3).astype(np.float64)
        xs = np.asarray(s.positions[:, 1:]).reshape(-1, mol.n_atoms, 3).astype(np.float64)
        vs = np.asarray(s.velocities[:, 1:]).reshape(-1, mol.n_atoms, 3).astype(np.float64)
        ok = np.isfinite(xs).all(axis=(1, 2))
        xs, vs = xs[ok], vs[ok]
        e_ref = float(np.asarray(r.potential_energy).mean())
    bl = lambda x: np.linalg.norm(x[:, b[:, 0]] - x[:, b[:, 1]], axis=-1)  # noqa: E731
    ratio = bl(xs).std(0) / bl(xr).std(0)
    ev = EnergyEvaluator(mol, "Reference")
    pick = xs[np.linspace(0, len(xs) - 1, min(len(xs), 2000)).astype(int)]
    return {"bond_spread_ratio_median": float(np.median(ratio)), "bond_spread_ratio_max": float(ratio.max()),
            "kinetic_temperature_K": float(kinetic_temperature(vs, mol.masses_amu).mean()),
            "energy_mean_minus_reference_kj_mol": float(ev(pick).mean() - e_ref)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--work", default="new_molecule_work", help="folder for runs and models")
    ap.add_argument("--molecules", default="glycine_dipeptide,trialanine")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    import molflow
    from molflow.md.engine import cpu_description

    size = SIZES[args.size]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.molecules.split(","):
        system = str(write_glycine_dipeptide(work / "ace_gly_nme.pdb")) if name == "glycine_dipeptide" else name
        rows.append(run_molecule(name, system, work / name, size, args.device, args.seed))
    result = {"benchmark": "new_molecule", "size": args.size, "settings": size, "seed": args.seed,
              "hardware": cpu_description(), "python": platform.python_version(), "torch": torch.__version__,
              "molflow": molflow.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(f"{'molecule':<18} {'tau':>5} {'restarts':>8} {'stopped':>7} {'bond med':>8} {'bond max':>8} "
          f"{'T_kin':>6} {'dE':>7} {'JS':>6} {'floor':>6} {'x MD':>6}")
    for row in rows:
        for e in row["taus"]:
            if "error" in e:
                print(f"{row['molecule']:<18} {e['tau_ps']:5.2f} {e['error']}")
                continue
            print(f"{row['molecule']:<18} {e['tau_ps']:5.2f} {e['restarts']:8d} {e['stopped']:7d} "
                  f"{e['bond_spread_ratio_median']:8.2f} {e['bond_spread_ratio_max']:8.2f} "
                  f"{e['kinetic_temperature_K']:6.0f} {e['energy_mean_minus_reference_kj_mol']:7.1f} "
                  f"{(e['js_phi_psi'] or float('nan')):6.3f} {(e['js_noise_floor'] or float('nan')):6.3f} "
                  f"{e['speed_vs_md']:6.2f}")
        print(f"{row['molecule']}: trained {row['steps']} steps in {row['train_wall_s']:.0f} s; "
              f"{(row['verdict'] or {}).get('line', 'no verdict')}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
