"""Training the Boltzmann map on reference MD frames (``molflow train-boltzmann``).

    >>> molflow.train_boltzmann("alanine_dipeptide", data="run.h5", out="bg.pt", steps=4000)

Frames of the run files are centred and scaled by one length s (their RMS per-coordinate spread);
they are samples of the Boltzmann distribution, and the forward VP process turns them into samples of
every marginal p_t exactly (y_t = α_t y_0 + σ_t ε), so no rollout is ever needed for training:

1. **denoising score matching** (DSM): F(y_t, t) regresses σ_t y_0 - α_t ε (that is the denoiser
   D = α y + σ F regressing y_0, weighted by 1/σ²), t uniform on [0, 1]; ``dsm_warmup_fraction`` of
   the steps are DSM only (the other losses' teachers need a score);
2. **local loss** (:func:`molflow.flowmap.local_loss`): on the finest grid (steps of 1/``fine_steps``),
   target = ``local_substeps`` exponential-integrator steps of the SDE with the EMA model's own
   score (:class:`~molflow.boltzmann.model.ScoreSolver`) on exactly split path coefficients
   (:class:`~molflow.flowmap.ComposedFlowMap`) — the small-step target built from the same path
   coefficients the map sees;
3. **semigroup loss** (:func:`molflow.flowmap.semigroup_loss`): steps [j/K, (j+1)/K] of the K-step
   grids the sampler uses (K from ``fine_steps``/2 down to 1 by curriculum), teacher = two EMA
   half-steps on the halves of the path (exact split), student = one step; energy score.

Scores are taken on the flattened positions y (unit scale) and divided by sqrt(3A), as the flow-map
trainer does. ``networks = 2``: DSM trains the score network during the warm-up, which is then frozen
(its EMA weights), and the correction network is trained by the local and semigroup losses alone.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..flowmap import EMA, ComposedFlowMap, local_loss, sample_coefficients_torch, semigroup_loss, warmup_cosine
from ..seeding import random_seed
from ..systems import MolecularSystem, load_system
from ..checkpoint import save_checkpoint
from .geometry import centre
from .model import BoltzmannConfig, BoltzmannMap, ScoreSolver, pack

FORMAT = "molflow-boltzmann"


@dataclasses.dataclass
class BoltzmannTrainConfig:
    """Optimisation settings (``--config file.yaml`` sets them and BoltzmannConfig's; flags override)."""

    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    dsm_warmup_fraction: float = 0.3
    fraction_dsm: float = 0.4  # after the warm-up (networks = 1; 0 for networks = 2)
    fraction_local: float = 0.15
    fraction_semigroup: float = 0.45
    fine_steps: int = 64
    local_substeps: int = 4
    curriculum_fraction: float = 0.5  # of the post-warm-up steps, over which the coarsest grid goes 32 -> 1 steps
    objective: str = "energy"
    n_latent_samples: int = 2
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    skip_fraction: float = 0.1  # of each replica's first frames, left out
    checkpoint_every: int = 500

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BoltzmannTrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {f.name for f in dataclasses.fields(BoltzmannConfig)}
        if unknown:
            raise InputError(f"unknown Boltzmann training setting(s) {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def load_weighted_frames(paths: Sequence[str | os.PathLike], system: MolecularSystem, skip_fraction: float = 0.1
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Centred positions (M, A, 3) nm and weights (M,) (mean 1) of the training frames.

    A run file (``.h5``, or a sharded run's manifest) gives every frame after ``skip_fraction`` of each
    replica, weight 1 (the frames of equilibrium MD are Boltzmann samples). A weighted-frame file
    (``.npz`` with ``positions`` (M, A, 3) nm and ``weight`` (M,), e.g. umbrella windows with their MBAR
    weights, :func:`molflow.md.umbrella.sample_phi_windows`) gives its frames with their weights,
    rescaled so that each file carries mass in proportion to its frame count.
    """
    from ..trajectory import Trajectory

    if not paths:
        raise InputError("no training data: pass at least one --data file")
    xs, ws = [], []
    for p in paths:
        if str(p).endswith(".npz"):
            if not Path(p).is_file():
                raise InputError(f"no such training file: {p}")
            try:
                with np.load(p) as z:
                    x, w = np.asarray(z["positions"], dtype=np.float64), np.asarray(z["weight"], dtype=np.float64)
                    fp = str(z["fingerprint"]) if "fingerprint" in z.files else None
            except (KeyError, ValueError, OSError) as exc:
                raise InputError(f"{p}: a weighted-frame file needs 'positions' (M, A, 3) nm and 'weight' (M,) "
                                 f"({exc})") from None
            if fp is not None and fp != system.fingerprint:
                raise InputError(f"{p} was made for another system or settings (fingerprint {fp} vs "
                                 f"{system.fingerprint})")
            if x.ndim != 3 or x.shape[1:] != (system.n_atoms, 3) or w.shape != (len(x),):
                raise InputError(f"{p}: positions {x.shape} and weight {w.shape} do not fit {system.name} "
                                 f"({system.n_atoms} atoms)")
            if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise InputError(f"{p}: weights must be finite, non-negative and not all zero")
            xs.append(x)
            ws.append(w * len(w) / w.sum())
            continue
        with Trajectory(p) as t:
            if t.attrs.get("fingerprint") != system.fingerprint:
                raise InputError(f"{p} was made for {t.attrs.get('system')!r} with other settings "
                                 f"(fingerprint {t.attrs.get('fingerprint')} vs {system.fingerprint})")
            first = min(int(math.ceil(skip_fraction * t.n_frames)), max(t.n_frames - 1, 0))
            x = np.asarray(t.positions[:, first:], dtype=np.float64)
        xs.append(x.reshape(-1, *x.shape[-2:]))
        ws.append(np.ones(len(xs[-1])))
    x, w = np.concatenate(xs), np.concatenate(ws)
    finite = np.isfinite(x).all(axis=(1, 2))
    x, w = x[finite], w[finite]
    if len(x) < 2:
        raise InputError("training needs at least 2 frames")
    return centre(x), w


def load_frames(paths: Sequence[str | os.PathLike], system: MolecularSystem, skip_fraction: float = 0.1
                ) -> np.ndarray:
    """Centred positions (M, A, 3) nm of every frame of the run files (after ``skip_fraction``); the VP
    map trains on equally weighted frames, so weighted-frame files are refused here."""
    x, w = load_weighted_frames(paths, system, skip_fraction)
    if not np.allclose(w, 1.0):
        raise InputError("the VP map (kind: vp) trains on MD run files only, not on weighted frames (.npz); "
                         "the internal-coordinate sampler (the default kind) takes both")
    return x


def pair_statistics(frames_nm: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (A, A) nm of the distances of bonded and 1-3 pairs over the frames (0 elsewhere)."""
    near = (edges[..., 0] + edges[..., 1]) > 0  # graph distance 1 or 2
    i, j = np.nonzero(near)
    d = np.linalg.norm(frames_nm[:, i] - frames_nm[:, j], axis=-1)
    mean = np.zeros(near.shape)
    std = np.zeros(near.shape)
    mean[i, j] = d.mean(0)
    std[i, j] = np.maximum(d.std(0), 1e-4)
    return mean, std


def build_map(system: MolecularSystem, scale_nm: float, config: BoltzmannConfig,
              frames_nm: np.ndarray | None = None) -> BoltzmannMap:
    """A fresh map for ``system``; ``frames_nm`` (training frames) set its pair statistics (a loaded
    checkpoint overwrites them with the recorded ones)."""
    from ..models.molecular import atom_features

    scal, edges = atom_features(system)
    pm, ps = pair_statistics(frames_nm, edges) if frames_nm is not None else (None, None)
    if pm is None:  # placeholders with the right mask (the checkpoint's buffers replace the values)
        near = (edges[..., 0] + edges[..., 1]) > 0
        pm, ps = near * 1.0, np.ones(near.shape)
    return BoltzmannMap(scal, edges, scale_nm, config, pm, ps)


def _y_features(z: torch.Tensor) -> torch.Tensor:
    """Scoring-rule features: the positions of a packed state, flattened (the time row dropped)."""
    return z[:, :-1].reshape(z.shape[0], -1)


class BoltzmannTrainer:
    """Model, EMA teacher, optimiser, data and random state; one optimiser step at a time."""

    def __init__(self, system: MolecularSystem, frames_nm: np.ndarray, config: BoltzmannTrainConfig,
                 map_config: BoltzmannConfig, device: torch.device, seed: int):
        self.system, self.config, self.map_config, self.device, self.seed = system, config, map_config, device, seed
        scale = float(np.sqrt((frames_nm ** 2).sum(axis=(1, 2)).mean() / (3 * (frames_nm.shape[1] - 1))))
        self.scale_nm = scale
        self.data = torch.as_tensor(frames_nm / scale, dtype=torch.float32, device=device)
        torch.manual_seed(seed)
        self.model = build_map(system, scale, map_config, frames_nm).to(device)
        self.teacher = EMA(self.model, decay=config.ema_decay, warmup=False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        self.fine = ComposedFlowMap(ScoreSolver(self.ema), config.local_substeps, map_config.n_coefficients,
                                    (system.n_atoms, 3)).to(device)

    @property
    def ema(self) -> torch.nn.Module:
        """The EMA teacher's model (flowmap.EMA, no warm-up)."""
        return self.teacher.model

    # ------------------------------------------------------------------ schedule
    @property
    def warmup_steps(self) -> int:
        return int(round(self.config.dsm_warmup_fraction * self.config.steps))

    def coarsest_steps(self) -> int:
        """Fewest grid steps the curriculum allows now (fine_steps/2 -> 1 geometrically)."""
        c = self.config
        top = max(1, c.fine_steps // 2)
        span = max(1, int(c.curriculum_fraction * (c.steps - self.warmup_steps)))
        frac = min(1.0, max(0, self.step_count - self.warmup_steps) / span)
        return max(1, int(round(top ** (1.0 - frac))))

    def lr_factor(self) -> float:
        """Warm-up and cosine to 0.1 of the learning rate (:func:`molflow.flowmap.warmup_cosine`)."""
        return warmup_cosine(self.step_count, self.config.steps, 0.1)

    # ------------------------------------------------------------------ items
    def _noised(self, n: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.rng.integers(0, len(self.data), n), device=self.device)
        y0 = self.data[idx]
        eps = centre(torch.randn(y0.shape, generator=self.gen, device=self.device))
        s = self.model.schedule
        a = s.alpha(t.double()).float()[:, None, None]
        sg = s.sigma(t.double()).float()[:, None, None]
        return a * y0 + sg * eps, y0, eps

    def dsm_loss(self, n: int) -> torch.Tensor:
        t = torch.rand(n, generator=self.gen, device=self.device)
        y, y0, eps = self._noised(n, t)
        s = self.model.schedule
        a = s.alpha(t.double()).float()[:, None, None]
        sg = s.sigma(t.double()).float()[:, None, None]
        f = self.model.score_output(y, t)
        return ((f - (sg * y0 - a * eps)) ** 2).sum((1, 2)).mean() / (3 * (self.system.n_atoms - 1))

    def _grid_items(self, n: int, K_lo: int, K_hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n steps [j/K, (j+1)/K], K log-uniform integer in [K_lo, K_hi]: (start t, tau)."""
        K = np.round(np.exp(self.rng.uniform(np.log(K_lo), np.log(K_hi) + 1e-12, n))).astype(int).clip(K_lo, K_hi)
        j = self.rng.integers(0, K)
        return (torch.as_tensor(j / K, dtype=torch.float32, device=self.device),
                torch.as_tensor(1.0 / K, dtype=torch.float32, device=self.device))

    def _kw(self) -> dict[str, Any]:
        c = self.config
        return dict(latent_fn=self.model.latent_fn, objective=c.objective, n_latent=c.n_latent_samples,
                    score_features=_y_features, tau_power=0.0, generator=self.gen)

    def _coefficients(self, tau: torch.Tensor) -> torch.Tensor:
        L = sample_coefficients_torch(tau, self.map_config.n_coefficients, (self.system.n_atoms, 3), self.gen)
        return centre(L)

    def local_loss(self, n: int) -> torch.Tensor:
        K = self.config.fine_steps
        t, tau = self._grid_items(n, K, K)
        y, _, _ = self._noised(n, t)
        z = pack(y, t)
        L = self._coefficients(tau)
        with torch.no_grad():
            target = self.fine(z, L, self.fine.latent_fn(n, self.gen), tau)
        loss, _ = local_loss(self.model, z, target, L, tau, **self._kw())
        return loss / math.sqrt(3 * self.system.n_atoms)

    def semigroup_loss(self, n: int) -> torch.Tensor:
        t, tau = self._grid_items(n, self.coarsest_steps(), max(1, self.config.fine_steps // 2))
        y, _, _ = self._noised(n, t)
        z = pack(y, t)
        loss, _ = semigroup_loss(self.model, self.ema, z, self._coefficients(tau), tau, **self._kw())
        return loss / math.sqrt(3 * self.system.n_atoms)

    # ------------------------------------------------------------------ a step
    def _freeze_score(self) -> None:
        """networks = 2, end of the warm-up: the score network takes its EMA weights and is frozen."""
        self.model.score_net.load_state_dict(self.ema.score_net.state_dict())
        self.model.score_net.requires_grad_(False)

    def train_step(self) -> dict[str, float]:
        c, B = self.config, self.config.batch_size
        two = self.map_config.networks == 2
        if two and self.step_count == self.warmup_steps:
            self._freeze_score()
        for g in self.opt.param_groups:
            g["lr"] = c.lr * self.lr_factor()
        self.model.train()
        losses: dict[str, torch.Tensor] = {}
        if self.step_count < self.warmup_steps:
            losses["dsm"] = self.dsm_loss(B)
            total = losses["dsm"]
        else:
            fr = {"dsm": 0.0 if two else c.fraction_dsm, "local": c.fraction_local, "semigroup": c.fraction_semigroup}
            tot = sum(fr.values())
            total = 0.0
            for kind, f in fr.items():
                n = int(round(f / tot * B))
                if n < 1:
                    continue
                losses[kind] = getattr(self, f"{kind}_loss")(n)
                total = total + (f / tot) * losses[kind]
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.opt.step()
        self.teacher.update(self.model)
        self.step_count += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out.update(loss=float(total.detach()), grad_norm=float(gnorm), coarsest_steps=self.coarsest_steps(),
                   lr=self.opt.param_groups[0]["lr"])
        return out

    # ------------------------------------------------------------------ checkpoint
    def state(self, wall_s: float) -> dict[str, Any]:
        s = self.system
        return {
            "format": FORMAT, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(), "step": self.step_count, "seed": self.seed,
            "scale_nm": self.scale_nm, "n_frames": int(len(self.data)),
            "map_config_json": self.map_config.to_dict(), "train_config_json": dataclasses.asdict(self.config),
            "system_json": {"name": s.name, "pdb": s.pdb_text, "forcefield": list(s.forcefield_files),
                            "temperature_K": s.temperature_K, "friction_per_ps": s.friction_per_ps,
                            "timestep_fs": s.timestep_fs, "fingerprint": s.fingerprint},
            "training_wall_clock_s": float(wall_s), "history_json": self.history,
            "torch_rng": self.gen.get_state(), "numpy_rng_json": self.rng.bit_generator.state,
        }

    def load_state(self, ck: dict[str, Any]) -> None:
        """Continue from a checkpoint of this run (``--resume``): weights, optimiser, step, RNGs."""
        if self.map_config.networks == 2 and int(ck["step"]) > self.warmup_steps:
            self.model.score_net.requires_grad_(False)  # frozen at the end of the warm-up, as it was
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step_count = int(ck["step"])
        self.history = list(ck.get("history_json") or [])
        if "torch_rng" in ck:
            self.gen.set_state(ck["torch_rng"])
            self.rng.bit_generator.state = ck["numpy_rng_json"]


def train_boltzmann(system: str | MolecularSystem, data: Sequence[str | os.PathLike] | str | os.PathLike,
                    out: str | os.PathLike, steps: int | None = None, device: str = "auto",
                    seed: int | None = None, config: BoltzmannTrainConfig | dict | None = None,
                    progress: bool = True, resume: bool = False, overwrite: bool = False,
                    **map_settings: Any) -> Path:
    """Train a Boltzmann map on reference runs of ``system``; writes the checkpoint ``out``.

    ``config``: a dict of settings. Its ``kind`` picks the sampler: ``"internal"`` (default) — the
    internal-coordinate sampler (:mod:`.icflow`; keys of :class:`~.icflow.InternalFlowConfig` and
    :class:`~.icflow.InternalTrainConfig`), trained on run files and/or weighted-frame files (.npz);
    ``"vp"`` — the Cartesian VP-SDE map (keys of :class:`BoltzmannTrainConfig` and
    :class:`~molflow.boltzmann.model.BoltzmannConfig`; a :class:`BoltzmannTrainConfig` instance also
    selects it), trained on run files. ``map_settings`` override the config's keys.
    ``steps`` counts optimiser steps. The checkpoint (``torch.load(weights_only=True)``) carries
    the model and its EMA copy, both configs, the scale, the system (PDB text, force field, settings,
    fingerprint), the training history and wall-clock time: sampling needs nothing else.
    An existing ``out`` is refused unless ``resume=True`` (continue it with its recorded settings;
    ``steps`` may grow) or ``overwrite=True``.
    """
    from tqdm.auto import tqdm

    from ..devices import resolve_device

    out = Path(out)
    if out.exists() and not (resume or overwrite):
        raise InputError(f"{out} exists: pass --resume to continue that training run or --overwrite to replace it")
    ck = None
    if resume and out.exists():
        from ..checkpoint import load_checkpoint

        ck = load_checkpoint(out, expected_format=FORMAT, kind="Boltzmann-sampler")
        config, map_settings, seed = dict(ck["train_config_json"]), dict(ck["map_config_json"]), int(ck["seed"])
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    settings = {**(config if isinstance(config, dict) else {}), **map_settings}
    if ck is not None:
        kind = ck["map_config_json"].get("kind", "vp")
    elif isinstance(config, BoltzmannTrainConfig):
        kind = map_settings.get("kind", "vp")
    else:
        kind = settings.get("kind", "internal")
    if kind not in ("internal", "vp"):
        raise InputError(f"kind must be 'internal' (internal-coordinate sampler) or 'vp' (Cartesian VP-SDE map), "
                         f"not {kind!r}")
    if kind == "internal":
        return _train_internal(system, paths, out, steps, seed, settings, progress, ck)
    map_settings = {k: v for k, v in map_settings.items() if k != "kind"}
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k != "kind"}
    raw = config if isinstance(config, dict) else {}
    cfg = config if isinstance(config, BoltzmannTrainConfig) else BoltzmannTrainConfig.from_dict(dict(raw))
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=int(steps))
    if cfg.steps < 1:
        raise InputError("--steps must be >= 1")
    mcfg = BoltzmannConfig.from_dict({**raw, **map_settings})
    mol = system if isinstance(system, MolecularSystem) else load_system(system)
    frames = load_frames(paths, mol, cfg.skip_fraction)
    dev = resolve_device(device)
    seed = random_seed() if seed is None else int(seed)
    trainer = BoltzmannTrainer(mol, frames, cfg, mcfg, dev, seed)
    wall0 = 0.0
    if ck is not None:
        if ck["system_json"]["fingerprint"] != mol.fingerprint:
            raise InputError(f"cannot resume {out}: it was trained for another system")
        trainer.load_state(ck)
        wall0 = float(ck.get("training_wall_clock_s", 0.0))
    if progress:
        n_par = sum(p.numel() for p in trainer.model.parameters())
        print(f"molflow train-boltzmann: system={mol.name} seed={seed} device={dev} params={n_par} "
              f"frames={len(frames)} scale={trainer.scale_nm:.4f} nm networks={mcfg.networks} eta={mcfg.eta}",
              file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=trainer.step_count, disable=not progress, desc="train-boltzmann",
               file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter() - wall0
    try:
        while trainer.step_count < cfg.steps:
            row = trainer.train_step()
            row["step"] = trainer.step_count
            trainer.history.append(row)
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{k} {row[k]:.3f}" for k in ("dsm", "local", "semigroup") if k in row)
                                + f" K>={row['coarsest_steps']}")
            if trainer.step_count % cfg.checkpoint_every == 0 or trainer.step_count == cfg.steps:
                save_checkpoint(out, trainer.state(time.perf_counter() - t0))
    finally:
        bar.close()
    return out


def _train_internal(system, paths: list, out: Path, steps: int | None, seed: int | None, settings: dict[str, Any],
                    progress: bool, ck: dict[str, Any] | None) -> Path:
    """``train_boltzmann`` for the internal-coordinate sampler: fit the base, train the coupling steps."""
    from tqdm.auto import tqdm

    from .icflow import InternalFlow, InternalFlowConfig, InternalTrainConfig, InternalTrainer

    flow_keys = {f.name for f in dataclasses.fields(InternalFlowConfig)}
    train_keys = {f.name for f in dataclasses.fields(InternalTrainConfig)}
    unknown = set(settings) - flow_keys - train_keys
    if unknown:
        raise InputError(f"unknown setting(s) for the internal-coordinate sampler: {sorted(unknown)}")
    fcfg = InternalFlowConfig.from_dict({k: v for k, v in settings.items() if k in flow_keys})
    tcfg = InternalTrainConfig.from_dict({k: v for k, v in settings.items() if k in train_keys})
    if steps is not None:
        tcfg = dataclasses.replace(tcfg, steps=int(steps))
    if tcfg.steps < 0:
        raise InputError("--steps must be >= 0")
    mol = system if isinstance(system, MolecularSystem) else load_system(system)
    t0 = time.perf_counter()
    frames, weights = load_weighted_frames(paths, mol, tcfg.skip_fraction)
    seed = random_seed() if seed is None else int(seed)
    if ck is not None:
        if ck["system_json"]["fingerprint"] != mol.fingerprint:
            raise InputError(f"cannot resume {out}: it was trained for another system")
        flow = InternalFlow(ck["layout_json"], fcfg)
        flow.load_state_dict(ck["model"])
        wall0 = float(ck.get("training_wall_clock_s", 0.0))
    else:
        flow = InternalFlow.fit(mol, frames, weights, fcfg, mask_seed=seed)
        wall0 = 0.0
    trainer = InternalTrainer(flow, frames, weights, tcfg, seed, system=mol)
    if ck is not None:
        trainer.load_state(ck)
    s = mol
    kish = float(weights.sum() ** 2 / (weights ** 2).sum())
    start = (t0 if ck is None else time.perf_counter()) - wall0  # a fresh run counts its data loading and fit

    def save(wall: float) -> None:
        save_checkpoint(out, {
            "format": FORMAT, **trainer.state(), "seed": seed, "layout_json": flow.layout,
            "map_config_json": fcfg.to_dict(), "train_config_json": dataclasses.asdict(tcfg),
            "n_frames": int(len(frames)), "data_json": {"paths": [str(p) for p in paths], "kish_frames": kish},
            "system_json": {"name": s.name, "pdb": s.pdb_text, "forcefield": list(s.forcefield_files),
                            "temperature_K": s.temperature_K, "friction_per_ps": s.friction_per_ps,
                            "timestep_fs": s.timestep_fs, "fingerprint": s.fingerprint},
            "training_wall_clock_s": float(wall)})

    if progress:
        n_par = sum(p.numel() for p in flow.stacks.parameters())
        print(f"molflow train-boltzmann: system={mol.name} kind=internal seed={seed} frames={len(frames)} "
              f"(Kish {kish:.0f}) broad torsions={len(flow.broad)} stiff coordinates={flow.n_stiff} "
              f"step counts={list(fcfg.step_counts)} params={n_par} objective={tcfg.objective}", file=sys.stderr)
    bar = tqdm(total=tcfg.steps, initial=trainer.step_count, disable=not progress, desc="train-boltzmann",
               file=sys.stderr, dynamic_ncols=True)
    try:
        if trainer.step_count == 0 and not trainer.history:
            trainer.history.append({"step": 0, **trainer.validation()})
        while trainer.step_count < tcfg.steps:
            row = trainer.train_step()
            row["step"] = trainer.step_count
            if trainer.step_count % tcfg.checkpoint_every == 0 or trainer.step_count == tcfg.steps:
                row.update(trainer.validation())
            trainer.history.append(row)
            bar.update(1)
            shown = {k: v for k, v in row.items() if k.startswith(("ess_", "nll_"))}
            bar.set_postfix_str(" ".join(f"{k} {v:.3g}" for k, v in list(shown.items())[:4]))
            if trainer.step_count % tcfg.checkpoint_every == 0:
                save(time.perf_counter() - start)
    finally:
        bar.close()
    save(time.perf_counter() - start)
    return out
