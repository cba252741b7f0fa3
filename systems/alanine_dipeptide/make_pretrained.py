"""Make the pretrained alanine-dipeptide flow map shipped with molflow (``flowmap.pt`` beside this file).

    python systems/alanine_dipeptide/make_pretrained.py [--steps 2000] [--device auto] [--work DIR]

Records reference data with ``molflow.simulate`` (20 fs frames, N = 3 path coefficients), trains a
small map with ``molflow.train`` (settings below, all recorded in the checkpoint), strips the
optimiser state (the file only needs to sample), measures free-running rollouts at a few jump lengths
and writes ``flowmap.json`` with the settings, timings, hardware and those measurements.
``molflow quickstart`` samples with this map. It is CPU-sized: a map trained on a GPU with
``molflow train`` at full size is far better (README).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = dict(replicas=8, time_ps=50.0, frame_fs=20.0, n_coefficients=3, equilibrate_ps=10.0, seed=20261123)
TRAIN = dict(tau_max_ps=0.1, seed=7, config={"batch_size": 16, "objective": "whitened_crps", "input_noise_nm": 0.006}, n_features=32, n_layers=2, base="identity")
PROBE_TAUS = (0.02, 0.05, 0.1)


def main() -> int:
    import molflow
    from molflow.md.engine import hardware_description
    from molflow.sampling import start_states_from_run
    from molflow.checkpoint import load_checkpoint, save_checkpoint
    from molflow.units import kinetic_temperature

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", help="folder for the training data (default: a temporary folder)")
    ap.add_argument("--out", default=str(HERE / "flowmap.pt"))
    ap.add_argument("--reuse", action="store_true", help="reuse a finished training run in --work")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="molflow-pretrain-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data_20fs.h5"
    md_s = None  # wall seconds, None when reused
    if not data.exists():
        t0 = time.perf_counter()
        molflow.simulate("alanine_dipeptide", data, overwrite=True, progress=True, **DATA).close()
        md_s = time.perf_counter() - t0
    full = work / "model_full.pt"
    train_s = None  # wall seconds, None when reused
    if not (args.reuse and full.exists()):
        t0 = time.perf_counter()
        molflow.train("alanine_dipeptide", data=[str(data)], out=full, steps=args.steps, device=args.device,
                      progress=True, **TRAIN)
        train_s = time.perf_counter() - t0
    ck = load_checkpoint(full)
    keep = ("model", "ema", "step", "h0_ps", "seed", "map_config_json", "train_config_json", "system_json",
            "normalisation_json", "history_json")
    save_checkpoint(args.out, {k: ck[k] for k in keep})

    fm = molflow.FlowMap.load(args.out, device="cpu")
    x0, v0 = start_states_from_run(data, 32)
    probes = {}
    for mode in ("sample", "mean"):
        for tau in PROBE_TAUS:
            try:
                out = fm.sample((x0, v0), n_jumps=int(round(2.0 / tau)), tau_ps=tau, seed=1, mode=mode)
            except molflow.SimulationError as exc:
                probes[f"{mode}_{tau:g}ps"] = {"jumps": int(round(2.0 / tau)), "replicas": 32, "all_stopped": str(exc)}
                print(mode, tau, probes[f"{mode}_{tau:g}ps"], flush=True)
                continue
            stopped = out["stopped_at_jump"]
            v = out["velocities"][:, 1:]
            ok = np.isfinite(v).all(axis=(2, 3))
            probes[f"{mode}_{tau:g}ps"] = {
                "jumps": int(round(2.0 / tau)), "replicas": 32, "restarts": int(out["restarts_per_replica"].sum()),
                "stopped": int((stopped >= 0).sum()),
                "median_stop_jump": float(np.median(stopped[stopped >= 0])) if (stopped >= 0).any() else None,
                "kinetic_temperature_K": float(kinetic_temperature(v[ok], fm.system.masses_amu).mean()) if ok.any() else None,
            }
            print(mode, tau, probes[f"{mode}_{tau:g}ps"], flush=True)
    meta = {"file": Path(args.out).name, "data": DATA, "train": {**TRAIN, "steps": args.steps},
            "md_wall_s": md_s, "train_wall_s": train_s, "hardware": hardware_description("CPU"),
            "torch": torch.__version__, "molflow": molflow.__version__, "python": platform.python_version(),
            "size_bytes": Path(args.out).stat().st_size, "rollout_probes_2ps_from_data_states": probes,
            "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    Path(args.out).with_suffix(".json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
