"""The ``molflow`` command: the only face of the toolkit on the command line.

Every subcommand has ``--help``; bad input gives a one-line error and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import MolflowError

EXIT_INPUT = 2
SIMULATE_DEFAULTS = {"replicas": 1, "time_ps": 100.0, "frame_fs": 100.0, "n_coefficients": 3, "equilibrate_ps": 10.0}
EXIT_RUNTIME = 3


def _add_system_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("system overrides")
    g.add_argument("--temperature-k", type=float, help="temperature (K); default from the system (300)")
    g.add_argument("--friction-per-ps", type=float, help="Langevin friction gamma (1/ps); default 1")
    g.add_argument("--timestep-fs", type=float, help="integration timestep (fs); default 1")
    g.add_argument("--forcefield", nargs="+", metavar="XML",
                   help="OpenMM force-field files (default amber99sbildn.xml amber99_obc.xml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molflow",
        description="Accelerated molecular-dynamics sampling with strong stochastic flow maps. "
                    "Units: nm, ps, kJ/mol, K, amu.")
    parser.add_argument("--version", action="version", version=f"molflow {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or chatter")
    common = argparse.ArgumentParser(add_help=False)  # --quiet also after the subcommand
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or chatter")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]

    p = sub.add_parser("simulate", help="reference Langevin MD with the Brownian path recorded",
                       description="Run R independent Langevin trajectories with OpenMM and record "
                                   "positions, velocities, forces, energies and the Legendre path "
                                   "coefficients of every frame interval (HDF5, DESIGN.md section 5).")
    p.add_argument("system", help="built-in system name (e.g. alanine_dipeptide) or a PDB file")
    p.add_argument("--out", required=True, help="output HDF5 file")
    # run settings default to None: with --resume they come from the file, else from SIMULATE_DEFAULTS
    p.add_argument("--replicas", type=int, help="independent trajectories (default 1)")
    p.add_argument("--time-ps", type=float, help="simulated time per replica, ps (default 100; with --resume "
                                                 "a larger value extends the run)")
    p.add_argument("--frame-fs", type=float, help="interval between saved frames, fs (default 100)")
    p.add_argument("--coefficients", type=int, help="path coefficients N per interval, 0..8 (default 3)")
    p.add_argument("--equilibrate-ps", type=float, help="equilibration before frame 0, ps (default 10)")
    p.add_argument("--platform", default="auto", help="auto|Reference|CPU|CUDA|OpenCL (default auto)")
    p.add_argument("--seed", type=int, help="master seed (default: random, printed and recorded)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an existing run from its last complete frame")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--copies-per-context", type=int, help="replicas per OpenMM Context (default: per platform)")
    p.add_argument("--workers", type=int, help="CPU worker processes (default: one per core; with --executor "
                                               "dask and no --scheduler: the LocalCluster's workers)")
    p.add_argument("--deterministic", action="store_true", help="deterministic forces on CUDA")
    p.add_argument("--executor", choices=["local", "dask"], default="local",
                   help="where groups of replicas run (default local); dask: one task and one HDF5 shard per "
                        "group in OUT.shards/, OUT a virtual-dataset file over them (needs molflow[dask])")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address, e.g. tcp://host:8786 (with "
                                                          "--executor dask; default: a LocalCluster, one worker per core)")
    _add_system_overrides(p)

    p = sub.add_parser("floor", help="the irreducible error of a map fed N path coefficients",
                       description="Pairs of reference trajectories from the same states that share the N "
                                   "path coefficients of a jump and differ in the rest (DESIGN.md 3.1).")
    p.add_argument("system", help="built-in system name or a PDB file")
    p.add_argument("--tau-ps", default="0.05,0.2,1", help="jump lengths, ps, comma-separated (default 0.05,0.2,1)")
    p.add_argument("--coefficients", default="0,1,3,8", help="N values, comma-separated (default 0,1,3,8)")
    p.add_argument("--starts", type=int, default=32, help="equilibrated start states (default 32)")
    p.add_argument("--equilibrate-ps", type=float, default=10.0, help="equilibration of the starts, ps")
    p.add_argument("--platform", default="auto", help="OpenMM platform (default auto)")
    p.add_argument("--seed", type=int, help="master seed (default: random, printed and recorded)")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    p = sub.add_parser("train", help="train a flow map on reference runs",
                       description="Train the equivariant strong stochastic flow map of a system on "
                                   "reference runs recorded at 10-20 fs frames (DESIGN.md section 3).")
    p.add_argument("system", help="built-in system name or a PDB file (must match the data)")
    p.add_argument("--data", action="append", required=True, help="reference run file (repeatable)")
    p.add_argument("--out", required=True, help="checkpoint file to write (model.pt)")
    p.add_argument("--tau-max-ps", type=float, default=1.0, help="longest jump trained, ps (default 1)")
    p.add_argument("--coefficients", type=int, help="path coefficients N used (default: all in the data)")
    p.add_argument("--steps", type=int, help="optimiser steps (default 2000)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto)")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="data-parallel processes (DDP): one per GPU on CUDA, N gloo processes on CPU; the "
                        "global batch is unchanged (default 1; under torchrun its processes are used)")
    p.add_argument("--seed", type=int, help="master seed (default: random, printed and recorded)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint (same schedule; "
                                                            "a larger --steps extends the run)")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint")
    p.add_argument("--init-from", metavar="MODEL.pt", help="fine-tune: start from this checkpoint's weights and "
                                                          "architecture with a fresh optimiser and schedule")
    p.add_argument("--config", help="YAML file of hyperparameters (batch_size, lr, objective, n_features, n_layers, "
                                    "...); sizes not set: on CPU 32 features, 2 layers, batch 32 (measured to fit 2 "
                                    "cores), on a GPU 64 features, 3 layers, batch 16")

    p = sub.add_parser("sample", help="few-step rollouts with a trained flow map",
                       description="Roll out replicas of a trained flow map, jump tau at a time, and stream "
                                   "them to HDF5 (the run-file layout, DESIGN.md section 5). Free-running by "
                                   "default (fresh path coefficients every jump); --pathwise feeds the "
                                   "coefficients recorded in --from, composed to tau, from its frame 0.")
    p.add_argument("model", help="flow-map checkpoint (model.pt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_run", metavar="RUN.h5",
                     help="start states spread over this run's replicas and frames (skipping its first 10%%)")
    src.add_argument("--system", help="start from this system's minimised structure with Maxwell-Boltzmann "
                                      "velocities (must be the model's system)")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--replicas", type=int, help="rollouts (default 16; --pathwise: every replica of --from)")
    p.add_argument("--jumps", type=int, help="jumps per replica (default 100; --pathwise: as many as --from holds, "
                                             "at most 100; with --resume the total)")
    p.add_argument("--tau-ps", type=float, help="jump length, ps (default: the longest the model was trained for)")
    p.add_argument("--mode", choices=["sample", "mean"], help="latent: fresh draw per jump (sample, default) or "
                                                              "averaged out (mean)")
    p.add_argument("--pathwise", action="store_true", help="drive the rollouts with --from's recorded path")
    p.add_argument("--seed", type=int, help="master seed (default: random, printed and recorded)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto)")
    p.add_argument("--finish-steps", type=int, metavar="K",
                   help="force-field Langevin steps at high friction after every jump, handing bonds and angles "
                        "back to the force field (default: what the model's checkpoint recommends; 0: none)")
    p.add_argument("--finish-friction-per-ps", type=float, default=300.0,
                   help="friction of the finish, 1/ps (default 300)")
    p.add_argument("--finish-hold-torsions", type=float, metavar="K",
                   help="hold backbone phi/psi at the jump's values during the finish with a harmonic restraint "
                        "of K kJ/mol/rad^2 (default: what the checkpoint recommends; 0: free)")
    p.add_argument("--finish-timestep-fs", type=float, metavar="FS",
                   help="step of the finish's bulk steps, fs (default 1 with --finish-steps, else the checkpoint's)")
    p.add_argument("--finish-settle-steps", type=int, metavar="K",
                   help="the finish's last K steps run at 1 fs, so velocities read as the reference MD's "
                        "(default 0 with --finish-steps, else the checkpoint's)")
    p.add_argument("--extrapolate", action="store_true",
                   help="allow --tau-ps above the longest jump the model was trained for")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an existing sampled run")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    p = sub.add_parser("evaluate", help="judge samples (or MD) against long reference MD",
                       description="Stationary, kinetic, pathwise and cost metrics of --samples against "
                                   "--reference, with equal-cost and noise-floor rows: DIR/metrics.json, "
                                   "DIR/report.md and PNG figures.")
    p.add_argument("--reference", required=True, help="reference MD run file")
    p.add_argument("--samples", required=True, help="sampled run file (or another MD run)")
    p.add_argument("--report", required=True, help="output folder")

    p = sub.add_parser("train-boltzmann", help="train the few-step Boltzmann sampler on reference MD frames",
                       description="Default (kind: internal): fit a density over internal coordinates (torsion "
                                   "histograms, a Gaussian of bonds, angles and stiff torsions given them) to the "
                                   "frames of --data, then train 1-, 2-, 4- and 10-step coupling maps on it against "
                                   "the force field (reverse KL; exact densities). With kind: vp in --config: the "
                                   "Cartesian VP-SDE flow map with the equivariant PaiNN backbone.")
    p.add_argument("system", help="built-in system name or a PDB file (must match the data)")
    p.add_argument("--data", action="append", required=True,
                   help="reference run file, or weighted frames (.npz: positions, weight — e.g. umbrella windows "
                        "with MBAR weights) (repeatable)")
    p.add_argument("--out", required=True, help="checkpoint file to write (bg.pt)")
    p.add_argument("--steps", type=int, help="optimiser steps (default 4000)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto)")
    p.add_argument("--seed", type=int, help="master seed (default: random, printed and recorded)")
    p.add_argument("--config", help="YAML file of settings (batch_size, lr, n_features, n_layers, networks, eta, ...)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint")

    p = sub.add_parser("sample-boltzmann", help="i.i.d. equilibrium conformations, optionally with exact weights",
                       description="Draw conformations with a trained Boltzmann sampler in --steps map steps and "
                                   "write them to HDF5 (positions, potential energies, chirality flags); with "
                                   "--reweight also exact importance weights for the force field's Boltzmann "
                                   "distribution (Jacobian log-determinants, invertibility and chirality checks, "
                                   "Kish ESS).")
    p.add_argument("model", help="Boltzmann-sampler checkpoint (bg.pt)")
    p.add_argument("--n", type=int, required=True, help="number of conformations")
    p.add_argument("--steps", type=int, default=4, help="map steps: 1, 2, 4 or 10 (default 4); 0: the "
                   "internal-coordinate sampler's fitted base alone")
    p.add_argument("--out", required=True, help="output HDF5 file (conf.h5)")
    p.add_argument("--reweight", action="store_true", help="compute exact Boltzmann importance weights")
    p.add_argument("--seed", type=int, help="master seed (default: random, printed and recorded)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, help="conformations per batch (default 1024; 64 with --reweight "
                                                  "on a CPU, 256 on a GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--anneal", type=int, default=0, metavar="J",
                   help="with --reweight: an exact annealed finish (AIS with HMC moves under the force field) "
                        "through J tempered targets of the bond and angle terms (default 0: none)")
    p.add_argument("--anneal-beta-start", type=float, default=0.25,
                   help="inverse-temperature factor of the tempered terms at the first target (default 0.25)")
    p.add_argument("--anneal-moves", type=int, default=1, help="HMC moves per target (default 1)")
    p.add_argument("--anneal-step-fs", type=float, default=1.0, help="HMC leapfrog time step, fs (default 1)")
    p.add_argument("--anneal-leapfrog", type=int, default=10, help="leapfrog steps per HMC move (default 10)")
    p.add_argument("--anneal-tempered", choices=("bonded", "all"), default="bonded",
                   help="energy terms the finish tempers: bonds and angles (default) or all")

    p = sub.add_parser("info", help="what a run file or checkpoint holds")
    p.add_argument("file", help="a molflow HDF5 file")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("quickstart", help="the main job on the built-in alanine dipeptide",
                       description="Reference MD of alanine dipeptide, a short training run, sampling "
                                   "with the shipped pretrained flow map (free-running and pathwise) and "
                                   "their evaluation against the reference: everything under --out "
                                   "(about 2 minutes on 2 CPU cores).")
    p.add_argument("--out", default="molflow-quickstart", help="output folder (default molflow-quickstart)")
    p.add_argument("--seed", type=int, help="master seed (default: random, printed and recorded)")
    p.add_argument("--small", action="store_true", help="a tiny run (for tests)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    import signal

    def _terminate(signum, frame):  # SIGTERM (timeout, batch schedulers) stops like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        handlers = {"simulate": _simulate, "info": _info, "quickstart": _quickstart, "floor": _floor,
                    "train": _train, "evaluate": _evaluate, "sample": _sample,
                    "train-boltzmann": _train_boltzmann, "sample-boltzmann": _sample_boltzmann}
        return handlers[args.command](args)
    except MolflowError as exc:
        print(f"molflow {args.command}: error: {exc}", file=sys.stderr)
        from .errors import SimulationError

        return EXIT_RUNTIME if isinstance(exc, SimulationError) else EXIT_INPUT
    except KeyboardInterrupt:
        print(f"\nmolflow {args.command}: interrupted{_kept(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `molflow info run.h5 | head`
        sys.stderr.close()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kept(args) -> str:
    """What an interrupted command left behind, for the user."""
    out = getattr(args, "out", None)
    if args.command == "simulate" and out and Path(out).exists():
        from .md.engine import complete_frames

        return f"; kept {complete_frames(Path(out))} complete frames in {out}: continue with --resume"
    if args.command == "sample" and out and Path(out).exists():
        from .trajectory import Trajectory

        try:
            with Trajectory(out) as t:
                return f"; kept {t.n_frames} complete frames in {out}: continue with --resume"
        except MolflowError:
            return ""
    if args.command == "train" and out and Path(out).exists():
        return f"; the last checkpoint is in {out}: continue with --resume"
    if args.command == "train-boltzmann" and out and Path(out).exists():
        return f"; the last checkpoint is in {out}"
    return ""


def _overrides(args) -> dict:
    return {"temperature_K": args.temperature_k, "friction_per_ps": args.friction_per_ps,
            "timestep_fs": args.timestep_fs, "forcefield": args.forcefield}


def _simulate(args) -> int:
    from .errors import InputError
    from .md.engine import simulate

    if args.scheduler and args.executor != "dask":
        raise InputError("--scheduler needs --executor dask")
    given = {"replicas": args.replicas, "time_ps": args.time_ps, "frame_fs": args.frame_fs,
             "n_coefficients": args.coefficients, "equilibrate_ps": args.equilibrate_ps}
    settings = dict(SIMULATE_DEFAULTS)
    if args.resume and Path(args.out).exists():
        from .md.engine import resume_settings

        try:
            recorded = resume_settings(args.out)
        except (MolflowError, KeyError):
            recorded = {}  # not resumable: simulate() says why or starts fresh
        settings.update({k: v for k, v in recorded.items() if k in settings})
    settings.update({k: v for k, v in given.items() if v is not None})
    traj = simulate(args.system, args.out, platform=args.platform, seed=args.seed, resume=args.resume,
                    overwrite=args.overwrite, copies_per_context=args.copies_per_context,
                    workers=args.workers, deterministic=args.deterministic, progress=not args.quiet,
                    executor=args.executor, scheduler=args.scheduler, **settings, **_overrides(args))
    if not args.quiet:
        a = traj.attrs
        shards = f" over {len(a['shards'])} shards in {traj.path}.shards/" if a.get("executor") == "dask" else ""
        print(f"wrote {traj.path}: {traj.n_replicas} replica(s) x {traj.n_frames} frames{shards}, "
              f"seed {a['seed']}, {a['wall_clock_s']:.1f} s")
    traj.close()
    return 0


def _floats(text: str, name: str) -> list[float]:
    from .errors import InputError

    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _whole(values: list[float], name: str) -> list[int]:
    from .errors import InputError

    bad = [v for v in values if v != int(v)]
    if bad:
        raise InputError(f"{name} must be whole numbers, got {bad[0]:g}")
    return [int(v) for v in values]


def _floor(args) -> int:
    from .errors import InputError
    from .noise_floor import floor

    if Path(args.out).exists() and not args.overwrite:
        raise InputError(f"{args.out} exists: pass --overwrite to replace it")
    result = floor(args.system, tau_ps=_floats(args.tau_ps, "--tau-ps"),
                   n_coefficients=_whole(_floats(args.coefficients, "--coefficients"), "--coefficients"),
                   starts=args.starts, seed=args.seed, equilibrate_ps=args.equilibrate_ps,
                   platform=args.platform, out=args.out, progress=not args.quiet)
    if not args.quiet:
        print(f"{'tau_ps':>7s} {'N':>2s} {'raw nm':>9s} {'aligned nm':>10s} {'dv/vth':>7s} {'dphi deg':>8s}")
        for r in result["rows"]:
            print(f"{r['tau_ps']:7.3f} {r['n_coefficients']:2d} {r['heavy_rmsd_raw_nm']:9.2e} "
                  f"{r['heavy_rmsd_aligned_nm']:10.2e} {r['dv_over_vthermal']:7.2f} {r['dphi_deg']:8.1f}")
        print(f"wrote {args.out}")
    return 0


def _read_config(path: str | None) -> dict:
    import yaml

    from .errors import InputError

    if not path:
        return {}
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read --config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"--config {path} must be a mapping of settings")
    return config


def _train(args) -> int:
    from .training.loop import train

    config = _read_config(args.config)
    out = train(args.system, data=args.data, out=args.out, tau_max_ps=args.tau_max_ps,
                n_coefficients=args.coefficients, steps=args.steps, device=args.device, seed=args.seed,
                resume=args.resume, overwrite=args.overwrite, config=config, progress=not args.quiet,
                devices=args.devices, init_from=args.init_from)
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks
        print(f"wrote {out} (metrics: {out}.metrics.csv)")
    return 0


def _sample(args) -> int:
    from .errors import InputError
    from .sampling import (FlowMap, pathwise_attrs, pathwise_inputs, start_states_from_run,
                           start_states_from_system)
    from .seeding import random_seed

    if args.pathwise and not args.from_run:
        raise InputError("--pathwise needs --from RUN.h5 (the run whose recorded path drives the rollouts)")
    recorded = {}
    if args.resume and Path(args.out).exists():
        from .trajectory import Trajectory

        with Trajectory(args.out) as t:
            recorded = t.attrs
    fm = FlowMap.load(args.model, system=args.system, device=args.device)
    tau = args.tau_ps or recorded.get("tau_ps") or fm.tau_max_ps
    if not tau:
        raise InputError("--tau-ps is needed (the checkpoint does not say how far it was trained)")
    mode = args.mode or recorded.get("mode") or "sample"
    seed = args.seed if args.seed is not None else recorded.get("seed") or random_seed()
    replicas = args.replicas or recorded.get("n_replicas")
    jumps = args.jumps or recorded.get("n_jumps_requested")
    brownian = None
    attrs = {}
    if args.pathwise:
        start_states_from_run(args.from_run, 1, system=fm.system)  # refuses another molecule's run
        x0, v0, brownian = pathwise_inputs(args.from_run, tau, n_coefficients=fm.n_coefficients, replicas=replicas)
        jumps = jumps or min(100, brownian.shape[1])
        if jumps > brownian.shape[1]:
            raise InputError(f"--pathwise: {args.from_run} holds {brownian.shape[1]} jumps of {tau:g} ps, not {jumps}")
        brownian = brownian[:, :jumps]
        attrs = pathwise_attrs(args.from_run)
    elif args.from_run:
        x0, v0 = start_states_from_run(args.from_run, replicas or 16, system=fm.system)
        attrs = {"start_from": f"{args.from_run} (replicas and frames spread evenly, first 10% skipped)"}
    else:
        x0, v0 = start_states_from_system(fm.system, replicas or 16, seed=seed)
        attrs = {"start_from": f"minimised {fm.system.name} with Maxwell-Boltzmann velocities"}
    jumps = int(jumps or 100)
    finish = None  # the checkpoint's recommendation
    overrides = {k: v for k, v in (("hold_torsions", args.finish_hold_torsions), ("timestep_fs", args.finish_timestep_fs),
                                   ("settle_steps", args.finish_settle_steps)) if v is not None}
    if args.finish_steps is not None or recorded.get("finish_steps") is not None or overrides:
        import dataclasses

        from .finish import FinishConfig

        if args.finish_steps is not None:
            finish = FinishConfig(n_steps=args.finish_steps, friction_per_ps=args.finish_friction_per_ps)
        elif recorded.get("finish_steps") is not None:  # a resumed run keeps its finish
            finish = FinishConfig.from_attrs(recorded)
        else:  # only some settings given: the checkpoint's finish with them
            finish = fm.default_finish()
        finish = dataclasses.replace(finish, **overrides)
    if not args.quiet:
        print(f"molflow sample: model={args.model} tau={tau:g} ps mode={mode} pathwise={args.pathwise} "
              f"replicas={len(x0)} jumps={jumps} seed={seed} device={fm.device}", file=sys.stderr)
    traj = fm.sample((x0, v0), n_jumps=jumps, tau_ps=float(tau), replicas=len(x0), seed=int(seed), mode=mode,
                     brownian=brownian, out=args.out, resume=args.resume, overwrite=args.overwrite,
                     progress=not args.quiet, attrs=attrs, extrapolate=args.extrapolate, finish=finish)
    if not args.quiet:
        a = traj.attrs
        ns = traj.n_replicas * (traj.n_frames - 1) * float(tau) / 1000.0
        rate = ns / a["wall_clock_s"] if a["wall_clock_s"] else float("nan")
        print(f"wrote {traj.path}: {traj.n_replicas} replica(s) x {traj.n_frames} frames, seed {a['seed']}, "
              f"{a['wall_clock_s']:.1f} s ({rate:.3g} simulated ns per s), restarts {a['n_restarts']}")
    traj.close()
    return 0


def _train_boltzmann(args) -> int:
    from .boltzmann.training import train_boltzmann

    out = train_boltzmann(args.system, data=args.data, out=args.out, steps=args.steps, device=args.device,
                          seed=args.seed, config=_read_config(args.config), progress=not args.quiet,
                          resume=args.resume, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _sample_boltzmann(args) -> int:
    from .boltzmann.sampler import SUPPORTED_STEPS, BoltzmannSampler
    from .errors import InputError
    from .seeding import random_seed

    if args.steps not in SUPPORTED_STEPS + (0,):
        raise InputError(f"--steps must be one of {', '.join(map(str, SUPPORTED_STEPS))} (the trained step counts; "
                         f"0: the internal-coordinate sampler's base alone), not {args.steps}")
    if Path(args.out).exists() and not args.overwrite:
        raise InputError(f"{args.out} exists: pass --overwrite to replace it")
    bs = BoltzmannSampler.load(args.model, device=args.device)
    seed = args.seed if args.seed is not None else random_seed()
    if not args.quiet:
        print(f"molflow sample-boltzmann: model={args.model} n={args.n} steps={args.steps} reweight={args.reweight} "
              f"seed={seed} device={bs.device}", file=sys.stderr)
    anneal = None
    if args.anneal:
        from .boltzmann.anneal import AnnealSettings

        if not args.reweight:
            raise InputError("--anneal needs --reweight (the finish carries the map's exact weights)")
        anneal = AnnealSettings(args.anneal, args.anneal_beta_start, args.anneal_moves, args.anneal_leapfrog,
                                args.anneal_step_fs / 1000.0, args.anneal_tempered)
    res = bs.sample(args.n, steps=args.steps, seed=seed, reweight=args.reweight, out=args.out,
                    overwrite=args.overwrite, batch_size=args.batch_size, progress=not args.quiet, anneal=anneal)
    if not args.quiet:
        a = res["attrs"]
        msg = (f"wrote {args.out}: {a['n_samples']} conformations in {a['wall_clock_s']:.1f} s, seed {a['seed']}, "
               f"mirror images reflected {a['n_reflected']}, mixed chirality {a['n_mixed_chirality']}")
        if args.reweight:
            msg += (f"; ESS {a['ess']:.1f} (ESS/N {a['ess_fraction']:.3g}), invertibility failures "
                    f"{a['n_invertibility_failures']}")
            if anneal is not None:
                msg += f" (map alone: ESS/N {a['ess_fraction_map']:.3g}; finish {a['wall_clock_anneal_s']:.1f} s)"
        print(msg)
    return 0


def _evaluate(args) -> int:
    from .evaluation.report import evaluate

    evaluate(args.reference, args.samples, args.report, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {Path(args.report) / 'metrics.json'} and {Path(args.report) / 'report.md'}")
    return 0


def _info(args) -> int:
    from .trajectory import Trajectory

    if str(args.file).endswith((".pt", ".pth")):
        import torch

        from .checkpoint import load_checkpoint

        try:
            fmt = torch.load(args.file, map_location="cpu", weights_only=True).get("format")
        except Exception:  # missing or unreadable: load_checkpoint below says why, in one line
            fmt = None
        if fmt == "molflow-boltzmann":
            ck = load_checkpoint(args.file, expected_format=fmt, kind="Boltzmann-sampler")
            info = {"path": str(args.file), "kind": "Boltzmann-sampler checkpoint", "step": ck.get("step"),
                    "molflow_version": ck.get("molflow_version"), "scale_nm": ck.get("scale_nm"),
                    "training_wall_clock_s": ck.get("training_wall_clock_s"),
                    "system": {k: v for k, v in ck["system_json"].items() if k != "pdb"},
                    "map_config": ck["map_config_json"], "train_config": ck["train_config_json"]}
            print(json.dumps(info, indent=2, default=str))
            return 0
        ck = load_checkpoint(args.file)
        info = {"path": str(args.file), "kind": "flow-map checkpoint", "step": ck.get("step"),
                "h0_ps": ck.get("h0_ps"), "molflow_version": ck.get("molflow_version"),
                "system": {k: v for k, v in ck["system_json"].items() if k != "pdb"},
                "map_config": ck["map_config_json"], "train_config": ck["train_config_json"],
                "health": ck.get("health_json"), "sample_finish": ck.get("sample_finish_json"),
                "verdict": ck.get("verdict_json")}
        verdict = (ck.get("verdict_json") or {}).get("line", "verdict: none recorded (trained before molflow "
                                                               "recorded verdicts, or with verdict_replicas 0)")
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            print(json.dumps({k: v for k, v in info.items() if k != "verdict"}, indent=2, default=str))
            print(verdict)
        return 0
    from .evaluation.report import is_iid_samples

    if is_iid_samples(args.file):
        import h5py

        from .trajectory import plain_attr

        with h5py.File(args.file, "r", locking=False) as f:
            info = {"path": str(args.file), "datasets": {k: list(f[k].shape) for k in f},
                    **{k: plain_attr(v) for k, v in f.attrs.items() if k != "pdb"}}
    else:
        with Trajectory(args.file) as t:
            a = t.attrs
            a.pop("pdb", None)
            info = {"path": str(t.path), "replicas": t.n_replicas, "frames": t.n_frames, "atoms": t.n_atoms,
                    "datasets": {k: list(t._file[k].shape) for k in t._file}, **a}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _quickstart(args) -> int:
    from .quickstart import run_quickstart

    report = run_quickstart(Path(args.out), seed=args.seed, small=args.small, progress=not args.quiet)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
