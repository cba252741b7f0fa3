"""Make the pretrained alanine-dipeptide flow map shipped with molflow (``flowmap.pt`` beside this file).

    python systems/alanine_dipeptide/make_pretrained.py --work DIR [--steps 45000] [--finetune-steps 6000] [--landscape-iterations 8] [--resume]
    python systems/alanine_dipeptide/make_pretrained.py --work DIR --phase1-from systems/alanine_dipeptide/flowmap.pt   # phases 2-3 only

**Data** (reused when ``DIR`` already holds them; fixed seeds): two MD recordings with
``molflow.simulate`` (16 + 48 replicas x 100 ps = 6.4 ns, 20-fs frames, N = 3 path coefficients);
umbrella sampling along phi (molflow.md.umbrella: 36 windows x 400 ps with stock OpenMM, unbiased by
MBAR), the only data that price the alpha_L basin (2.7% of the Boltzmann law; plain MD enters it about
twice per 100 ns); and 32 x 50 ps of MD started in alpha_L (molflow.md.umbrella.
system_at_backbone_dihedrals), so the drive learns how torsions turn there.

**Training** at tau_max = 0.5 ps in three phases (settings below, all recorded in the checkpoints;
checkpointed every 500 steps, ``--resume`` continues the same schedule after an interruption):
phase 1 trains the network with the default ``whitened_crps`` objective on the two MD recordings.
Phase 2 adds a binned torsion drive to phase 1 (``init_from``, ``torsion_drive``,
``torsion_drive_bins``; molflow.models.torsion_drive) and fits only the drive (``train_only``) to the
backbone phi/psi turns by log-likelihood on cached items of the frozen phase-1 network
(``drive_cache_items``; molflow.training.drive_fit), with the alpha_L recording among its data: phase
1 alone kept the one-jump torsion steps 4-5x too narrow at 0.5 ps, and widening them through the
Cartesian network strained the atoms that define them, which the finish undid; a drive fitted
without alpha_L data threw every alpha_L state out in one jump (README, issue 17). Phase 3 refines
the drive's landscapes, the 1-D end-angle tables and a joint (phi end, psi end) table on psi's turn,
by iterative Boltzmann inversion (molflow.training.landscape_ibi) against the umbrella law (the
windows' frames with their MBAR weights): rollouts start from umbrella frames drawn by weight, a
quarter of them at phi > 0, each rollout's frames weighted back by its start's weight
(landscape_ibi.stratified_starts), so the starts are the umbrella law without the binomial noise of
the two alpha_L starts plain resampling would give (a probe with that noise overshot alpha_L to 8%).
Then it strips the optimiser state (the file only needs to
sample), measures short free-running rollouts with the recommended physical finish and writes
``flowmap.json`` with the settings, timings, hardware and those measurements.

Budget: at most 2 hours of wall clock on 2 CPU cores for the training (phase 1 about 109 minutes on
one thread, phase 2 about 3.5 on two, phase 3 about 4 on two). The data are recorded once and timed
apart (``md_wall_s``: the two recordings about 13 minutes of one core each with 2 workers, the
umbrella windows about 3 minutes on 2, the alpha_L recording about half a minute).
``--phase1-from MAP`` takes phase 1 from MAP's network (the shipped map's: phases 2-3 leave the
network untouched) with MAP's recorded phase-1 time, so phases 2-3 can be redone within the budget.
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
# MD started in alpha_L (phi, psi) = (1.0, 0.6) rad, for phase 2's drive fit (issue 17: a drive fitted
# without it ejected alpha_L states in one jump, benchmarks/results/alpha_l_survival_cpu.json).
ALPHA_L_DATA = dict(name="alpha_l_50ps.h5", replicas=32, time_ps=50.0, frame_fs=20.0, n_coefficients=3,
                    equilibrate_ps=5.0, seed=20261207, start_phi_psi_rad=(1.0, 0.6))
# Umbrella sampling along phi (molflow.md.umbrella defaults: 36 windows of 200 kJ/mol/rad^2, 400 ps
# each, seed 20261207): phase 3's target law, the MBAR-weighted frames.
UMBRELLA_FILE = "umbrella.npz"
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
# Phase 3 (issue 17): both landscapes of the drive (the 1-D end-angle tables and a pair table of
# PAIR_NODES per axis on psi's turn) refined by iterative Boltzmann inversion
# (molflow.training.landscape_ibi) against the umbrella law, 64 rollouts x 400 jumps per update from
# umbrella frames (ALPHA_L_START_SHARE of them at phi > 0, drawn by weight, each rollout weighted back
# by its start's weight). Earlier versions: phase 3 refined the 1-D
# tables against the training data (which hold no alpha_L), phase 4 added the pair table (which took
# the joint JS against MD from 0.015 down); a probe refining both against the umbrella law with the
# plain rollout histogram overshot alpha_L to 8.3% (umbrella 2.65%). What this phase cannot see: 0.2-ns
# rollouts rarely cross into alpha_L, so the flux in is not priced; free-running 409.6 ns the map holds
# 8.8 +- 2.7% alpha_L (entries ~2.8x MD's, exits at MD's rate). Measured: README, issue 17.
LANDSCAPE_IBI = dict(iterations=8, replicas=64, jumps=400, burn_jumps=40, damping=0.7, damping_decay=0.8,
                     clip_kT=2.0, pseudo_count=0.5, seed=100)
ALPHA_L_START_SHARE = 0.25
PAIR_NODES = 24
SAMPLE_FINISH = {"n_steps": 25, "friction_per_ps": 100.0, "timestep_fs": 2.0, "settle_steps": 5,
                 "settle_friction_per_ps": 300.0}


def record_data(work: Path) -> tuple[list[str], str, str, float]:
    """The training data in ``work`` (recorded when missing): the MD files (DATA), the alpha_L file and
    the umbrella windows (.npz). Returns (MD files, alpha_L file, umbrella file, wall seconds spent
    recording here)."""
    import molflow
    from molflow.md.umbrella import UmbrellaSettings, sample_phi_windows, system_at_backbone_dihedrals

    md_s = 0.0
    mol = molflow.load_system("alanine_dipeptide")
    paths = []
    for d in (*DATA, ALPHA_L_DATA):
        path = work / d["name"]
        if not path.exists():
            t0 = time.perf_counter()
            settings = {k: v for k, v in d.items() if k not in ("name", "start_phi_psi_rad")}
            system = system_at_backbone_dihedrals(mol, *d["start_phi_psi_rad"]) if "start_phi_psi_rad" in d else mol
            molflow.simulate(system, path, overwrite=True, progress=True, **settings).close()
            md_s += time.perf_counter() - t0
        paths.append(str(path))
    umbrella = work / UMBRELLA_FILE
    if not umbrella.exists():
        t0 = time.perf_counter()
        z = sample_phi_windows("alanine_dipeptide", UmbrellaSettings())
        np.savez_compressed(umbrella.with_suffix(".tmp.npz"), **z)
        umbrella.with_suffix(".tmp.npz").rename(umbrella)
        md_s += time.perf_counter() - t0
    return paths[:-1], paths[-1], str(umbrella), md_s


def refine_phase(ck: dict, umbrella_file: str, work: Path, iterations: int, quiet: bool) -> tuple[list[dict], float]:
    """Phase 3: a pair landscape of PAIR_NODES per axis added to the drive of the map in checkpoint
    ``ck``, then both landscapes refined by iterative Boltzmann inversion against the umbrella law
    (LANDSCAPE_IBI) with the shipped finish. Updates ``ck``'s model and EMA tables in place; returns
    (records, wall seconds)."""
    import molflow
    from molflow.checkpoint import save_checkpoint
    from molflow.finish import FinishConfig
    from molflow.sampling import maxwell_boltzmann_velocities
    from molflow.training.landscape_ibi import LandscapeIBIConfig, refine_landscape, stratified_starts

    t0 = time.perf_counter()
    tables = ("drive.landscape", "drive.landscape_pair")
    ck["map_config_json"] = {**ck["map_config_json"], "torsion_drive_landscape_pair": PAIR_NODES}
    for k in ("model", "ema"):
        ck[k]["drive.landscape_pair"] = torch.zeros(PAIR_NODES, PAIR_NODES, dtype=ck[k]["drive.landscape"].dtype)
    start = work / "refine_start.pt"
    save_checkpoint(start, ck)
    fm = molflow.FlowMap.load(start, device="cpu")
    z = np.load(umbrella_file)
    x_u, w_u = z["positions"].astype(np.float64), z["weight"]
    cfg = LandscapeIBIConfig(**{**LANDSCAPE_IBI, "iterations": iterations})
    pick, start_w = stratified_starts(w_u, cfg.replicas, (z["phi"] > 0).astype(int), {1: ALPHA_L_START_SHARE},
                                      seed=cfg.seed)
    v0 = maxwell_boltzmann_velocities(fm.system, cfg.replicas, np.random.default_rng(cfg.seed))
    records = refine_landscape(fm, x_u, (x_u[pick], v0), cfg, finish=FinishConfig(**SAMPLE_FINISH),
                               progress=not quiet, data_weights=w_u, start_weights=start_w)
    state = fm.model.state_dict()
    for k in ("model", "ema"):
        for name in tables:
            ck[k][name] = state[name].detach().cpu().to(ck[k][name].dtype)
    start.unlink()
    return records, time.perf_counter() - t0


def main() -> int:
    import molflow
    from molflow.checkpoint import load_checkpoint, save_checkpoint
    from molflow.md.engine import hardware_description
    from molflow.sampling import start_states_from_run
    from molflow.training.landscape_ibi import records_summary
    from molflow.units import kinetic_temperature

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=45000, help="phase-1 optimiser steps (default 45000)")
    ap.add_argument("--finetune-steps", type=int, default=6000, help="phase-2 optimiser steps (default 6000; 0: none)")
    ap.add_argument("--landscape-iterations", type=int, default=LANDSCAPE_IBI["iterations"],
                    help="phase-3 landscape refinement iterations (default %(default)s; 0: none)")
    ap.add_argument("--phase1-from", metavar="MAP",
                    help="take phase 1 from MAP's network (e.g. the shipped flowmap.pt: phases 2-3 leave the network "
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
    previous = Path(args.out).with_suffix(".json")
    old = json.loads(previous.read_text()) if previous.exists() else {}
    files, alpha_l_file, umbrella_file, md_s = record_data(work)
    full = work / "model_full.pt"
    train_s = tune_s = ibi_s = None  # wall seconds, None when reused or not run
    ibi_records = None
    phase1_from = None
    if args.phase1_from and not full.exists():
        from molflow.checkpoint import without_torsion_drive

        save_checkpoint(full, without_torsion_drive(load_checkpoint(args.phase1_from)))
        args.reuse = True  # phase 1 is done; phases 2-3 run unless their files are in WORK
    if args.phase1_from:
        src = json.loads(Path(args.phase1_from).with_suffix(".json").read_text())
        train_s = src.get("train_wall_s")
        phase1_from = {"map": Path(args.phase1_from).name, "train_wall_s": train_s,
                       "command": (src.get("phase1_from") or {}).get("command")  # the network's own run
                       or src.get("command_phases_1_3", src.get("command"))}
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
        molflow.train("alanine_dipeptide", data=files + [alpha_l_file], out=tuned, steps=args.finetune_steps,
                      device=args.device, progress=not args.quiet, resume=resume, overwrite=not resume,
                      init_from=None if resume else full, **FINETUNE)
        tune_s = time.perf_counter() - t0
    ck = load_checkpoint(tuned if args.finetune_steps else full)
    if args.landscape_iterations:  # phase 3, on the phase-2 map with the finish shipped below
        torch.set_num_threads(os.cpu_count() or 1)
        ibi_records, ibi_s = refine_phase(ck, umbrella_file, work, args.landscape_iterations, args.quiet)
        print(f"phase 3: {records_summary(ibi_records)} ({ibi_s:.0f} s)", flush=True)
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
    for tau in PROBE_TAUS:
        key, n_jumps = f"sample_{tau:g}ps", int(round(2.0 / tau))
        try:
            out = fm.sample((x0, v0), n_jumps=n_jumps, tau_ps=tau, seed=1, mode="sample")
        except molflow.SimulationError as exc:
            probes[key] = {"jumps": n_jumps, "replicas": 32, "all_stopped": str(exc)}
            print(key, probes[key], flush=True)
            continue
        stopped = out["stopped_at_jump"]
        v = out["velocities"][:, 1:]
        ok = np.isfinite(v).all(axis=(2, 3))
        probes[key] = {
            "jumps": n_jumps, "replicas": 32, "restarts": int(out["restarts_per_replica"].sum()),
            "stopped": int((stopped >= 0).sum()),
            "median_stop_jump": float(np.median(stopped[stopped >= 0])) if (stopped >= 0).any() else None,
            "kinetic_temperature_K": float(kinetic_temperature(v[ok], fm.system.masses_amu).mean()) if ok.any() else None,
        }
        print(key, probes[key], flush=True)
    if train_s is None:  # --reuse: keep the timing the training run measured
        train_s = old.get("train_wall_s")
    if not md_s:  # every data file reused: keep the recorded timing
        md_s = old.get("md_wall_s", md_s)
    if tune_s is None and args.finetune_steps:
        tune_s = old.get("finetune_wall_s")
    from molflow.md.umbrella import UmbrellaSettings

    meta = {"file": Path(args.out).name, "data": list(DATA), "alpha_l_data": ALPHA_L_DATA,
            "umbrella": {**vars(UmbrellaSettings()), "file": UMBRELLA_FILE},
            "train": {**TRAIN, "steps": args.steps}, "phase1_from": phase1_from,
            "sample_finish": SAMPLE_FINISH,
            "finetune": {**FINETUNE, "steps": args.finetune_steps, "init_from": "phase 1 (model_full.pt)",
                         "data": [Path(f).name for f in files + [alpha_l_file]], "threads": torch.get_num_threads()},
            "md_wall_s": md_s, "train_wall_s": train_s,
            "train_steps_per_s": args.steps / train_s if train_s else None, "finetune_wall_s": tune_s,
            "landscape_ibi": {**LANDSCAPE_IBI, "iterations": args.landscape_iterations, "pair_nodes": PAIR_NODES,
                              "target": "umbrella law (MBAR-weighted windows)",
                              "alpha_l_start_share": ALPHA_L_START_SHARE, "records": ibi_records,
                              "threads": torch.get_num_threads()},
            "landscape_ibi_wall_s": ibi_s,
            "total_training_wall_s": (train_s or 0) + (tune_s or 0) + (ibi_s or 0) if train_s else None,
            "hardware": hardware_description("CPU"),
            "torch": torch.__version__, "molflow": molflow.__version__, "python": platform.python_version(),
            "size_bytes": Path(args.out).stat().st_size, "rollout_probes_2ps_from_data_states": probes,
            "verdict": ck.get("verdict_json"),
            "health": ck.get("health_json"),
            "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    for k in ("fidelity", "fidelity_vs_umbrella"):  # measured by benchmarks/fidelity_cpu.py --summary-into
        if k in old:
            meta[k + "_previous_map"] = old[k]
    Path(args.out).with_suffix(".json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
