"""Training a molecular flow map (user story 2).

    >>> molflow.train("alanine_dipeptide", data=["run.h5"], out="model.pt", tau_max_ps=1.0, steps=2000)

Each optimiser step mixes three SSFM losses (DESIGN.md section 3.2) on sub-batches:
``local`` (one frame interval h0, target the recorded next frame), ``direct`` (k intervals, target
the recorded frame k later, coefficients composed exactly) and ``semigroup`` (self-distillation:
an EMA teacher's two half-jumps vs the student's one full jump, on split paths). Objective
``whitened_crps`` (the default: the energy score on Cartesian features and whitened internal
coordinates plus per-coordinate CRPS, :mod:`molflow.training.objective`, chosen in issue #10),
``energy`` (the energy score on Cartesian features alone, with ``n_latent_samples`` >= 2) or ``mse``. The longest jump
grows by curriculum from h0 to ``tau_max_ps``. Checkpoints (atomic) every ``checkpoint_every``
steps and at the end; ``resume=True`` continues bit-for-bit from the last one.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import __version__
from ..errors import InputError
from ..flowmap import score
from ..evaluation.structure import rmsd
from ..models.molecular import MapConfig
from ..seeding import random_seed
from ..systems import MolecularSystem, load_system
from ..units import kinetic_temperature
from .checkpoint import load_checkpoint, save_checkpoint
from .data import FrameData
from .objective import OBJECTIVES, WhitenedInternalScore


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters (``molflow train --config file.yaml`` sets them; flags override)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    objective: str = "whitened_crps"  # "whitened_crps" | "energy" | "mse" (training/objective.py)
    crps_weight: float = 1.0  # weight of the per-coordinate CRPS in "whitened_crps"
    input_noise_nm: float = 0.01  # std of Gaussian noise on the start positions of recorded jumps (issue #10)
    n_latent_samples: int = 2  # m, latent draws per item for the energy score
    tau_max_ps: float = 1.0
    curriculum_fraction: float = 0.5  # share of steps over which the longest jump grows to tau_max
    fraction_local: float = 0.4
    fraction_direct: float = 0.3
    fraction_semigroup: float = 0.3
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    validate_every: int = 250
    validation_items: int = 32

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {f.name for f in dataclasses.fields(MapConfig)}
        if unknown:
            raise InputError(f"unknown training setting(s) {sorted(unknown)}")
        if "objective" in d and d["objective"] not in OBJECTIVES:
            raise InputError(f"unknown objective {d['objective']!r}: choose one of {', '.join(OBJECTIVES)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _features(x, v, x_ref, tau, v_th):
    """Normalised (x, v) on which scoring rules take their norm: displacement / (v_th tau), v / v_th."""
    scale = (v_th[None, :, None] * tau[:, None, None].clamp_min(1e-3))
    return torch.cat([((x - x_ref) / scale).flatten(1), (v / v_th[None, :, None]).flatten(1)], 1)




class Trainer:
    """Holds model, EMA teacher, optimiser, data and RNG state; steps and checkpoints."""

    def __init__(self, system: MolecularSystem, data: FrameData, config: TrainConfig, map_config: MapConfig,
                 device: torch.device, seed: int):
        from ..sampling import build_model

        self.system, self.data, self.config, self.map_config = system, data, config, map_config
        self.device, self.seed = device, seed
        torch.manual_seed(seed)
        self.model = build_model(system, map_config).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.k_tau_max = max(1, min(int(round(config.tau_max_ps / data.h0_ps)), data.max_jump()))
        self.scorer = None
        if config.objective == "whitened_crps":  # spreads from (at most 20000) training frames
            x = data.x[data.train_traj, data.train_frames[0]:data.train_frames[1]].reshape(-1, *data.x.shape[2:])
            x = x[np.linspace(0, len(x) - 1, min(len(x), 20000)).astype(int)]
            self.scorer = WhitenedInternalScore(system.bonds, x, config.crps_weight)

    def _lr_factor(self, step: int) -> float:  # linear warm-up then cosine decay
        warm = max(1, self.config.steps // 50)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.config.steps - warm))))

    # ------------------------------------------------------------------ jumps
    def k_max(self) -> int:
        """Longest jump (frames) allowed now by the curriculum."""
        grow = max(1, int(self.config.curriculum_fraction * self.config.steps))
        frac = min(1.0, (self.step + 1) / grow)
        return max(1, int(round(math.exp(frac * math.log(self.k_tau_max)))))

    def _draw_k(self, lo: int, hi: int) -> int:
        if hi <= lo:
            return lo
        return int(round(math.exp(self.rng.uniform(math.log(lo), math.log(hi)))))

    def _perturb(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training noise (learned simulators' trick): start positions jittered, targets kept, so the
        map learns to pull a slightly-off state back instead of compounding the error over a rollout."""
        s = self.config.input_noise_nm
        if s > 0:
            b = dict(b)
            b["x0"] = b["x0"] + s * self.randn(*b["x0"].shape).to(b["x0"].dtype)
        return b

    def randn(self, *shape: int) -> torch.Tensor:
        """Every random normal draw of a training step (latents of student and teacher, training
        noise) comes from here, on the trainer's generator: the DDP wrapper shards this one seam."""
        return torch.randn(shape, generator=self.gen, device=self.device)

    def _latent(self, B: int) -> torch.Tensor:
        """Fresh latents (B, k, A, 3), as the model's own ``sample_latent`` draws them."""
        return self.randn(B, self.map_config.n_latent, self.system.n_atoms, 3)

    def _jump_loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Local/direct loss on recorded jumps: the target is the recorded end state."""
        m = self.config.n_latent_samples if self.config.objective != "mse" else 1
        B = b["x0"].shape[0]
        rep = lambda t: t.repeat(m, *([1] * (t.dim() - 1)))  # noqa: E731
        xt, vt = self.model(rep(b["x0"]), rep(b["v0"]), rep(b["L"]), self._latent(m * B), rep(b["tau"]))
        v_th = self.model.v_th
        pred = _features(xt, vt, rep(b["x0"]), rep(b["tau"]), v_th).view(m, B, -1)
        target = _features(b["x1"], b["v1"], b["x0"], b["tau"], v_th)
        if self.scorer is not None:  # whitened internal coordinates + per-coordinate CRPS
            return self.scorer(pred, target, xt.view(m, B, *xt.shape[1:]), b["x1"]).mean()
        # per-item scoring rule shared with the generic SSFM code; / sqrt(D) keeps it O(1) per DOF
        return score(pred, target, self.config.objective).mean() / math.sqrt(pred.shape[-1])

    def _semigroup_loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Self-distillation on the recorded path of 2k intervals: teacher = two EMA half-jumps fed
        the recorded half-path coefficients (a true sample of the halves given the whole), student =
        one jump with the composed coefficients; scored against the teacher's end state, / tau."""
        from .data import _composition

        N = self.data.n_coefficients
        L1, L2 = b["L_halves"]
        B = b["x0"].shape[0]
        with torch.no_grad():
            xm, vm = self.ema(b["x0"], b["v0"], L1, self._latent(B), b["tau"] / 2)
            xT, vT = self.ema(xm, vm, L2, self._latent(B), b["tau"] / 2)
        A2 = torch.as_tensor(_composition(2, N), dtype=L1.dtype, device=L1.device)
        L = torch.einsum("nm,bmac->bnac", A2[0], L1) + torch.einsum("nm,bmac->bnac", A2[1], L2)
        teacher = {"x0": b["x0"], "v0": b["v0"], "x1": xT, "v1": vT, "L": L, "tau": b["tau"]}
        # features are normalised by tau (displacement / (v_th tau)), which plays the role of the
        # 1/tau scale of DESIGN.md section 3.2: scores are O(1) at every jump length
        return self._jump_loss(teacher)

    def train_step(self) -> dict[str, float]:
        c, d = self.config, self.data
        self.model.train()
        B = c.batch_size
        n_loc = max(1, int(round(c.fraction_local * B)))
        n_dir = int(round(c.fraction_direct * B))
        n_sg = int(round(c.fraction_semigroup * B))
        kmax = self.k_max()
        losses = {}
        total = 0.0
        local = d.batch(n_loc, 1, self.rng, device=self.device)
        losses["local"] = self._jump_loss(self._perturb(local))
        total = total + c.fraction_local * losses["local"]
        if n_dir and kmax >= 2:
            k = self._draw_k(2, kmax)
            losses["direct"] = self._jump_loss(self._perturb(d.batch(n_dir, k, self.rng, device=self.device)))
            total = total + c.fraction_direct * losses["direct"]
        if n_sg and kmax >= 2:
            k = max(1, self._draw_k(2, kmax) // 2)
            r, f = d.draw(n_sg, 2 * k, self.rng)
            whole = d.items(r, f, 2 * k, device=self.device)
            h1 = d.items(r, f, k, device=self.device)
            h2 = d.items(r, f + k, k, device=self.device)
            whole["L_halves"] = (h1["L"], h2["L"])
            losses["semigroup"] = self._semigroup_loss(whole)
            total = total + c.fraction_semigroup * losses["semigroup"]
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.mul_(c.ema_decay).add_(pm.detach(), alpha=1 - c.ema_decay)
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out.update(loss=float(total.detach()), grad_norm=float(gnorm), tau_max_ps=kmax * d.h0_ps, lr=self.sched.get_last_lr()[0])
        return out

    @torch.no_grad()
    def validate(self, taus_ps: Sequence[float] | None = None) -> dict[str, float]:
        """Strong error (mean and sample modes) and one-jump kinetic temperature on held-out data."""
        from ..sampling import FlowMap

        fm = FlowMap(self.ema, self.system, self.data.h0_ps)
        rng = np.random.default_rng(12345)  # the same validation items every time
        gen = torch.Generator(device=self.device).manual_seed(12345)
        out = {}
        heavy = torch.as_tensor(self.system.heavy_atoms, device=self.device)
        masses = self.model.masses
        bonds = torch.as_tensor(np.asarray(self.system.bonds, dtype=np.int64), device=self.device)
        taus = taus_ps or sorted({self.data.h0_ps, min(0.1, self.config.tau_max_ps), self.config.tau_max_ps})
        for tau in taus:
            k = max(1, min(int(round(tau / self.data.h0_ps)), self.data.max_jump()))
            b = self.data.batch(self.config.validation_items, k, rng, split="val", device=self.device)
            key = f"{k * self.data.h0_ps:g}ps"
            for mode in ("mean", "sample"):
                xt, vt = fm.jump(b["x0"], b["v0"], b["L"], k * self.data.h0_ps, mode=mode, generator=gen, n_mean=8)
                out[f"val_rmsd_{mode}_{key}_nm"] = float(np.sqrt(np.mean(
                    rmsd(xt[:, heavy].cpu().numpy(), b["x1"][:, heavy].cpu().numpy()) ** 2)))
                if mode == "sample":
                    out[f"val_kinetic_temperature_{key}_K"] = float(kinetic_temperature(vt, masses).mean())
                    # spread of each bond length over the held-out items, sampled / recorded (mean over bonds)
                    bl = lambda x: (x[:, bonds[:, 0]] - x[:, bonds[:, 1]]).norm(dim=-1).std(0)  # noqa: E731
                    out[f"val_bond_std_ratio_{key}"] = float((bl(xt) / bl(b["x1"]).clamp_min(1e-9)).mean())
        return out

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        s = self.system
        return {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "step": self.step, "h0_ps": self.data.h0_ps,
            "torch_rng": self.gen.get_state(), "cpu_rng": torch.get_rng_state(),
            "numpy_rng_json": self.rng.bit_generator.state, "seed": self.seed,
            "map_config_json": self.map_config.to_dict(), "train_config_json": dataclasses.asdict(self.config),
            "system_json": {"name": s.name, "pdb": s.pdb_text, "forcefield": list(s.forcefield_files),
                            "temperature_K": s.temperature_K, "friction_per_ps": s.friction_per_ps,
                            "timestep_fs": s.timestep_fs, "fingerprint": s.fingerprint},
            "normalisation_json": {"v_thermal_nm_per_ps": self.model.v_th.tolist(), "h0_ps": self.data.h0_ps,
                                   "L_scale": "sqrt(tau/(2n+1))", "features": "dx/(v_th tau), v/v_th"},
            "history_json": self.history,
        }

    def load_state(self, ck: dict[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step = int(ck["step"])
        self.gen.set_state(ck["torch_rng"])
        torch.set_rng_state(ck["cpu_rng"])
        self.rng.bit_generator.state = ck["numpy_rng_json"]
        self.history = list(ck["history_json"])


def train(system: str | MolecularSystem, data: Sequence[str] | str, out: str | os.PathLike,
          tau_max_ps: float = 1.0, n_coefficients: int | None = 3, steps: int | None = None,
          device: str = "auto", seed: int | None = None, resume: bool = False,
          config: TrainConfig | dict | None = None, progress: bool = True, devices: int = 1,
          **map_settings: Any) -> Path:
    """Train a flow map on reference runs; writes the checkpoint ``out`` and ``out``.metrics.csv.

    ``devices`` > 1: data-parallel training in that many processes (DDP, one per GPU on CUDA, gloo
    processes on CPU; :mod:`molflow.training.distributed`) with the same global batch. Launched by
    torchrun (``RANK``/``WORLD_SIZE`` set), the launcher's processes are the ranks.
    """
    from ..sampling import resolve_device
    from . import distributed

    out = Path(out)
    n = 1 if devices is None else int(devices)
    dev = resolve_device(device)
    launched = distributed.torchrun_world()
    args = dict(system=system, data=data, out=out, tau_max_ps=tau_max_ps, n_coefficients=n_coefficients,
                steps=steps, seed=seed, resume=resume, config=config, progress=progress, map_settings=map_settings)
    if launched is not None:
        rank, world, local = launched
        if n not in (1, world):
            raise InputError(f"--devices {n} but the launcher started {world} processes (WORLD_SIZE)")
        distributed.check_devices(dev, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        return _train(distributed.init(rank, world, local, dev.type), device=dev, **args)
    distributed.check_devices(dev, n)
    if n == 1:
        return _train(None, device=dev, **args)
    if seed is None:  # one seed for every rank (a resumed run takes the checkpoint's)
        args["seed"] = random_seed()
    distributed.launch(_train_rank, n, dev.type, args)
    return out


def _train_rank(ctx, args: dict[str, Any]) -> None:
    """One rank of a spawned data-parallel run (module level: it is pickled by reference)."""
    _train(ctx, device=ctx.device, **args)


def _train(ctx, system, data, out: Path, tau_max_ps, n_coefficients, steps, device: torch.device, seed,
           resume: bool, config, progress: bool, map_settings: dict[str, Any]) -> Path:
    """The training run of one process; ``ctx`` (a distributed.Context) or None for a single one."""
    from tqdm.auto import tqdm

    from . import distributed

    main = ctx is None or ctx.is_main
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config or {}))
    map_cfg = MapConfig(**{k: v for k, v in {**(config if isinstance(config, dict) else {}), **map_settings}.items()
                           if k in {f.name for f in dataclasses.fields(MapConfig)}})
    cfg = dataclasses.replace(cfg, tau_max_ps=float(tau_max_ps), steps=int(steps or cfg.steps))
    mol = system if isinstance(system, MolecularSystem) else load_system(system)
    frames = FrameData(paths, n_coefficients)
    if frames.system.fingerprint != mol.fingerprint:
        raise InputError(f"training data were made for {frames.system.name!r} with other settings "
                         f"(fingerprint {frames.system.fingerprint} vs {mol.fingerprint})")
    map_cfg = dataclasses.replace(map_cfg, n_coefficients=frames.n_coefficients)
    dev = device
    if resume and out.exists():
        ck = load_checkpoint(out, map_location=dev)
        if ck["system_json"]["fingerprint"] != mol.fingerprint:
            raise InputError(f"cannot resume {out}: it was trained for another system")
        cfg = dataclasses.replace(TrainConfig.from_dict(ck["train_config_json"]), steps=cfg.steps)
        map_cfg = MapConfig.from_dict(ck["map_config_json"])
        trainer = Trainer(mol, frames, cfg, map_cfg, dev, int(ck["seed"]))
        trainer.load_state(ck)
    else:  # a fresh run replaces an existing --out (pass resume=True to continue it)
        seed = random_seed() if seed is None else int(seed)
        if ctx is not None:  # under torchrun each rank may have drawn its own: rank 0's wins
            seed = ctx.broadcast_object(seed)
        trainer = Trainer(mol, frames, cfg, map_cfg, dev, seed)
    shards = distributed.distribute(trainer, ctx) if ctx is not None else None
    if progress and main:
        n_par = sum(p.numel() for p in trainer.model.parameters())
        ranks = f" processes={ctx.world}" if ctx is not None else ""
        print(f"molflow train: system={mol.name} seed={trainer.seed} device={dev}{ranks} params={n_par} "
              f"h0={frames.h0_ps * 1000:g} fs tau_max={cfg.tau_max_ps} ps N={frames.n_coefficients}", file=sys.stderr)
    log_path = out.with_name(out.name + ".metrics.csv")
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not (progress and main), desc="train",
               file=sys.stderr, dynamic_ncols=True)
    t0, step0 = time.perf_counter(), trainer.step
    try:
        while trainer.step < cfg.steps:
            row = trainer.train_step()
            if shards is not None:  # the global batch's losses (collective)
                row = distributed.reduce_row(row, shards, cfg, ctx.device)
            row["step"] = trainer.step
            if main and (trainer.step % cfg.validate_every == 0 or trainer.step == cfg.steps):
                row.update(trainer.validate())
            row["items_per_s"] = (trainer.step - step0) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            trainer.history.append(row)
            bar.update(1)
            bar.set_postfix_str(f"loss {row['loss']:.3f} tau<={row['tau_max_ps']:.2f}ps")
            if main and (trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps):
                save_checkpoint(out, trainer.state())
                _write_log(log_path, trainer.history)
        bar.close()
        if main and trainer.step == cfg.steps and not out.exists():
            save_checkpoint(out, trainer.state())
        if ctx is not None:
            ctx.barrier()  # every rank returns once the checkpoint is on disk
    finally:
        if ctx is not None:
            distributed.undistribute(trainer)
    return out


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
