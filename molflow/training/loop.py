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
from ..flowmap import EMA, compose_consecutive, local_loss, score, semigroup_loss, warmup_cosine
from ..evaluation.structure import rmsd
from ..models.molecular import MapConfig
from ..seeding import random_seed
from ..systems import MolecularSystem, load_system
from ..units import kinetic_temperature
from ..checkpoint import load_checkpoint, save_checkpoint
from .data import FrameData
from .objective import OBJECTIVES, WhitenedInternalScore


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters (``molflow train --config file.yaml`` sets them; flags override)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    objective: str = "whitened_crps"  # "whitened_crps" | "torsion_crps" | "energy" | "mse" (training/objective.py)
    crps_weight: float = 1.0  # weight of the per-coordinate CRPS in "whitened_crps"
    torsion_weight: float = 0.0  # weight of the backbone-torsion CRPS in "whitened_crps" (objective.py)
    torsion_set: str = "phi_psi"  # which torsions it scores: "phi_psi" or "backbone" (MolecularSystem.backbone_torsions)
    input_noise_nm: float = 0.01  # std of Gaussian noise on the start positions of recorded jumps (issue #10)
    n_latent_samples: int = 2  # m, latent draws per item for the energy score
    tau_max_ps: float = 1.0
    curriculum_fraction: float = 0.5  # share of steps over which the longest jump grows to tau_max
    fraction_local: float = 0.4
    fraction_direct: float = 0.3
    fraction_semigroup: float = 0.3
    ema_decay: float = 0.995  # with warm-up: min(decay, (1+k)/(10+k)) at update k (flowmap.EMA)
    grad_clip: float = 1.0
    lr_min_factor: float = 0.05  # the cosine ends at lr * this; steps past the schedule keep it
    schedule_steps: int = 0  # steps the LR schedule and tau curriculum are planned over (0: --steps of
    # the first run; recorded, so --resume with more --steps extends the run instead of re-planning it)
    semigroup_gate: float = 1.25  # semigroup loss starts once the EMA teacher's local loss is within
    # this factor of the student's (running mean): a teacher that is not yet a trained map teaches nothing
    max_bad_steps: int = 5  # consecutive non-finite steps before the last good state is restored
    max_restores: int = 3  # restores (each halving the learning rate) before training stops with an error
    good_state_every: int = 50  # steps between in-memory snapshots of the last good state
    checkpoint_every: int = 500
    validate_every: int = 250
    validation_items: int = 32
    verdict_replicas: int = 16  # free-running rollouts for the end-of-training verdict (0: none)
    verdict_jumps: int = 20  # jumps of tau_max each
    finish_steps: int = 20  # the physical finish recommended to samplers of this map (molflow.finish; 0: none)
    finish_friction_per_ps: float = 300.0
    init_from: str = ""  # fine-tuning: the checkpoint whose model and EMA weights this run started from
    train_only: str = ""  # "torsion_drive": optimise only the map's torsion drive, every other weight
    # frozen (a drive fine-tuned on a trained map; molflow.models.torsion_drive). "": all weights
    drive_cache_items: int = 0  # > 0 (with train_only: torsion_drive): fit the drive on this many cached
    # items of the frozen map (molflow.training.drive_fit) instead of the step loop; steps, batch_size, lr,
    # lr_min_factor, input_noise_nm and validation_items then apply to that fit
    drive_cache_draws: int = 4  # latent draws per cached item (the samples of its score)
    drive_tau_max_share: float = 0.5  # share of cached items jumping tau_max (the rest: log-uniform lengths)
    landscape_ibi_iterations: int = 0  # > 0 (maps with a torsion-drive landscape): after training, refine the
    # landscape by iterative Boltzmann inversion against the training data's phi/psi marginals
    # (molflow.training.landscape_ibi), with free-running rollouts of the EMA map at tau_max
    landscape_ibi_replicas: int = 32
    landscape_ibi_jumps: int = 800
    landscape_ibi_damping: float = 0.7
    landscape_ibi_damping_decay: float = 0.7
    landscape_ibi_skip_ps: float = 20.0  # each training run's first ps left out of the target marginals
    landscape_ibi_frames: int = 400000  # at most this many training frames make the target

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {f.name for f in dataclasses.fields(MapConfig)}
        if unknown:
            raise InputError(f"unknown training setting(s) {sorted(unknown)}")
        if "objective" in d and d["objective"] not in OBJECTIVES:
            raise InputError(f"unknown objective {d['objective']!r}: choose one of {', '.join(OBJECTIVES)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def planned_steps(self) -> int:
        """Steps the LR schedule and the curriculum are planned over."""
        return int(self.schedule_steps or self.steps)


def _features(x, v, x_ref, tau, v_th):
    """Normalised (x, v) on which scoring rules take their norm: displacement / (v_th tau), v / v_th."""
    scale = (v_th[None, :, None] * tau[:, None, None].clamp_min(1e-3))
    return torch.cat([((x - x_ref) / scale).flatten(1), (v / v_th[None, :, None]).flatten(1)], 1)




def torsion_step_spread(x0: torch.Tensor, xt: torch.Tensor, x1: torch.Tensor, system: MolecularSystem,
                         key: str) -> dict[str, float]:
    """How wide the map's one-jump change of the backbone torsions is against the recorded one: std over
    the items of the wrapped change phi(x_t) - phi(x_0), sampled / recorded (likewise psi). Near 1 for a
    map whose slow conditional law has the right spread; measured 0.18 for psi at 0.5 ps on the first tau_max
    0.5 ps map, which then drifted out of alpha_R when free-running (README, issue 17)."""
    from ..evaluation.dihedrals import phi_psi
    from ..evaluation.metrics import wrap_angle

    a0, at, a1 = (phi_psi(a.detach().cpu().numpy().astype(np.float64), system) for a in (x0, xt, x1))
    return {f"val_{name}_step_std_ratio_{key}":
            float(wrap_angle(at[i] - a0[i]).std() / max(float(wrap_angle(a1[i] - a0[i]).std()), 1e-9))
            for i, name in enumerate(("phi", "psi"))}


class Trainer:
    """Holds model, EMA teacher, optimiser, data and RNG state; steps and checkpoints."""

    def __init__(self, system: MolecularSystem, data: FrameData, config: TrainConfig, map_config: MapConfig,
                 device: torch.device, seed: int):
        from ..models.molecular import build_model

        self.system, self.data, self.config, self.map_config = system, data, config, map_config
        self.device, self.seed = device, seed
        torch.manual_seed(seed)
        self.model = build_model(system, map_config).to(device)
        if config.train_only not in ("", "torsion_drive"):
            raise InputError(f"train_only must be '' or 'torsion_drive', not {config.train_only!r}")
        if config.landscape_ibi_iterations and not self.map_config.torsion_drive_landscape:
            raise InputError("landscape_ibi_iterations needs a torsion drive with a landscape (torsion_drive_landscape > 0)")
        if config.drive_cache_items and config.train_only != "torsion_drive":
            raise InputError("drive_cache_items needs train_only: torsion_drive (it fits a drive on a frozen map)")
        if config.train_only:
            if self.model.drive is None:
                raise InputError("train_only: torsion_drive needs a map with a torsion drive (torsion_drive > 0)")
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("drive."))
        data.read_forces = self.model.needs_forces  # a torsion drive's input: the recorded start forces
        self.teacher = EMA(self.model, decay=config.ema_decay, warmup=True)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
                                     weight_decay=config.weight_decay)
        self.lr_scale = 1.0  # halved by every restore of the last good state
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.step = 0
        self.history: list[dict[str, float]] = []
        # health: skipped (non-finite) steps, restores of the last good state, teacher items excluded
        self.counts = {"skipped_steps": 0, "restores": 0, "teacher_excluded": 0}
        self.bad_run = 0  # consecutive skipped steps
        self.semigroup_on = False  # opened by the teacher-quality gate (TrainConfig.semigroup_gate)
        self.local_running: float | None = None  # running mean of the student's local loss
        self.good_state: dict[str, Any] | None = None
        self.landscape_ibi: dict[str, Any] | None = None  # the record of refine_landscape, once it ran
        self.bonds_t = torch.as_tensor(np.asarray(system.bonds, dtype=np.int64).reshape(-1, 2), device=device)
        self.sample_finish = ({"n_steps": config.finish_steps, "friction_per_ps": config.finish_friction_per_ps}
                              if config.finish_steps else None)
        self.agree = lambda flag: flag  # DDP replaces it by an all-rank AND (molflow.training.distributed)
        self.k_tau_max = max(1, min(int(round(config.tau_max_ps / data.h0_ps)), data.max_jump()))
        self.scorer = None
        if config.objective in ("whitened_crps", "torsion_crps"):  # spreads from (at most 20000) training frames
            x = data.training_positions(20000)
            only = config.objective == "torsion_crps"
            quads = (system.backbone_torsions(config.torsion_set) if config.torsion_weight or only
                     else np.zeros((0, 4), dtype=np.int64))
            self.scorer = WhitenedInternalScore(system.bonds, x, config.crps_weight, quads, config.torsion_weight, only)

    @property
    def ema(self) -> torch.nn.Module:
        """The EMA teacher's network (what checkpoints keep as ``ema`` and sampling uses)."""
        return self.teacher.model

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, cosine decay to ``lr_min_factor`` over the planned steps, then constant;
        times ``lr_scale`` (halved by every restore)."""
        return self.lr_scale * warmup_cosine(step, self.config.planned_steps, self.config.lr_min_factor)

    # ------------------------------------------------------------------ jumps
    def k_max(self) -> int:
        """Longest jump (frames) allowed now by the curriculum."""
        grow = max(1, int(self.config.curriculum_fraction * self.config.planned_steps))
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
        return self.randn(B, self.model.n_latent_vectors, self.system.n_atoms, 3)

    def _as_state_map(self, model: torch.nn.Module):
        """The molecular map as the generic SSFM losses (molflow.flowmap) see a map: a state z = (x, v)
        stacked (B, 2, A, 3), called as f(z, L, eps, tau)."""
        def f(z, L, eps, tau):  # a third slot of z, when present, holds the forces at x (torsion drive)
            x, v = model(z[:, 0], z[:, 1], L, eps, tau, *([z[:, 2]] if z.shape[1] > 2 else []))
            return torch.stack([x, v], 1)
        return f

    def _item_score(self, samples: torch.Tensor, z_t: torch.Tensor, z_s: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Per-item score (B,) of m sampled end states (m, B, 2, A, 3) against the target (B, 2, A, 3),
        on features relative to the start: displacement / (v_th tau) and v / v_th."""
        m, B = samples.shape[:2]
        v_th = self.model.v_th
        flat = samples.reshape(m * B, *samples.shape[2:])
        rep = lambda t: t.repeat(m, *([1] * (t.dim() - 1)))  # noqa: E731
        pred = _features(flat[:, 0], flat[:, 1], rep(z_s[:, 0]), rep(tau), v_th).view(m, B, -1)
        target = _features(z_t[:, 0], z_t[:, 1], z_s[:, 0], tau, v_th)
        if self.scorer is not None:  # whitened internal coordinates + per-coordinate CRPS
            return self.scorer(pred, target, samples[:, :, 0], z_t[:, 0])
        # the generic scoring rule; / sqrt(D) keeps it O(1) per degree of freedom
        return score(pred, target, self.config.objective) / math.sqrt(pred.shape[-1])

    def _loss_settings(self) -> dict[str, Any]:
        c = self.config
        return dict(latent_fn=lambda n, _g=None: self._latent(n), objective=c.objective,
                    n_latent=c.n_latent_samples if c.objective != "mse" else 1, tau_power=0.0,
                    item_score=self._item_score)

    def _jump_loss(self, b: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Local/direct loss on recorded jumps (the target is the recorded end state):
        :func:`molflow.flowmap.local_loss` on the molecular state."""
        model = self.model if model is None else model
        # the forces are the recorded ones at the unjittered start (_perturb); only the torsion drive's
        # torque reads them, and bonds and angles, the terms 0.003 nm changes most, do not enter it
        start = [b["x0"], b["v0"], b["f0"]] if self.model.needs_forces else [b["x0"], b["v0"]]
        z_s, z_t = torch.stack(start, 1), torch.stack([b["x1"], b["v1"]], 1)
        return local_loss(self._as_state_map(model), z_s, z_t, b["L"], b["tau"], **self._loss_settings())[0]

    def _broken(self, x: torch.Tensor, v: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
        """Per item (B,): non-finite, or a bond outside the sampler's guard relative to ``x_ref``."""
        from ..sampling import BOND_RANGE

        b = self.bonds_t
        finite = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(v).flatten(1).all(1)
        if not len(b):
            return ~finite
        ratio = ((x[:, b[:, 0]] - x[:, b[:, 1]]).norm(dim=-1)
                 / (x_ref[:, b[:, 0]] - x_ref[:, b[:, 1]]).norm(dim=-1).clamp_min(1e-9))
        ok = ((ratio > BOND_RANGE[0]) & (ratio < BOND_RANGE[1])).all(1)
        return ~(finite & torch.nan_to_num(ok.float(), 0.0).bool())

    def _semigroup_loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Self-distillation (:func:`molflow.flowmap.semigroup_loss`) on the recorded path of 2k
        intervals: teacher = two EMA half-jumps fed the recorded half-path coefficients (a true sample
        of the halves given the whole), student = one jump with the composed coefficients. Teacher
        outputs that are non-finite or break a bond beyond the sampler's guard are left out and
        counted. Features are normalised by tau (displacement / (v_th tau)), which plays the role of
        the 1/tau scale of DESIGN.md section 3.2: scores are O(1) at every jump length."""
        L1, L2 = b["L_halves"]
        L = compose_consecutive(torch.stack([L1, L2], 1))  # the whole path's coefficients, exactly

        def recorded_halves(L_, tau, _g=None):
            return L1, tau / 2, L2, tau / 2

        def broken(z_s, z_mid, z_end):
            return self._broken(z_mid[:, 0], z_mid[:, 1], z_s[:, 0]) | self._broken(z_end[:, 0], z_end[:, 1], z_s[:, 0])

        z_s = torch.stack([b["x0"], b["v0"]], 1)
        loss, diag = semigroup_loss(self._as_state_map(self.model), self._as_state_map(self.ema), z_s, L, b["tau"],
                                    split_fn=recorded_halves, broken=broken, **self._loss_settings())
        self.counts["teacher_excluded"] += diag["teacher_excluded"]
        return loss

    def _semigroup_gate(self, local: dict[str, torch.Tensor], student_local: float) -> bool:
        """Open the semigroup loss once the EMA teacher is a trained map: its local loss on this
        step's local batch within ``semigroup_gate`` x the student's running local loss. Checked
        every 10 steps until it opens; it stays open (a restore after a bad semigroup step shuts it)."""
        if self.semigroup_on:
            return True
        if math.isfinite(student_local):
            r = self.local_running
            self.local_running = student_local if r is None else 0.9 * r + 0.1 * student_local
        if self.step < 20 or self.step % 10 or self.local_running is None:
            return False
        with torch.no_grad():
            teacher_local = float(self._jump_loss(local, model=self.ema))
        ok = math.isfinite(teacher_local) and teacher_local <= self.config.semigroup_gate * self.local_running
        self.semigroup_on = bool(self.agree(ok))
        return self.semigroup_on

    def train_step(self) -> dict[str, float]:
        """One optimiser step; a step whose loss or gradient is not finite is skipped and counted,
        and repeated bad steps restore the last good state (``_on_bad_step``)."""
        c, d = self.config, self.data
        self.model.train()
        B = c.batch_size
        n_loc = max(1, int(round(c.fraction_local * B)))
        n_dir = int(round(c.fraction_direct * B))
        n_sg = int(round(c.fraction_semigroup * B))
        kmax = self.k_max()
        losses = {}
        total = 0.0
        local = self._perturb(d.batch(n_loc, 1, self.rng, device=self.device))
        losses["local"] = self._jump_loss(local)
        total = total + c.fraction_local * losses["local"]
        if n_dir and kmax >= 2:
            k = self._draw_k(2, kmax)
            losses["direct"] = self._jump_loss(self._perturb(d.batch(n_dir, k, self.rng, device=self.device)))
            total = total + c.fraction_direct * losses["direct"]
        # a map that needs forces (torsion drive) has none at the composed jump's midpoint: no semigroup term
        if n_sg and kmax >= 2 and not self.model.needs_forces and self._semigroup_gate(local, float(losses["local"].detach())):
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
        # the gradient norm is the same on every DDP rank (after the all-reduce): one decision for all
        skipped = not bool(torch.isfinite(gnorm))
        if not skipped:
            self.opt.step()
            skipped = not self._weights_finite()
            if skipped:  # a finite gradient that still broke the weights: undo at once
                self._restore("weights became non-finite after the update", force=True)
        if skipped:
            self._on_bad_step(losses)
        else:
            self.bad_run = 0
            self.teacher.update(self.model)
            if self.good_state is None or self.step % c.good_state_every == 0:
                self._snapshot()
        self.sched.step()
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out.update(loss=float(total.detach()), grad_norm=float(gnorm), tau_max_ps=kmax * d.h0_ps,
                   lr=self.sched.get_last_lr()[0], skipped=int(skipped), semigroup_on=int(self.semigroup_on),
                   **{k: int(v) for k, v in self.counts.items()})
        return out

    # ------------------------------------------------------------------ health
    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def _snapshot(self) -> None:
        """Keep the current (finite) model, teacher and optimiser in memory as the last good state."""
        self.good_state = copy.deepcopy({"model": self.model.state_dict(), "teacher": self.teacher.state_dict(),
                                         "optimizer": self.opt.state_dict(), "step": self.step})

    def _on_bad_step(self, losses: dict[str, torch.Tensor]) -> None:
        self.counts["skipped_steps"] += 1
        self.bad_run += 1
        self.opt.zero_grad(set_to_none=True)
        if self.bad_run >= self.config.max_bad_steps:
            bad = [k for k, v in losses.items() if not bool(torch.isfinite(v))]
            what = (f"the {' and '.join(bad)} loss was non-finite" if bad
                    else "the loss was finite but its gradient was not")
            self._restore(f"{self.bad_run} steps in a row were skipped ({what}, last at step {self.step + 1})",
                          shut_semigroup="semigroup" in bad)

    def _restore(self, why: str, force: bool = False, shut_semigroup: bool = False) -> None:
        """Go back to the last good state and halve the learning rate; past ``max_restores`` stop
        with a TrainingError naming the cause (nothing non-finite is ever checkpointed)."""
        from ..errors import TrainingError

        self.counts["restores"] += 1
        if self.good_state is None or self.counts["restores"] > self.config.max_restores:
            raise TrainingError(
                f"training stopped at step {self.step + 1}: {why}; restoring the last good state "
                f"(step {self.good_state['step'] if self.good_state else '-'}) and halving the learning rate "
                f"{self.counts['restores'] - 1} time(s) did not cure it. The last checkpoint on disk is "
                "finite. Try a lower --config lr, a shorter --tau-max-ps, or check the training data "
                "(molflow info)")
        g = self.good_state
        self.model.load_state_dict(g["model"])
        self.teacher.load_state_dict(g["teacher"])
        self.opt.load_state_dict(g["optimizer"])
        self.lr_scale *= 0.5
        self.bad_run = 0
        if shut_semigroup:
            self.semigroup_on = False
        print(f"molflow train: {why}; restored the state of step {g['step']} and halved the learning rate "
              f"(restore {self.counts['restores']} of at most {self.config.max_restores})", file=sys.stderr)

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
                xt, vt = fm.jump(b["x0"], b["v0"], b["L"], k * self.data.h0_ps, mode=mode, generator=gen, n_mean=8,
                                 forces=b.get("f0"))
                out[f"val_rmsd_{mode}_{key}_nm"] = float(np.sqrt(np.mean(
                    rmsd(xt[:, heavy].cpu().numpy(), b["x1"][:, heavy].cpu().numpy()) ** 2)))
                if mode == "sample":
                    out[f"val_kinetic_temperature_{key}_K"] = float(kinetic_temperature(vt, masses).mean())
                    # spread of each bond length over the held-out items, sampled / recorded (mean over bonds)
                    bl = lambda x: (x[:, bonds[:, 0]] - x[:, bonds[:, 1]]).norm(dim=-1).std(0)  # noqa: E731
                    out[f"val_bond_std_ratio_{key}"] = float((bl(xt) / bl(b["x1"]).clamp_min(1e-9)).mean())
                    out.update(torsion_step_spread(b["x0"], xt, b["x1"], self.system, key))
        return out

    def _ema_flowmap(self):
        """A sampler (molflow.sampling.FlowMap, CPU float32) of a copy of the EMA map, with its finish."""
        from ..sampling import FlowMap

        return FlowMap(copy.deepcopy(self.ema).cpu().float(), self.system, self.data.h0_ps,
                       {"train_config": dataclasses.asdict(self.config), "sample_finish": self.sample_finish})

    def _tau_max_jump_ps(self) -> float:
        """tau_max rounded to a whole number (>= 1) of the data's frame interval, ps."""
        return max(1, int(round(self.config.tau_max_ps / self.data.h0_ps))) * self.data.h0_ps

    @torch.no_grad()
    def verdict(self) -> dict[str, Any]:
        """Free-running rollouts of the EMA map from held-out states at tau_max (molflow.sampling's
        guards, the map's recommended finish): stable or not, bond spread vs the held-out data,
        kinetic temperature — with a one-line ``line``."""
        from ..sampling import rollout_verdict

        c = self.config
        fm = self._ema_flowmap()
        rng = np.random.default_rng(2024)
        ref = self.data.batch(256, 1, rng, split="val")
        b = np.asarray(self.system.bonds, dtype=int).reshape(-1, 2)
        x = ref["x1"].double().numpy()
        ref_std = np.linalg.norm(x[:, b[:, 0]] - x[:, b[:, 1]], axis=-1).std(0)
        n = c.verdict_replicas
        starts = self.data.batch(n, 1, rng, split="val")
        return rollout_verdict(fm, starts["x0"].double().numpy(), starts["v0"].double().numpy(),
                               self._tau_max_jump_ps(), c.verdict_jumps, ref_std, seed=self.seed)

    def refine_landscape(self, progress: bool) -> dict[str, Any]:
        """Refine the EMA map's torsion-drive landscape (config ``landscape_ibi_*``;
        :mod:`molflow.training.landscape_ibi`) and copy it into the trained model; returns the record."""
        from .landscape_ibi import LandscapeIBIConfig, refine_landscape

        c = self.config
        t0 = time.perf_counter()
        fm = self._ema_flowmap()
        cfg = LandscapeIBIConfig(iterations=c.landscape_ibi_iterations, replicas=c.landscape_ibi_replicas,
                                 jumps=c.landscape_ibi_jumps, tau_ps=self._tau_max_jump_ps(), damping=c.landscape_ibi_damping,
                                 damping_decay=c.landscape_ibi_damping_decay, seed=self.seed)
        target = self.data.training_positions(c.landscape_ibi_frames, skip_ps=c.landscape_ibi_skip_ps)
        starts = self.data.batch(cfg.replicas, 1, np.random.default_rng(self.seed), split="val")
        records = refine_landscape(fm, target, (starts["x0"].double().numpy(), starts["v0"].double().numpy()), cfg,
                                   progress=progress)
        with torch.no_grad():
            for name in ("landscape", "landscape_pair"):
                if hasattr(fm.model.drive, name):
                    table = getattr(fm.model.drive, name).detach()
                    for net in (self.model, self.ema):
                        getattr(net.drive, name).copy_(table.to(getattr(net.drive, name)))
        return {"config": dataclasses.asdict(cfg), "target_frames": int(len(target)), "records": records,
                "wall_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        s = self.system
        return {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "ema_updates": self.teacher.n_updates, "lr_scale": self.lr_scale,
            "health_json": {**self.counts, "semigroup_on": self.semigroup_on, "local_running": self.local_running},
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
            "sample_finish_json": self.sample_finish,
            "landscape_ibi_json": self.landscape_ibi,
        }

    def load_state(self, ck: dict[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.teacher.n_updates = int(ck.get("ema_updates", ck["step"]))
        self.lr_scale = float(ck.get("lr_scale", 1.0))
        health = dict(ck.get("health_json") or {})
        self.semigroup_on = bool(health.pop("semigroup_on", True))
        self.local_running = health.pop("local_running", None)
        self.counts.update({k: int(v) for k, v in health.items() if k in self.counts})
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step = int(ck["step"])
        self.gen.set_state(ck["torch_rng"])
        torch.set_rng_state(ck["cpu_rng"])
        self.rng.bit_generator.state = ck["numpy_rng_json"]
        self.history = list(ck["history_json"])
        self.landscape_ibi = ck.get("landscape_ibi_json")


def train(system: str | MolecularSystem, data: Sequence[str] | str, out: str | os.PathLike,
          tau_max_ps: float = 1.0, n_coefficients: int | None = 3, steps: int | None = None,
          device: str = "auto", seed: int | None = None, resume: bool = False, overwrite: bool = False,
          config: TrainConfig | dict | None = None, progress: bool = True, devices: int = 1,
          init_from: str | os.PathLike | None = None, **map_settings: Any) -> Path:
    """Train a flow map on reference runs; writes the checkpoint ``out`` and ``out``.metrics.csv.

    ``init_from``: fine-tune — start from that checkpoint's model and EMA-teacher weights (and its
    architecture) with a fresh optimiser and this run's schedule and settings (e.g. another
    objective weight); the system must be the same.

    An existing ``out`` is refused unless ``resume=True`` (continue it: the same LR schedule and
    curriculum; a larger ``steps`` extends the run past its planned schedule at the final LR) or
    ``overwrite=True``. Steps whose loss or gradient is not finite are skipped and counted; repeated
    ones restore the last good state with half the learning rate; a run that cannot recover raises
    :class:`~molflow.errors.TrainingError`. No checkpoint with non-finite weights is ever written.
    At the end, short free-running rollouts of the map give a one-line verdict (stored in the
    checkpoint as ``verdict_json``, shown by ``molflow info``).

    ``devices`` > 1: data-parallel training in that many processes (DDP, one per GPU on CUDA, gloo
    processes on CPU; :mod:`molflow.training.distributed`) with the same global batch. Launched by
    torchrun (``RANK``/``WORLD_SIZE`` set), the launcher's processes are the ranks.
    """
    from ..devices import resolve_device
    from . import distributed

    out = Path(out)
    n = 1 if devices is None else int(devices)
    dev = resolve_device(device)
    launched = distributed.torchrun_world()
    if out.exists() and not (resume or overwrite):
        raise InputError(f"{out} exists: pass --resume to continue that training run or --overwrite to replace it")
    if init_from is not None and not Path(init_from).is_file():
        raise InputError(f"--init-from {init_from}: no such checkpoint")
    args = dict(system=system, data=data, out=out, tau_max_ps=tau_max_ps, n_coefficients=n_coefficients,
                steps=steps, seed=seed, resume=resume, config=config, progress=progress, map_settings=map_settings,
                init_from=init_from)
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


#: model size and batch when the user sets none, per device kind. On CPU (2 cores, one thread per
#: process; measured, DESIGN.md 3.4 and issue 17): PaiNN 32 features / 2 layers trains at 13 steps/s
#: with batch 16 (210 items/s) and ~8-19 steps/s with batch 32 (250-600 items/s, semigroup loss on /
#: off), 64 / 3 at 7 steps/s (110 items/s), and at equal CPU time 64 / 3 was no better (energy +439 vs
#: +90 kJ/mol at tau = 0.2 ps after 14 vs 8 CPU-minutes). GPUs keep MapConfig's and TrainConfig's
#: defaults (64 / 3, batch 16).
MACHINE_DEFAULTS = {"cpu": {"n_features": 32, "n_layers": 2, "batch_size": 32}, "cuda": {}}


def machine_defaults(device: torch.device | str) -> dict[str, Any]:
    """The size settings :data:`MACHINE_DEFAULTS` gives ``device`` when the user sets none."""
    return dict(MACHINE_DEFAULTS.get(torch.device(device).type, {}))


def _train(ctx, system, data, out: Path, tau_max_ps, n_coefficients, steps, device: torch.device, seed,
           resume: bool, config, progress: bool, map_settings: dict[str, Any], init_from=None) -> Path:
    """The training run of one process; ``ctx`` (a distributed.Context) or None for a single one."""
    from tqdm.auto import tqdm

    from . import distributed

    main = ctx is None or ctx.is_main
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    given = {**(config if isinstance(config, dict) else {}), **map_settings}
    machine = {k: v for k, v in machine_defaults(device).items()
               if k not in given and not (k == "batch_size" and isinstance(config, TrainConfig))}
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(
        {**dict(config or {}), **{k: v for k, v in machine.items() if k == "batch_size"}})
    map_cfg = MapConfig(**{k: v for k, v in {**machine, **given}.items()
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
        old = TrainConfig.from_dict(ck["train_config_json"])
        # the schedule stays the one the run was planned with (older checkpoints: their steps)
        cfg = dataclasses.replace(old, steps=cfg.steps, schedule_steps=old.planned_steps)
        map_cfg = MapConfig.from_dict(ck["map_config_json"])
        trainer = Trainer(mol, frames, cfg, map_cfg, dev, int(ck["seed"]))
        trainer.load_state(ck)
    else:  # a fresh run replaces an existing --out (pass resume=True to continue it)
        seed = random_seed() if seed is None else int(seed)
        if ctx is not None:  # under torchrun each rank may have drawn its own: rank 0's wins
            seed = ctx.broadcast_object(seed)
        cfg = dataclasses.replace(cfg, schedule_steps=cfg.planned_steps)
        base = None
        if init_from is not None:  # fine-tuning: the architecture and weights of that checkpoint
            base = load_checkpoint(init_from, map_location=dev)
            if base["system_json"]["fingerprint"] != mol.fingerprint:
                raise InputError(f"cannot fine-tune {init_from}: it was trained for another system "
                                 f"({base['system_json']['name']!r})")
            base_cfg = MapConfig.from_dict(base["map_config_json"])
            # the checkpoint's architecture; a torsion drive may be added to a map that has none
            added = int(given.get("torsion_drive", 0)) if not base_cfg.torsion_drive else 0
            map_cfg = dataclasses.replace(base_cfg, torsion_drive=added or base_cfg.torsion_drive)
            if added:  # and the added drive's law
                map_cfg = dataclasses.replace(map_cfg, torsion_drive_bins=int(given.get("torsion_drive_bins", 0)),
                                              torsion_drive_landscape=int(given.get("torsion_drive_landscape", 0)),
                                              torsion_drive_landscape_pair=int(given.get("torsion_drive_landscape_pair", 0)))
            if map_cfg.n_coefficients != frames.n_coefficients:
                raise InputError(f"{init_from} takes N = {map_cfg.n_coefficients} path coefficients, "
                                 f"the data give {frames.n_coefficients}")
            cfg = dataclasses.replace(cfg, init_from=str(init_from))
        trainer = Trainer(mol, frames, cfg, map_cfg, dev, seed)
        if base is not None:
            strict = map_cfg.torsion_drive == base_cfg.torsion_drive  # an added drive starts as the identity
            for net, key in ((trainer.model, "model"), (trainer.ema, "ema")):
                missing, unexpected = net.load_state_dict(base[key], strict=strict)
                if unexpected or any(not k.startswith("drive.") for k in missing):
                    raise InputError(f"{init_from}: weights do not fit the map (missing {missing}, unexpected {unexpected})")
            trainer.teacher.n_updates = int(base.get("ema_updates", base["step"]))  # a trained teacher
            trainer.semigroup_on = (bool((base.get("health_json") or {}).get("semigroup_on", True))
                                    and not trainer.model.needs_forces)  # such a map has no semigroup term
    shards = distributed.distribute(trainer, ctx) if ctx is not None else None
    if progress and main:
        n_par = sum(p.numel() for p in trainer.model.parameters())
        ranks = f" processes={ctx.world}" if ctx is not None else ""
        print(f"molflow train: system={mol.name} seed={trainer.seed} device={dev}{ranks} params={n_par} "
              f"features={trainer.map_config.n_features} layers={trainer.map_config.n_layers} "
              f"batch={cfg.batch_size}{' (defaults for this device)' if machine and not resume else ''} "
              f"h0={frames.h0_ps * 1000:g} fs tau_max={cfg.tau_max_ps} ps N={frames.n_coefficients}", file=sys.stderr)
    log_path = out.with_name(out.name + ".metrics.csv")
    if cfg.drive_cache_items:
        if ctx is not None:
            raise InputError("a cached drive fit (drive_cache_items) runs in one process: leave --devices at 1")
        if trainer.step < cfg.steps:
            _fit_drive_cached(trainer, out, progress)
            save_checkpoint(out, trainer.state())
            _write_log(log_path, trainer.history)
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
            bar.set_postfix_str(f"loss {row['loss']:.3f} tau<={row['tau_max_ps']:.2f}ps"
                                + (" semigroup" if row["semigroup_on"] else "")
                                + (f" skipped {row['skipped_steps']}" if row["skipped_steps"] else ""))
            if main and (trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps):
                save_checkpoint(out, trainer.state())
                _write_log(log_path, trainer.history)
        bar.close()
        if main and trainer.step == cfg.steps and not out.exists():
            save_checkpoint(out, trainer.state())
        if main and cfg.landscape_ibi_iterations > 0 and trainer.landscape_ibi is None:
            trainer.landscape_ibi = trainer.refine_landscape(progress)
            save_checkpoint(out, trainer.state())
            if progress:
                from .landscape_ibi import records_summary

                print(f"molflow train: landscape refined: {records_summary(trainer.landscape_ibi['records'])}",
                      file=sys.stderr)
        if main and cfg.verdict_replicas > 0:
            verdict = trainer.verdict()
            state = trainer.state()
            state["verdict_json"] = verdict
            save_checkpoint(out, state)
            if progress:
                print(f"molflow train: {verdict['line']}", file=sys.stderr)
        if ctx is not None:
            ctx.barrier()  # every rank returns once the checkpoint is on disk
    finally:
        if ctx is not None:
            distributed.undistribute(trainer)
    return out


def _fit_drive_cached(trainer: "Trainer", out: Path, progress: bool) -> None:
    """Fit the torsion drive of ``trainer.model`` on cached items of its frozen map
    (:mod:`molflow.training.drive_fit`); the cache is kept beside ``out`` until the fit is done, so an
    interrupted fit resumes without re-running the network; the EMA copy gets the fitted drive."""
    from .drive_fit import DriveFitConfig, build_cache, fit_drive
    from .objective import circular_std
    from ..models.torsion_drive import dihedral_and_gradient

    c, model = trainer.config, trainer.model
    fc = DriveFitConfig(items=c.drive_cache_items, validation_items=c.validation_items, draws=c.drive_cache_draws,
                        tau_max_share=c.drive_tau_max_share, steps=c.steps, batch_items=c.batch_size, lr=c.lr,
                        lr_min_factor=c.lr_min_factor, input_noise_nm=c.input_noise_nm,
                        crps_weight=c.torsion_weight or 1.0, seed=trainer.seed)
    cached = ("items", "validation_items", "draws", "tau_max_share", "input_noise_nm", "chunk_items", "seed")
    key = {**{k: v for k, v in fc.to_dict().items() if k in cached}, "tau_max_ps": c.tau_max_ps,
           "h0_ps": trainer.data.h0_ps, "init_from": c.init_from, "data": [str(p) for p in trainer.data.paths]}
    cache_path = out.with_name(out.name + ".drive_cache.pt")
    caches = None
    if cache_path.exists():
        stored = torch.load(cache_path, weights_only=True)
        if stored.get("key") == json.dumps(key, sort_keys=True):
            caches = stored["train"], stored["val"]
    if caches is None:
        model.eval()
        caches = (build_cache(model, trainer.data, fc, c.tau_max_ps, "train", progress=progress),
                  build_cache(model, trainer.data, fc, c.tau_max_ps, "val", n_items=fc.validation_items,
                              progress=progress))
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        torch.save({"key": json.dumps(key, sort_keys=True), "train": caches[0], "val": caches[1]}, tmp)
        os.replace(tmp, cache_path)
    x = torch.as_tensor(trainer.data.training_positions(20000), dtype=torch.float64)
    spread = circular_std(dihedral_and_gradient(x, model.drive.quads.cpu())[0]).to(torch.float32)
    model.train()
    rows = fit_drive(model.drive, *caches, spread, fc, c.tau_max_ps, progress=progress)
    trainer.ema.drive.load_state_dict(model.drive.state_dict())
    trainer.history.extend(rows)
    trainer.step = c.steps
    cache_path.unlink()


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
