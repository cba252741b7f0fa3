"""Benchmark: free-running flow-map rollouts against reference MD on alanine dipeptide (not a test).

Records (or reuses) reference MD, rolls out a trained map free-running in ``sample`` mode from states
spread over the reference, evaluates the rollouts with ``molflow.evaluate`` and reports JS(φ,ψ),
2-D free-energy RMSE, φ transition rates, the slowest implied timescale, kinetic temperature and the
aggregate simulated ns per wall-clock second of the sampler and of the multi-copy OpenMM engine on
the same machine. Prints a table and writes JSON (hardware, versions, settings, every number).

    python benchmarks/sampler_vs_md.py --model systems/alanine_dipeptide/flowmap.pt --size small \\
        --out benchmarks/results/sampler_vs_md_cpu_small.json
    # the #4 target (lent GPU; >= 1 us each): a map trained to tau_max >= 1 ps at full size
    python benchmarks/sampler_vs_md.py --model model_gpu.pt --size full --tau-ps 1.0 --device cuda \\
        --out benchmarks/results/sampler_vs_md_gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import molflow
from molflow.sampling import start_states_from_run

SIZES = {  # reference replicas x ps; sampler replicas x jumps
    "small": dict(ref_replicas=4, ref_ps=250.0, replicas=16, jumps=200),
    "full": dict(ref_replicas=512, ref_ps=2000.0, replicas=1024, jumps=1000),  # 1 us each at tau = 1 ps
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--tau-ps", type=float, default=0.1)
    ap.add_argument("--mode", choices=["sample", "mean"], default="sample")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--platform", default="auto", help="OpenMM platform for the reference")
    ap.add_argument("--reference", help="reuse this reference run (100 fs frames)")
    ap.add_argument("--work", default="benchmark-sampler")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    z = SIZES[args.size]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ref = Path(args.reference) if args.reference else work / "reference.h5"
    if not ref.exists():
        molflow.simulate("alanine_dipeptide", ref, replicas=z["ref_replicas"], time_ps=z["ref_ps"], frame_fs=100.0,
                         n_coefficients=3, equilibrate_ps=10.0, seed=1, platform=args.platform).close()
    fm = molflow.FlowMap.load(args.model, system="alanine_dipeptide", device=args.device)
    x0, v0 = start_states_from_run(ref, z["replicas"])
    samples = work / "samples.h5"
    t0 = time.perf_counter()
    fm.sample((x0, v0), n_jumps=z["jumps"], tau_ps=args.tau_ps, seed=2, mode=args.mode, out=samples,
              overwrite=True, progress=True).close()
    sample_wall = time.perf_counter() - t0
    m = molflow.evaluate(ref, samples, work / "report", progress=False)

    def kin(row, who):
        k = row["kinetics"][who]
        its = k.get("implied_timescale_ns") or {}
        slow = (its.get("timescales_ns") or [[None]])[0]
        return {"rate_neg_to_pos_per_ns": k.get("rate_neg_to_pos_per_ns"),
                "rate_pos_to_neg_per_ns": k.get("rate_pos_to_neg_per_ns"),
                "slowest_implied_timescale_ns_first_lag": slow[0] if slow else None}

    table = {
        "js_phi_psi": m["stationary"]["js_phi_psi"],
        "js_phi_psi_noise_floor": m["noise_floor"]["stationary"]["js_phi_psi"],
        "fes_rmse_kj_mol_2d": m["stationary"]["fes_rmse_kj_mol"]["phi_psi"],
        "kinetic_temperature_k": m["stationary"]["kinetic_temperature_k"],
        "kinetics_reference": kin(m, "reference"), "kinetics_samples": kin(m, "samples"),
        "ns_per_wall_s_sampler": m["cost"]["samples"].get("ns_per_wall_s"),
        "ns_per_wall_s_reference_md": m["cost"]["reference"].get("ns_per_wall_s"),
        "sampler_wall_s_with_io": sample_wall, "n_restarts": m["samples"].get("n_restarts"),
        "n_stopped": m["samples"].get("n_stopped"), "samples_simulated_ns": m["samples"]["simulated_ns"],
        "reference_simulated_ns": m["reference"]["simulated_ns"],
    }
    result = {"benchmark": "sampler_vs_md", "size": args.size, "settings": {**z, **vars(args)},
              "hardware": {"sampler": m["cost"]["samples"].get("hardware"),
                           "reference": m["cost"]["reference"].get("hardware")},
              "versions": {"molflow": molflow.__version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "results": table, "report": str(work / "report" / "report.md")}
    for k, v in table.items():
        print(f"{k:38s} {v}")
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
