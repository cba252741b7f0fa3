"""The landscape refinement (phase 3 of the shipped map, issue 17): its probes side by side, and how far
the training data themselves are from the reference.

    python benchmarks/landscape_ibi_probes.py --reference ref_100fs.h5 \\
        --data W/data_20fs_a.h5 W/data_20fs_b.h5 --burn-ps 20 \\
        --probe "A: 3 updates, damping 0.7, data from 1 ps=fid_a.json" ... \\
        --out benchmarks/results/fidelity_cpu_landscape_ibi_probes.json

For each training file (whole, and without each replica's first ``--burn-ps``) it scores the
(phi, psi) law against the reference's judge half exactly as ``benchmarks/fidelity_cpu.py`` scores a
sampler (JS, 1-D and 2-D free-energy RMSE, basin populations): a map fitted to these data cannot be
expected to beat them. Each ``--probe`` is "description=path" of a ``fidelity_cpu.py`` JSON (its
first row is copied with its command); a ``MODEL.ibi.json`` log beside the probe's model is added.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True)
    ap.add_argument("--data", nargs="+", required=True, help="training runs (molflow simulate files)")
    ap.add_argument("--burn-ps", type=float, default=20.0)
    ap.add_argument("--probe", action="append", default=[], help="'description=fidelity_cpu JSON'")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from fidelity_cpu import stationary

    from molflow.evaluation.report import load_run, split_reference
    from molflow.systems import load_system

    system = load_system("alanine_dipeptide")
    split = split_reference(load_run(args.reference, system, "reference"))
    data = []
    for path in args.data:
        run = load_run(path, system, "data")
        burn = int(round(args.burn_ps / run.dt_ps))
        for label, r in (("all frames", run), (f"after {args.burn_ps:g} ps", run.subset(frames=slice(burn, None)))):
            st = stationary(split.judge, r, system)
            data.append({"file": Path(path).name, "frames": label, "replicas": int(r.phi.shape[0]),
                         "simulated_ns": float(r.phi.shape[0] * (r.phi.shape[1] - 1) * r.dt_ps / 1000.0),
                         **{k: v for k, v in st.items() if k != "energy_mean_kj_mol"}})
            print(f"{Path(path).name} ({label}): JS {st['js_phi_psi']:.4f}, FES phi/psi/2-D "
                  f"{st['fes_rmse_phi_kj_mol']:.2f}/{st['fes_rmse_psi_kj_mol']:.2f}/{st['fes_rmse_phi_psi_kj_mol']:.2f}, "
                  f"alpha_R {st['basin_populations']['alpha_R']['population']:.3f}", flush=True)
    probes = []
    for item in args.probe:
        desc, path = item.rsplit("=", 1)
        res = json.loads(Path(path).read_text())
        row = res["rows"][0]
        log = Path(res["model"] + ".ibi.json")
        probes.append({"description": desc, "model": res["model"], "command": res.get("command"),
                       "ibi_log": json.loads(log.read_text()) if log.exists() else None, "row": row})
        k = row[f"kinetics_{row['tau_ps']:g}ps"]
        print(f"{desc}: JS {row['js_phi_psi']:.4f}, FES {row['fes_rmse_phi_kj_mol']:.2f}/{row['fes_rmse_psi_kj_mol']:.2f}/"
              f"{row['fes_rmse_phi_psi_kj_mol']:.2f}, alpha_R {row['basin_populations']['alpha_R']['population']:.3f}, "
              f"flips {k['flips']}, ITS {k.get('implied_timescales_ns')}, basin changes/ns {k.get('basin_changes_per_ns')}",
              flush=True)
    out = {"benchmark": "landscape_ibi_probes", "command": " ".join(["python", "benchmarks/landscape_ibi_probes.py",
                                                                      *(argv if argv is not None else sys.argv[1:])]),
           "reference_split": split.describe(), "training_data_vs_judge": data, "probes": probes}
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
