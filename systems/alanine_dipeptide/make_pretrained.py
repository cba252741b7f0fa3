"""Make the pretrained alanine-dipeptide flow map shipped with molflow (``flowmap.pt`` beside this file).

    python systems/alanine_dipeptide/make_pretrained.py --work DIR [--steps 45000] [--finetune-steps 6000] [--landscape-iterations 4] [--pair-iterations 4] [--resume]
    python systems/alanine_dipeptide/make_pretrained.py --work DIR --pair-only   # phase 4 alone, on the 3-phase map at --out

Records the training data with ``molflow.simulate`` (two runs, 16 + 48 replicas x 100 ps = 6.4 ns,
20 fs frames, N = 3 path coefficients, fixed seeds; reused when ``DIR`` already holds them), trains
the map with ``molflow.train`` at tau_max = 0.5 ps in four phases (settings below, all recorded in
the checkpoints; checkpointed every 500 steps, ``--resume`` continues the same schedule after an
interruption): phase 1 with the default ``whitened_crps`` objective, phase 2 adds a binned torsion
drive to phase 1 (``init_from``, ``torsion_drive``, ``torsion_drive_bins``;
molflow.models.torsion_drive) and fits only the drive (``train_only``) to the backbone phi/psi
turns by log-likelihood on cached items of the frozen phase-1 network (``drive_cache_items``;
molflow.training.drive_fit): phase 1 alone kept the one-jump torsion steps 4-5x too narrow at 0.5
ps, and widening them through the Cartesian network strained the atoms that define them, which the
finish undid (README, issue 17). It then strips the
optimiser state (the file only needs to sample); phase 3 refines the drive's landscape by iterative
Boltzmann inversion (molflow.training.landscape_ibi: free-running rollouts of the map, the landscape
raised where they visit phi/psi end angles more often than the training data do, after each
replica's first 20 ps); phase 4 adds a pair landscape to the drive (a joint table of phi's and
psi's end angles on psi's turn, molflow.models.torsion_drive) and refines it with the 1-D tables by
the same inversion against the training data's joint (phi, psi) law; then it measures short free-running rollouts with the
recommended physical finish and writes ``flowmap.json`` with the settings, timings, hardware and
those measurements. Budget: at most 2 hours of wall clock on 2 CPU cores (the data take about 13
minutes of one core each with 2 workers, phase 1 about 109 minutes on one thread, phase 2 about 3 on two, phase 3 about 5 on two,
phase 4 about 2-5 on two). ``--pair-only`` runs phase 4 alone on the three-phase map already at ``--out``
(as the shipped map was made: phases 1-3 in one session, phase 4 in a later one) and adds its time.
``molflow quickstart`` samples with this map; ``benchmarks/fidelity_cpu.py`` measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# Two recordings with the same protocol (the first one made alone, the second one added); each is
# reproducible from its seed and layout.
DATA = (dict(name="data_20fs_a.h5", replicas=16, time_ps=100.0, frame_fs=20.0, n_coefficients=3,
             equilibrate_ps=10.0, seed=20261206),
        dict(name="data_20fs_b.h5", replicas=48, time_ps=100.0, frame_fs=20.0, n_coefficients=3,
             equilibrate_ps=10.0, seed=20261208))
TRAIN = dict(tau_max_ps=0.5, seed=7, n_features=32, n_layers=2, base="identity",
             config={"batch_size": 32, "objective": "whitened_crps", "input_noise_nm": 0.003,
                     "validate_every": 5000, "checkpoint_every": 500, "finish_steps": 20,
                     "finish_friction_per_ps": 300.0})
# Phase 2 (issue 17): a binned torsion drive (hidden width 64, 72 bins; molflow.models.torsion_drive)
# added to phase 1, only its weights trained, fitted on cached items of the frozen phase-1 network
# (drive_cache_items; molflow.training.drive_fit): 65536 items x 2 latent draws, half of them jumping
# tau_max, then 6000 log-likelihood steps of 1024 items at lr 3e-3. Chosen on probes from phase 1
# (benchmarks/results/torsion_drive_probes_cpu.json): an implicit drive trained through the step loop
# (the previous phase 2) kept alpha_R at 0.10 (MD 0.41); fitted on the cache by the energy score it
# reached 0.20 but its heavy phi tails carried it past -pi into alpha_L 3% of the time; the binned law
# brought alpha_R to 0.40 and alpha_L to 0.7% (probe b1); a learned landscape of the end angle (72
# nodes) prices the wall past -pi once for all starts (README, issue 17).
FINETUNE = dict(tau_max_ps=0.5, seed=11,
                config={**TRAIN["config"], "torsion_drive": 64, "torsion_drive_bins": 72, "torsion_drive_landscape": 72,
                        "train_only": "torsion_drive",
                        "objective": "torsion_crps", "drive_cache_items": 65536, "drive_cache_draws": 2,
                        "drive_tau_max_share": 0.5, "batch_size": 1024, "lr": 3e-3, "validation_items": 2048,
                        "finish_steps": 60, "finish_friction_per_ps": 100.0})
PROBE_TAUS = (0.1, 0.5)
# The finish recommended to samplers of the shipped map (sample_finish in the checkpoint): chosen by
# measurement on this map at tau = 0.5 ps (benchmarks/fidelity_cpu.py levers; README). 60 steps of
# 1 fs at 100/ps brought every bond's and angle's spread within 10% of MD and the energy within 2
# kJ/mol, where the training default (20 at 300/ps, used by the end-of-training verdict) left
# heavy-atom angles up to 1.4x too wide and the energy ~+11 kJ/mol. The same relaxation time costs
# fewer force evaluations in 2-fs steps (BAOAB is stable there at high friction and exact for harmonic
# modes), and 5 closing steps of 1 fs at 300/ps give back the reference MD's on-step velocities (2-fs
# steps alone read 276 K against MD's 294 K): 25 force evaluations instead of 60, measured in
# 32 x 100-ps screens beside the 60-step finish (energy -0.2/+0.4 kJ/mol against +0.9, T_kin 292-293 K,
# spreads within 5%; 20 steps: energy +1.3). benchmarks/results/fidelity_cpu.json measures it at length.
# Phase 3 (issue 17): the drive's landscape refined by iterative Boltzmann inversion
# (molflow.training.landscape_ibi) so the free-running map's phi/psi end-angle marginals match the
# training data's, with the first DATA_BURN_PS of every training replica left out of the target (the
# replicas start from the minimised structure, in beta: in data_20fs_b alpha_R holds 0.351 of all frames
# and 0.390 after the first 20 ps, benchmarks/results/fidelity_cpu_landscape_ibi_probes.json).
# Measured: README, issue 17.
LANDSCAPE_IBI = dict(iterations=4, replicas=32, jumps=800, burn_jumps=40, damping=0.7, damping_decay=0.7,
                     clip_kT=2.0, pseudo_count=0.5, seed=100)
DATA_BURN_PS = 20.0
# Phase 4 (issue 17): after phase 3 the phi and psi free energies were within 0.8 kJ/mol of MD but the
# joint one 1.8 kJ/mol and JS(phi, psi) 0.015: psi's law did not depend on where phi ended as MD's
# does. A pair landscape (PAIR_NODES per axis) on psi's turn, refined with the 1-D tables by the same
# inversion against the training data's joint (phi, psi) counts. Measured: README, issue 17.
PAIR_NODES = 24
SAMPLE_FINISH = {"n_steps": 25, "friction_per_ps": 100.0, "timestep_fs": 2.0, "settle_steps": 5,
                 "settle_friction_per_ps": 300.0}


def refine_phase(ck: dict, files: list[str], work: Path, iterations: int, pair_nodes: int,
                 quiet: bool) -> tuple[list[dict], float]:
    """Phase 3 (``pair_nodes`` 0: the drive's 1-D landscapes) or phase 4 (a pair landscape of
    ``pair_nodes`` per axis added, refined with the 1-D ones): iterative Boltzmann inversion
    (molflow.training.landscape_ibi) of the map in checkpoint ``ck`` against the training data after
    each replica's first DATA_BURN_PS, with the shipped finish. Updates ``ck``'s model and EMA tables
    in place; returns (records, wall seconds)."""
    import h5py

    import molflow
    from molflow.checkpoint import save_checkpoint
    from molflow.finish import FinishConfig
    from molflow.sampling import start_states_from_run
    from molflow.training.landscape_ibi import LandscapeIBIConfig, refine_landscape

    t0 = time.perf_counter()
    tables = ["drive.landscape"]
    if pair_nodes:
        ck["map_config_json"] = {**ck["map_config_json"], "torsion_drive_landscape_pair": pair_nodes}
        for k in ("model", "ema"):
            ck[k]["drive.landscape_pair"] = torch.zeros(pair_nodes, pair_nodes, dtype=ck[k]["drive.landscape"].dtype)
        tables.append("drive.landscape_pair")
    start = work / "refine_start.pt"
    save_checkpoint(start, ck)
    fm = molflow.FlowMap.load(start, device="cpu")
    target = []
    for d, path in zip(DATA, files):
        with h5py.File(path, "r") as f:
            burn = int(round(DATA_BURN_PS * 1000.0 / d["frame_fs"]))
            target.append(f["positions"][:, burn:].reshape(-1, fm.system.n_atoms, 3))
    cfg = LandscapeIBIConfig(**{**LANDSCAPE_IBI, "iterations": iterations})
    records = refine_landscape(fm, np.concatenate(target), start_states_from_run(files[-1], cfg.replicas),
                               cfg, finish=FinishConfig(**SAMPLE_FINISH), progress=not quiet)
    state = fm.model.state_dict()
    for k in ("model", "ema"):
        for name in tables:
            ck[k][name] = state[name].detach().cpu().to(ck[k][name].dtype)
    start.unlink()
    return records, time.perf_counter() - t0


def main() -> int:
    import molflow
    from molflow.md.engine import hardware_description
    from molflow.sampling import start_states_from_run
    from molflow.checkpoint import load_checkpoint, save_checkpoint
    from molflow.training.landscape_ibi import records_summary
    from molflow.units import kinetic_temperature

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=45000, help="phase-1 optimiser steps (default 45000)")
    ap.add_argument("--finetune-steps", type=int, default=6000, help="phase-2 optimiser steps (default 6000; 0: none)")
    ap.add_argument("--landscape-iterations", type=int, default=LANDSCAPE_IBI["iterations"],
                    help="phase-3 landscape refinement iterations (default %(default)s; 0: none)")
    ap.add_argument("--pair-iterations", type=int, default=LANDSCAPE_IBI["iterations"],
                    help="phase-4 pair-landscape refinement iterations (default %(default)s; 0: none)")
    ap.add_argument("--pair-only", action="store_true",
                    help="run phase 4 alone on the three-phase map at --out (its JSON keeps the earlier phases' record)")
    ap.add_argument("--phase1-from", metavar="MAP",
                    help="take phase 1 from MAP's network (e.g. the shipped flowmap.pt: phases 2-4 leave the network "
                         "untouched) instead of training it again; written to WORK/model_full.pt, its training time "
                         "read from MAP's JSON")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", required=True, help="folder for the training data and the full checkpoint")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted training run in --work")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=str(HERE / "flowmap.pt"))
    ap.add_argument("--reuse", action="store_true", help="reuse finished training runs (either phase) in --work")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    md_s = 0.0  # wall seconds spent recording here (0 when every file was reused)
    files = []
    for d in DATA:
        path = work / d["name"]
        if not path.exists():
            t0 = time.perf_counter()
            settings = {k: v for k, v in d.items() if k != "name"}
            molflow.simulate("alanine_dipeptide", path, overwrite=True, progress=True, **settings).close()
            md_s += time.perf_counter() - t0
        files.append(str(path))
    full = work / "model_full.pt"
    train_s = tune_s = ibi_s = pair_s = None  # wall seconds, None when reused or not run
    ibi_records = pair_records = None
    if args.phase1_from and not full.exists():
        from molflow.checkpoint import without_torsion_drive

        save_checkpoint(full, without_torsion_drive(load_checkpoint(args.phase1_from)))
        train_s = json.loads(Path(args.phase1_from).with_suffix(".json").read_text()).get("train_wall_s")
        args.reuse = True  # phase 1 is done; phases 2-4 run unless their files are in WORK
    if args.pair_only:  # phase 4 on the shipped three-phase map
        ck = load_checkpoint(args.out)
        if ck["map_config_json"].get("torsion_drive_landscape_pair"):
            raise SystemExit(f"{args.out} already has a pair landscape: --pair-only needs the three-phase map")
    else:
        if not (args.reuse and full.exists()):
            t0 = time.perf_counter()
            molflow.train("alanine_dipeptide", data=files, out=full, steps=args.steps, device=args.device,
                          progress=not args.quiet, resume=args.resume and full.exists(), **TRAIN)
            train_s = time.perf_counter() - t0
        tuned = work / "model_drive.pt"
        if args.finetune_steps and not (args.reuse and tuned.exists()):
            torch.set_num_threads(os.cpu_count() or 1)  # phase 2's cache and fit use both cores
            t0 = time.perf_counter()
            resume = args.resume and tuned.exists()
            molflow.train("alanine_dipeptide", data=files, out=tuned, steps=args.finetune_steps, device=args.device,
                          progress=not args.quiet, resume=resume, overwrite=not resume,
                          init_from=None if resume else full, **FINETUNE)
            tune_s = time.perf_counter() - t0
        ck = load_checkpoint(tuned if args.finetune_steps else full)
        if args.landscape_iterations:  # phase 3, on the phase-2 map with the finish shipped below
            ibi_records, ibi_s = refine_phase(ck, files, work, args.landscape_iterations, 0, args.quiet)
            print(f"phase 3: {records_summary(ibi_records)} ({ibi_s:.0f} s)", flush=True)
    if args.pair_iterations:  # phase 4: the pair landscape, on the phase-3 map
        torch.set_num_threads(os.cpu_count() or 1)
        pair_records, pair_s = refine_phase(ck, files, work, args.pair_iterations, PAIR_NODES, args.quiet)
        print(f"phase 4: {records_summary(pair_records)} ({pair_s:.0f} s)", flush=True)
    keep = ("model", "ema", "step", "h0_ps", "seed", "map_config_json", "train_config_json", "system_json",
            "normalisation_json", "history_json", "health_json", "verdict_json", "sample_finish_json")
    # the per-step history (tens of thousands of rows) stays in model_full.pt.metrics.csv; the shipped
    # file keeps the validation rows and the last one
    hist = [r for r in ck.get("history_json") or [] if any(k.startswith("val_") for k in r)]
    hist += (ck.get("history_json") or [])[-1:]
    save_checkpoint(args.out, {**{k: ck[k] for k in keep if k in ck}, "history_json": hist,
                               "sample_finish_json": SAMPLE_FINISH})

    fm = molflow.FlowMap.load(args.out, device="cpu")
    x0, v0 = start_states_from_run(files[0], 32)
    probes = {}
    for mode in ("sample",):
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
    previous = Path(args.out).with_suffix(".json")
    old = json.loads(previous.read_text()) if previous.exists() else {}
    if train_s is None:  # --reuse/--pair-only: keep the timing the training run measured
        train_s = old.get("train_wall_s")
        md_s = old.get("md_wall_s", md_s)
    if tune_s is None and args.finetune_steps:
        tune_s = old.get("finetune_wall_s")
    landscape_meta = {**LANDSCAPE_IBI, "iterations": args.landscape_iterations, "data_burn_ps": DATA_BURN_PS,
                      "records": ibi_records, "threads": torch.get_num_threads()}
    if args.pair_only:  # phase 3 ran in the earlier session: its record stands
        landscape_meta, ibi_s = old.get("landscape_ibi"), old.get("landscape_ibi_wall_s")
    meta = {"file": Path(args.out).name, "data": list(DATA), "train": {**TRAIN, "steps": args.steps},
            "sample_finish": SAMPLE_FINISH,
            "finetune": {**FINETUNE, "steps": args.finetune_steps, "init_from": "phase 1 (model_full.pt)",
                         "threads": torch.get_num_threads()},
            "md_wall_s": md_s, "train_wall_s": train_s,
            "train_steps_per_s": args.steps / train_s if train_s else None, "finetune_wall_s": tune_s,
            "landscape_ibi": landscape_meta, "landscape_ibi_wall_s": ibi_s,
            "pair_landscape_ibi": {**LANDSCAPE_IBI, "iterations": args.pair_iterations, "nodes": PAIR_NODES,
                                   "data_burn_ps": DATA_BURN_PS, "records": pair_records,
                                   "threads": torch.get_num_threads(),
                                   "session": "a later session than phases 1-3 (--pair-only)" if args.pair_only else "same run"},
            "pair_landscape_ibi_wall_s": pair_s,
            "total_training_wall_s": (train_s or 0) + (tune_s or 0) + (ibi_s or 0) + (pair_s or 0) if train_s else None,
            "hardware": hardware_description("CPU"),
            "torch": torch.__version__, "molflow": molflow.__version__, "python": platform.python_version(),
            "size_bytes": Path(args.out).stat().st_size, "rollout_probes_2ps_from_data_states": probes,
            "verdict": ck.get("verdict_json"),
            "health": ck.get("health_json"),
            "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    if args.pair_only:
        meta["command_phases_1_3"] = old.get("command_phases_1_3", old.get("command"))
    Path(args.out).with_suffix(".json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
