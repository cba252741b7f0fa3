"""Fit a torsion drive on a frozen map from cached inputs (issue 17).

A torsion drive (:mod:`molflow.models.torsion_drive`) sits after a trained map and only turns the
backbone torsions. Trained through the step loop (``train_only: torsion_drive``), every optimiser
step re-runs the frozen network on fresh items for two samples each: 4500 steps of 128 items (9
minutes on 2 cores) learned the one-jump spread of the torsions but only part of their drift (from
the beta basin's edge the drive moved phi by +0.56 rad in 0.5 ps where MD moves it +0.73, and the
free-running map kept alpha_R at 0.10 where MD has 0.41). The drive's inputs depend on the frozen
network only through its jumped positions and latent, so they can be computed once:

1. :func:`build_cache` runs the frozen network once on each of ``items`` training items (``draws``
   latent draws each), and keeps per item and draw the drive's features, the torsions the network
   reached, and the torsions MD reached (a few hundred bytes per item);
2. :func:`fit_drive` trains the drive's small MLP on the cache for many passes, on batches of
   thousands of items: the final torsion is the network's plus the turn, exactly (a turn about one
   backbone bond leaves the other backbone torsions as they are), so no network is re-run. A binned
   drive is fitted by the log-likelihood of the turn each draw needed (its law is explicit); an
   implicit one by the ``torsion_crps`` score of its ``draws`` samples per item.

Held-out items (the data's validation split) give the validation score and the beta-edge drift.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..flowmap import warmup_cosine
from ..models.torsion_drive import dihedral_and_gradient
from .objective import torsion_score, wrap

#: phi below this (rad) is the beta basin's edge in the drift diagnostic (benchmarks/one_jump_torsions.py)
EDGE_RAD = -2.5


@dataclasses.dataclass
class DriveFitConfig:
    """Settings of a cached drive fit (units in the names)."""

    items: int = 65536  # training items cached (the network runs once per item and draw)
    validation_items: int = 4096  # held-out items (the data's validation split)
    draws: int = 4  # latent draws per item: the samples of each item's score
    tau_max_share: float = 0.5  # share of items jumping the longest tau (the sampling tau); the rest log-uniform
    steps: int = 6000  # optimiser steps on the cache
    batch_items: int = 1024
    lr: float = 3e-3
    lr_min_factor: float = 0.05
    input_noise_nm: float = 0.003  # start jitter, as the map's training (its forces stay those of the recorded start)
    chunk_items: int = 256  # items per network call while caching
    crps_weight: float = 1.0
    seed: int = 11

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ks(n_chunks: int, k_max: int, share: float, rng: np.random.Generator) -> list[int]:
    """Jump lengths (frames) per chunk: ``share`` of them k_max, the rest log-uniform over [1, k_max]."""
    out = []
    for _ in range(n_chunks):
        if rng.random() < share:
            out.append(k_max)
        else:
            out.append(int(round(math.exp(rng.uniform(0.0, math.log(k_max))))))
    return out


@torch.no_grad()
def build_cache(model, data, cfg: DriveFitConfig, tau_max_ps: float, split: str = "train",
                n_items: int | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the frozen network of ``model`` (a MolecularFlowMap with a drive) on ``n_items`` (default
    ``cfg.items``) items of ``data`` (a FrameData; its start forces are read) -> tensors: ``inv``
    (D, I, Q, 12), ``pseudo`` (D, I, Q, P), ``theta_net`` (D, I, Q) rad, ``theta_md`` (I, Q) rad, ``theta0``
    (I, Q) rad, ``tau`` (I,) ps, for D = ``cfg.draws`` draws."""
    from tqdm.auto import tqdm

    drive = model.drive
    if drive is None:
        raise InputError("build_cache needs a map with a torsion drive (MapConfig.torsion_drive > 0)")
    n_items = cfg.items if n_items is None else n_items
    k_max = max(1, min(int(round(tau_max_ps / data.h0_ps)), data.max_jump()))
    rng = np.random.default_rng(cfg.seed + (0 if split == "train" else 1))
    gen = torch.Generator().manual_seed(cfg.seed + (0 if split == "train" else 1))
    read_forces, data.read_forces = data.read_forces, True
    n_chunks = -(-n_items // cfg.chunk_items)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("inv", "pseudo", "theta_net", "theta_md", "theta0", "tau")}
    D = cfg.draws
    dtype = next(model.parameters()).dtype
    try:
        for k in tqdm(_ks(n_chunks, k_max, cfg.tau_max_share, rng), disable=not progress, desc=f"drive cache ({split})"):
            b = data.batch(cfg.chunk_items, k, rng, split=split, dtype=dtype)
            x0 = b["x0"]
            if cfg.input_noise_nm > 0:
                x0 = x0 + cfg.input_noise_nm * torch.randn(x0.shape, generator=gen, dtype=dtype)
            rep = lambda t: t.repeat(D, *([1] * (t.dim() - 1)))  # noqa: E731  (draw-major: index d * B + i)
            x, v, L, tau, f = rep(x0), rep(b["v0"]), rep(b["L"]), rep(b["tau"]), rep(b["f0"])
            eps = model.sample_latent(x.shape[0], gen).to(dtype)
            x_t, _, t_feat = model.network_jump(x, v, L, eps, tau)
            inv, pseudo = drive.features(x, v, L, eps, tau, t_feat, model.masses, model.sigma, model.kT, x_t, f)
            B = x0.shape[0]
            parts["inv"].append(inv.view(D, B, *inv.shape[1:]))
            parts["pseudo"].append(pseudo.view(D, B, *pseudo.shape[1:]))
            parts["theta_net"].append(dihedral_and_gradient(x_t, drive.quads)[0].view(D, B, -1))
            parts["theta_md"].append(dihedral_and_gradient(b["x1"], drive.quads)[0])
            parts["theta0"].append(dihedral_and_gradient(b["x0"], drive.quads)[0])
            parts["tau"].append(b["tau"])
    finally:
        data.read_forces = read_forces
    cat = {k: torch.cat(v, dim=1 if k in ("inv", "pseudo", "theta_net") else 0) for k, v in parts.items()}
    return {k: (v[:, :n_items] if k in ("inv", "pseudo", "theta_net") else v[:n_items]) for k, v in cat.items()}


def drive_score(drive, cache: dict[str, torch.Tensor], idx: torch.Tensor, spread: torch.Tensor,
                crps_weight: float = 1.0) -> torch.Tensor:
    """Mean score of the drive on cached items ``idx`` (differentiable): for a binned drive the
    negative log-likelihood (per rad) of the turn each draw needed to reach MD's torsions from the
    network's (the log score: strictly proper, and it prices the tails a turn law must not grow);
    for an implicit one the ``torsion_crps`` score of its draws."""
    tau = cache["tau"][idx]
    D = cache["inv"].shape[0]
    if drive.bins:
        need = wrap(cache["theta_md"][idx][None] - cache["theta_net"][:, idx])
        return -drive.log_prob(cache["inv"][:, idx], cache["pseudo"][:, idx], tau[None].expand(D, -1), need).mean()
    delta = drive.delta(cache["inv"][:, idx], cache["pseudo"][:, idx], tau[None].expand(D, -1))
    return torsion_score(cache["theta_net"][:, idx] + delta, cache["theta_md"][idx], spread, crps_weight).mean()


@torch.no_grad()
def edge_drift(drive, cache: dict[str, torch.Tensor], tau_ps: float, edge_rad: float = EDGE_RAD) -> dict[str, float]:
    """Beta-edge diagnostic on cached items jumping ``tau_ps``: starts with phi < ``edge_rad``; mean phi
    change (rad) and the share past -pi, of MD, of the network alone and with the drive."""
    sel = (torch.isclose(cache["tau"], torch.tensor(tau_ps, dtype=cache["tau"].dtype), atol=1e-6)
           & (cache["theta0"][:, 0] < edge_rad))
    idx = torch.nonzero(sel)[:, 0]
    if len(idx) == 0:
        return {"starts": 0}
    D = cache["inv"].shape[0]
    delta = drive.delta(cache["inv"][:, idx], cache["pseudo"][:, idx], cache["tau"][idx][None].expand(D, -1))
    phi0 = cache["theta0"][idx, 0]

    def stats(end):  # end (..., n) phi after the jump
        d = wrap(end - phi0)
        return float(d.mean()), float(((phi0 + d) < -math.pi).float().mean())

    md = stats(cache["theta_md"][idx, 0])
    net = stats(cache["theta_net"][:, idx, 0])
    drv = stats(cache["theta_net"][:, idx, 0] + delta[..., 0])
    return {"starts": int(len(idx)), "dphi_mean_md": md[0], "past_minus_pi_md": md[1],
            "dphi_mean_network": net[0], "past_minus_pi_network": net[1],
            "dphi_mean_drive": drv[0], "past_minus_pi_drive": drv[1]}


def fit_drive(drive, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], spread: torch.Tensor,
              cfg: DriveFitConfig, tau_max_ps: float, progress: bool = True,
              log_every: int = 500) -> list[dict[str, float]]:
    """Train ``drive``'s weights in place on the cache ``train`` (Adam, warm-up + cosine LR); returns the
    history rows (step, train score, validation score, beta-edge drift on ``val`` at ``tau_max_ps``)."""
    from tqdm.auto import tqdm

    params = list(drive.parameters())  # the MLP, and a binned drive's landscape
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.steps, cfg.lr_min_factor))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = train["tau"].shape[0]
    history: list[dict[str, float]] = []
    running, t0 = None, time.perf_counter()
    val_idx = torch.arange(val["tau"].shape[0])
    bar = tqdm(range(cfg.steps), disable=not progress, desc="drive fit")
    for step in bar:
        idx = torch.randint(0, n, (min(cfg.batch_items, n),), generator=gen)
        loss = drive_score(drive, train, idx, spread, cfg.crps_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the drive fit's score became non-finite at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            with torch.no_grad():
                v = float(drive_score(drive, val, val_idx, spread, cfg.crps_weight))
            row = {"step": step + 1, "train_score": running, "val_score": v, "wall_s": time.perf_counter() - t0,
                   **{f"edge_{k}": x for k, x in edge_drift(drive, val, tau_max_ps).items()}}
            history.append(row)
            bar.set_postfix(train=f"{running:.4f}", val=f"{v:.4f}")
            if not progress:
                print(f"drive fit step {step + 1}: train {running:.4f} val {v:.4f} "
                      f"edge dphi {row.get('edge_dphi_mean_drive', float('nan')):+.3f} "
                      f"(MD {row.get('edge_dphi_mean_md', float('nan')):+.3f})", file=sys.stderr, flush=True)
    return history
