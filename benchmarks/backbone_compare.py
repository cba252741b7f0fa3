"""Benchmark: which equivariant backbone for the molecular flow map — PaiNN or e3nn (not a test).

Both backbones (``MapConfig.backbone``) are trained on the same data — a short alanine-dipeptide
reference run recorded with ``molflow.simulate`` at 20 fs frames with N = 3 path coefficients, as in
``flowmap_quality.py`` — with the same training settings and seed and the same parameter budget (the
e3nn width is chosen to match PaiNN's parameter count as closely as possible). Two comparisons:
  equal steps:     both backbones run ``--steps`` optimiser steps;
  equal wall time: the budget W is the faster backbone's wall time for ``--steps`` steps; the slower
                   one is trained again with as many steps as fit in W at its measured step time
                   (a complete cosine schedule, not a cut-off run). The faster backbone's equal-time
                   row IS its equal-steps run.
Measured: parameters; forward+backward time of one batch (``batch_size x n_latent_samples``
molecules, as a training step's gradient-carrying part); training step time; inference
molecule-jumps/s (batch 256, no gradient); held-out one-jump strong error — heavy-atom RMSD after
Kabsch alignment, RMS over items, `mean` mode (and `sample` mode, and raw RMSD, for context) — at
tau = 0.1 and 0.5 ps on the same held-out items for every model, with standard errors and the paired
difference between backbones. The floor (``molflow.floor``, N = 3) is given for context.
Prints a table and writes JSON (hardware, versions, settings, every number).

    PYTHONPATH=. nice -n 10 python benchmarks/backbone_compare.py --out benchmarks/results/backbone_compare_cpu.json
    python benchmarks/backbone_compare.py --device cuda --steps 5000 --threads 0 --out backbone_compare_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _pf
import sys
import time
from pathlib import Path

import numpy as np
import torch

import molflow
from molflow.evaluation.structure import kabsch_rmsd, rmsd
from molflow.models import MapConfig
from molflow.models.molecular import build_model
from molflow.training.data import FrameData

N_COEFFICIENTS = 3


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _pf.processor() or "unknown"


def n_params(mol, **cfg) -> int:
    return sum(p.numel() for p in build_model(mol, MapConfig(n_coefficients=N_COEFFICIENTS, **cfg)).parameters())


def time_model(mol, cfg: dict, batch: dict, train_batch: int, device, reps: int = 10) -> dict:
    """Median forward+backward seconds of one training-sized batch; inference molecule-jumps/s."""
    torch.manual_seed(0)
    model = build_model(mol, MapConfig(n_coefficients=N_COEFFICIENTS, **cfg)).to(device)

    def rep(t, B):
        return t[:1].expand(B, *t.shape[1:]).contiguous()

    def inputs(B):
        return (rep(batch["x0"], B), rep(batch["v0"], B), rep(batch["L"], B), model.sample_latent(B),
                torch.full((B,), 0.1, device=device))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    args = inputs(train_batch)
    times = []
    for i in range(reps + 2):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        xt, vt = model(*args)
        ((xt - args[0]).square().sum() + vt.square().sum()).backward()
        sync()
        if i >= 2:  # two warm-up passes
            times.append(time.perf_counter() - t0)
    B = 256
    args = inputs(B)
    with torch.no_grad():
        model(*args)
        sync()
        t0 = time.perf_counter()
        n_inf = 5
        for _ in range(n_inf):
            model(*args)
        sync()
        inf_s = (time.perf_counter() - t0) / n_inf
    return {"fwd_bwd_s_per_batch": float(np.median(times)), "fwd_bwd_s_all": times,
            "fwd_bwd_batch_molecules": train_batch, "inference_molecule_jumps_per_s": B / inf_s,
            "inference_batch": B}


def rms_se(sq: np.ndarray) -> tuple[float, float]:
    """RMS of per-item errors and its standard error (delta method from the mean square)."""
    ms = float(np.mean(sq))
    se_ms = float(np.std(sq, ddof=1) / np.sqrt(len(sq)))
    rms = float(np.sqrt(ms))
    return rms, se_ms / (2 * rms)


def evaluate(model_path: Path, mol, data: FrameData, taus, items: int, n_mean: int, device) -> dict:
    fm = molflow.FlowMap.load(model_path, device=device)
    heavy = mol.heavy_atoms
    out = {}
    rng = np.random.default_rng(7)  # the same held-out items for every model
    for tau in taus:
        k = int(round(tau / data.h0_ps))
        b = data.batch(items, k, rng, split="val", device=fm.device)
        x1 = b["x1"].cpu().numpy()[:, heavy]
        gen = torch.Generator(device=fm.device).manual_seed(1)
        row = {}
        t0 = time.perf_counter()
        for mode in ("mean", "sample"):
            with torch.no_grad():
                xt, _ = fm.jump(b["x0"], b["v0"], b["L"], tau, mode=mode, generator=gen, n_mean=n_mean)
            xp = xt.cpu().numpy()[:, heavy]
            aligned_sq = kabsch_rmsd(xp, x1) ** 2
            raw_sq = rmsd(xp, x1) ** 2
            row[f"{mode}_heavy_rmsd_aligned_nm"], row[f"{mode}_heavy_rmsd_aligned_nm_se"] = rms_se(aligned_sq)
            row[f"{mode}_heavy_rmsd_raw_nm"], row[f"{mode}_heavy_rmsd_raw_nm_se"] = rms_se(raw_sq)
            row[f"{mode}_aligned_sq_per_item"] = aligned_sq.tolist()
        row["eval_wall_s"] = time.perf_counter() - t0
        out[f"{tau:g}"] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default="backbone_compare_work")
    ap.add_argument("--out", default="backbone_compare.json")
    ap.add_argument("--data", default=None, help="an existing 20 fs run with >= 3 coefficients (else recorded)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--painn-features", type=int, default=32)
    ap.add_argument("--e3nn-features", type=int, default=0, help="0: match PaiNN's parameter count")
    ap.add_argument("--eval-items", type=int, default=192)
    ap.add_argument("--n-mean", type=int, default=8, help="latent draws averaged in mean mode")
    ap.add_argument("--taus", default="0.1,0.5")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    taus = [float(t) for t in args.taus.split(",")]
    device = torch.device(args.device)
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    mol = molflow.load_system("alanine_dipeptide")
    t_start = time.perf_counter()

    # ---- data: as flowmap_quality.py (4 replicas x 40 ps, 20 fs frames), N = 3 recorded
    data_settings = dict(replicas=4, time_ps=40.0, frame_fs=20.0, n_coefficients=N_COEFFICIENTS, equilibrate_ps=10.0)
    data_path = Path(args.data) if args.data else work / "data_20fs_N3.h5"
    t0 = time.perf_counter()
    recorded_now = not data_path.exists()
    if recorded_now:
        molflow.simulate(mol, data_path, seed=args.seed, progress=True, **data_settings).close()
    data_s = time.perf_counter() - t0
    data = FrameData([str(data_path)], n_coefficients=N_COEFFICIENTS)
    t0 = time.perf_counter()
    floor = molflow.floor(mol, tau_ps=taus, n_coefficients=[N_COEFFICIENTS], starts=8, seed=args.seed, progress=False)
    floor_s = time.perf_counter() - t0
    floor_rows = {f"{r['tau_ps']:g}": r for r in floor["rows"]}

    # ---- equal parameter budget
    common = dict(n_layers=args.n_layers)
    cfgs = {"painn": dict(backbone="painn", n_features=args.painn_features, **common)}
    target = n_params(mol, **cfgs["painn"])
    if args.e3nn_features:
        f_e3nn = args.e3nn_features
    else:
        f_e3nn = min(range(4, 129, 2), key=lambda F: abs(n_params(mol, backbone="e3nn", n_features=F, **common) - target))
    cfgs["e3nn"] = dict(backbone="e3nn", n_features=f_e3nn, **common)
    results = {name: {"map_config": cfg, "params": n_params(mol, **cfg)} for name, cfg in cfgs.items()}

    # ---- speed of the bare network
    probe = data.batch(1, 5, np.random.default_rng(0), device=device)
    m_latent = 2  # TrainConfig.n_latent_samples (energy score)
    for name, cfg in cfgs.items():
        results[name]["timing"] = time_model(mol, cfg, probe, args.batch_size * m_latent, device)
        print(f"{name}: {results[name]['params']} params, fwd+bwd {results[name]['timing']['fwd_bwd_s_per_batch']:.3f} s/batch, "
              f"{results[name]['timing']['inference_molecule_jumps_per_s']:.0f} molecule-jumps/s", file=sys.stderr)

    def train(name: str, steps: int, tag: str) -> dict:
        path = work / f"{name}_{tag}.pt"
        t0 = time.perf_counter()
        molflow.train(mol, [str(data_path)], path, tau_max_ps=max(taus), n_coefficients=N_COEFFICIENTS, steps=steps,
                      device=str(device), seed=args.seed, progress=True,
                      config=dict(batch_size=args.batch_size, validate_every=10**9, checkpoint_every=10**9, **cfgs[name]))
        wall = time.perf_counter() - t0
        run = {"steps": steps, "train_wall_s": wall, "train_s_per_step": wall / steps,
               "train_items_per_s": steps * args.batch_size / wall}
        run["heldout"] = evaluate(path, mol, data, taus, args.eval_items, args.n_mean, device)
        return run

    # ---- equal steps, then equal wall time
    for name in cfgs:
        results[name]["equal_steps"] = train(name, args.steps, f"steps{args.steps}")
    fast, slow = sorted(cfgs, key=lambda n: results[n]["equal_steps"]["train_wall_s"])
    budget_s = results[fast]["equal_steps"]["train_wall_s"]
    slow_steps = max(1, int(args.steps * budget_s / results[slow]["equal_steps"]["train_wall_s"]))
    results[fast]["equal_wall"] = {"same_as": "equal_steps"}
    results[slow]["equal_wall"] = train(slow, slow_steps, f"wall{int(budget_s)}s")

    # ---- paired comparison on the same items (e3nn minus painn, mean square of aligned RMSD)
    paired = {}
    for cond in ("equal_steps", "equal_wall"):
        runs = {n: results[n][cond] if "same_as" not in results[n][cond] else results[n]["equal_steps"] for n in cfgs}
        for tau in taus:
            for mode in ("mean", "sample"):
                a = np.array(runs["e3nn"]["heldout"][f"{tau:g}"][f"{mode}_aligned_sq_per_item"])
                b = np.array(runs["painn"]["heldout"][f"{tau:g}"][f"{mode}_aligned_sq_per_item"])
                d = a - b
                paired[f"{cond}_{tau:g}ps_{mode}"] = {
                    "rms_ratio_e3nn_over_painn": float(np.sqrt(a.mean() / b.mean())),
                    "mean_sq_diff_nm2": float(d.mean()), "mean_sq_diff_se_nm2": float(d.std(ddof=1) / np.sqrt(len(d)))}

    import e3nn
    import openmm

    result = {
        "benchmark": "backbone_compare", "system": "alanine_dipeptide",
        "settings": {"data": {**data_settings, "path": str(data_path), "seed": args.seed,
                              "n_frames": data.n_frames, "recorded_now": recorded_now, "n_trajectories": int(data.x.shape[0]),
                              "validation": "last replica held out"},
                     "steps": args.steps, "batch_size": args.batch_size, "n_latent_samples": m_latent,
                     "tau_max_ps": max(taus), "taus_ps": taus, "eval_items": args.eval_items, "n_mean": args.n_mean,
                     "seed": args.seed, "device": str(device), "torch_threads": torch.get_num_threads(),
                     "equal_wall_budget_s": budget_s, "equal_wall_rule":
                         f"budget = {fast}'s wall time for {args.steps} steps; {slow} retrained with {slow_steps} steps"},
        "hardware": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "note": "shared machine: other jobs ran on the same cores, wall times carry ~10-20% noise"},
        "versions": {"molflow": molflow.__version__, "torch": torch.__version__, "e3nn": e3nn.__version__,
                     "openmm": openmm.__version__, "python": _pf.python_version()},
        "timing_s": {"data": data_s, "floor": floor_s, "total": time.perf_counter() - t_start},
        "floor": {tau: {k: floor_rows[tau][k] for k in ("heavy_rmsd_aligned_nm", "heavy_rmsd_aligned_nm_se",
                                                        "heavy_rmsd_raw_nm")} for tau in floor_rows},
        "backbones": results, "paired_e3nn_minus_painn": paired,
    }
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))

    print(f"\nalanine dipeptide, N={N_COEFFICIENTS}, {data.x.shape[0]} x {data.n_frames} frames at 20 fs, "
          f"device {device}, {torch.get_num_threads()} torch thread(s) on {cpu_name()}")
    print(f"{'backbone':8s} {'params':>7s} {'fwd+bwd':>8s} {'infer':>8s} | {'condition':11s} {'steps':>5s} {'train s':>7s} "
          + " ".join(f"{'mean aln ' + f'{t:g}ps':>17s} {'samp aln ' + f'{t:g}ps':>9s}" for t in taus))
    for name in cfgs:
        r = results[name]
        for cond in ("equal_steps", "equal_wall"):
            run = r[cond] if "same_as" not in r[cond] else r["equal_steps"]
            cells = []
            for t in taus:
                h = run["heldout"][f"{t:g}"]
                cells.append(f"{h['mean_heavy_rmsd_aligned_nm']:.4f}±{h['mean_heavy_rmsd_aligned_nm_se']:.4f} "
                             f"{h['sample_heavy_rmsd_aligned_nm']:>9.4f}")
            print(f"{name:8s} {r['params']:7d} {r['timing']['fwd_bwd_s_per_batch']:7.3f}s "
                  f"{r['timing']['inference_molecule_jumps_per_s']:8.0f} | {cond:11s} {run['steps']:5d} "
                  f"{run['train_wall_s']:7.0f} " + " ".join(f"{c:>27s}" for c in cells))
    for t in taus:
        fl = floor_rows[f"{t:g}"]
        print(f"floor N={N_COEFFICIENTS} tau={t:g} ps: aligned {fl['heavy_rmsd_aligned_nm']:.4f} nm "
              f"(mean mode target floor/sqrt2 = {fl['heavy_rmsd_aligned_nm'] / np.sqrt(2):.4f})")
    for key, p in paired.items():
        print(f"{key:28s} e3nn/painn RMS ratio {p['rms_ratio_e3nn_over_painn']:.3f}  "
              f"diff of mean sq {p['mean_sq_diff_nm2']:+.2e} ± {p['mean_sq_diff_se_nm2']:.1e} nm²")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
