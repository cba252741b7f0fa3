"""Generic strong stochastic flow maps (SSFM): scoring rules, losses, EMA, curriculum, a toy map.

Model-agnostic (DESIGN.md §3): any ``nn.Module`` called as ``model(z, L, eps, tau) -> z_next`` is
a flow map.  Conventions (all torch, one dtype/device per call):

* ``z``   state batch (B, *S) (toys: (B, d); molecules: e.g. (B, A, 6) or a dict-free packing);
* ``L``   path coefficients (B, N, *W), coefficient axis 1, in sqrt(time units)
          (L^(n) = ∫ P_n dW over the jump, n = 0..N-1; molecules: W = (A, 3));
* ``eps`` latent (B, *E), standard normal: the part of the path the coefficients do not describe;
* ``tau`` (B,) jump lengths [time units] (may differ per item).

``latent_fn(batch_size, generator) -> eps`` draws fresh latents; ``score_features(z) -> (B, D)``
maps states to the normalised vector whose norm the scoring rules take (default: flatten;
molecules pass whitened coordinates).

Losses (each returns ``(scalar loss, diagnostics dict of detached tensors)``):

* :func:`local_loss` — target = recorded frame z_t after a short jump (h0) with the recorded
  coefficients; :func:`direct_loss` is the same function used on long recorded jumps with composed
  coefficients (true samples of the conditional law);
* :func:`semigroup_loss` — self-distillation: split the coefficients of [s, s+τ] into halves by
  exact Gaussian conditioning, teacher (EMA copy, no grad) = two half-jumps with independent latents
  (one sample of the composed law), student = one full jump with m latents.

``objective="energy"``: energy score (strictly proper; m ≥ 2 latent draws per item) of the samples
against the target; ``"mse"``: squared error (learns the conditional mean, the strong estimate;
one latent draw by default — the network learns to ignore ε because the spread is penalised).
Every item's score is weighted by τ^(-tau_power) (DESIGN: 1/τ).

Modes of a trained map (:func:`predict`, :func:`rollout`): ``"sample"`` — one fresh ε per item
(exact-in-law rollouts); ``"mean"`` — ε averaged out: the average of ``n_mean`` outputs with
independent ε, a Monte Carlo estimate of E[T(z, L, ε) | z, L], which is the best pathwise
(squared-error) estimate for a map trained to the conditional law.  (ε = 0 is *not* used: it is the
mean only for maps affine in ε, and an MLP is not; an mse-trained map learns to ignore ε, so for it
the average is close to a single output.)  ``mean`` costs ``n_mean`` evaluations per jump.

Random numbers come from a ``torch.Generator`` where one is passed; draws are made on the
generator's device and moved to the data's device, so a CPU generator also drives GPU training.

Time units are those of the SDE (ps for molecules, arbitrary for the toys).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import brownian as _B

__all__ = [
    "flatten_features",
    "scaled_features",
    "linear_features",
    "energy_score",
    "crps_per_coordinate",
    "variogram_score",
    "mse",
    "score",
    "local_loss",
    "direct_loss",
    "semigroup_loss",
    "continuous_half_split",
    "DiscreteHalfSplit",
    "sample_coefficients_torch",
    "compose_consecutive",
    "EMA",
    "curriculum_tau_max",
    "log_uniform_tau",
    "SSFMConfig",
    "TrajectoryDataSampler",
    "train_ssfm",
    "predict",
    "rollout",
    "gaussian_latent",
    "ToyFlowMap",
    "ComposedFlowMap",
]

_NORM_EPS = 1e-12  # added under square roots: keeps gradients finite where two samples coincide
# (a bias of at most 1e-6 in feature units: features are meant to be O(1), i.e. normalised)


def _gen_device(generator, device):
    return generator.device if generator is not None else device


def _randn(shape, generator, dtype, device) -> torch.Tensor:
    """Standard normals drawn on the generator's device (if any), returned on ``device``."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=_gen_device(generator, device)).to(device)


# ----------------------------------------------------------------------------------------------
# Features and scoring rules
# ----------------------------------------------------------------------------------------------
def flatten_features(z: torch.Tensor) -> torch.Tensor:
    """Default ``score_features``: (B, *S) -> (B, D)."""
    return z.reshape(z.shape[0], -1)


def scaled_features(scale, shift=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``score_features`` that whitens per coordinate: (flatten(z) - shift) / scale."""
    scale = torch.as_tensor(scale)
    shift = None if shift is None else torch.as_tensor(shift)

    def features(z):
        f = z.reshape(z.shape[0], -1)
        if shift is not None:
            f = f - shift.to(f)
        return f / scale.to(f)

    return features


def linear_features(matrix=None, scale=None, shift=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``score_features`` of a whitening linear map: ((flatten(z) - shift) @ matrix) / scale.

    ``matrix`` (D, D') e.g. the map to normal-mode coordinates (toy: block-diag(R, R), so that
    q = Rᵀx per row), ``scale`` (D',) each output coordinate's thermal spread (toy: kT/ω² and the
    well's variance, square-rooted; velocities sqrt(kT)).  Any of them may be None (identity).
    An invertible linear map keeps every scoring rule (strictly) proper: it only changes the norm.
    """
    matrix = None if matrix is None else torch.as_tensor(matrix)
    scale = None if scale is None else torch.as_tensor(scale)
    shift = None if shift is None else torch.as_tensor(shift)

    def features(z):
        f = z.reshape(z.shape[0], -1)
        if shift is not None:
            f = f - shift.to(f)
        if matrix is not None:
            f = f @ matrix.to(f)
        if scale is not None:
            f = f / scale.to(f)
        return f

    return features


def _pow_norm(diff: torch.Tensor, beta: float) -> torch.Tensor:
    """‖diff‖^β over the last axis, with a finite gradient at 0."""
    sq = (diff * diff).sum(-1) + _NORM_EPS
    return sq.sqrt() if beta == 1.0 else sq.pow(0.5 * beta)


def _pow_abs(diff: torch.Tensor, beta: float) -> torch.Tensor:
    sq = diff * diff + _NORM_EPS
    return sq.sqrt() if beta == 1.0 else sq.pow(0.5 * beta)


def _check_samples(samples: torch.Tensor, target: torch.Tensor, need_two: bool) -> int:
    if samples.ndim != 3 or target.ndim != 2 or samples.shape[1:] != target.shape:
        raise ValueError(f"need samples (m, B, D) and target (B, D), got {tuple(samples.shape)}, {tuple(target.shape)}")
    m = samples.shape[0]
    if need_two and m < 2:
        raise ValueError("the energy score needs m >= 2 samples per item")
    return m


def energy_score(samples: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Energy score per item (B,) of m ≥ 2 samples (m, B, D) against one target draw (B, D).

        ES = (1/m) Σ_j ‖T_j − y‖^β − 1/(2m(m−1)) Σ_{j≠k} ‖T_j − T_k‖^β ,   0 < β < 2

    (unbiased for E‖T−y‖^β − ½E‖T−T'‖^β; strictly proper for β ∈ (0, 2)).  Units: those of the
    features to the power β.
    """
    m = _check_samples(samples, target, True)
    term1 = _pow_norm(samples - target.unsqueeze(0), beta).mean(0)
    j, k = torch.triu_indices(m, m, offset=1, device=samples.device)
    term2 = _pow_norm(samples[j] - samples[k], beta).sum(0) / (m * (m - 1))  # Σ_{j≠k}/(2m(m-1))
    return term1 - term2


def crps_per_coordinate(samples: torch.Tensor, target: torch.Tensor, beta: float = 1.0,
                        reduction: str = "mean") -> torch.Tensor:
    """1-D energy scores (CRPS for β = 1) per coordinate, summed or averaged over D -> (B,).

    The 'whitened + CRPS' candidate of DESIGN §3.3: each coordinate's own spread is scored, so a
    low-amplitude mode is not drowned by the joint norm.  ``reduction``: "mean" or "sum".
    """
    m = _check_samples(samples, target, True)
    term1 = _pow_abs(samples - target.unsqueeze(0), beta).mean(0)  # (B, D)
    j, k = torch.triu_indices(m, m, offset=1, device=samples.device)
    term2 = _pow_abs(samples[j] - samples[k], beta).sum(0) / (m * (m - 1))
    per = term1 - term2
    if reduction == "mean":
        return per.mean(-1)
    if reduction == "sum":
        return per.sum(-1)
    raise ValueError("reduction must be 'mean' or 'sum'")


def variogram_score(samples: torch.Tensor, target: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Variogram score of order p (Scheuerer & Hamill 2015), uniform weights, per item (B,).

        VS_p = mean_{i<j} ( |y_i − y_j|^p − E|X_i − X_j|^p )²

    over the D(D−1)/2 coordinate pairs, with the square of the expectation estimated without bias
    from the m ≥ 2 samples (a² − 2a·b̄ + Σ_{j≠k} b_j b_k / (m(m−1)), b_j = |X_{j,i} − X_{j,k}|^p),
    so the finite-m score has the expectation of the ideal one.  It sees the pairwise structure
    (every coordinate's spread relative to every other's) but is only *proper*, not strictly: it is
    blind to a common shift and to everything beyond the p-th absolute moment of the differences —
    use it beside the joint energy score (``score(..., variogram_weight=w)``), which keeps the sum
    strictly proper.  Units: features^(2p).
    """
    m = _check_samples(samples, target, True)
    d = samples.shape[-1]
    i, j = torch.triu_indices(d, d, offset=1, device=samples.device)
    a = _pow_abs(target[:, i] - target[:, j], p)  # (B, P)
    b = _pow_abs(samples[:, :, i] - samples[:, :, j], p)  # (m, B, P)
    bsum = b.sum(0)
    cross = (bsum * bsum - (b * b).sum(0)) / (m * (m - 1))  # unbiased for (E b)²
    return (a * a - 2.0 * a * bsum / m + cross).mean(-1)


def mse(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error ‖T_j − y‖² summed over D, averaged over the m ≥ 1 samples -> (B,)."""
    _check_samples(samples, target, False)
    return ((samples - target.unsqueeze(0)) ** 2).sum(-1).mean(0)


def score(samples_f: torch.Tensor, target_f: torch.Tensor, objective: str = "energy", beta: float = 1.0,
          crps_weight: float = 0.0, variogram_weight: float = 0.0, variogram_p: float = 0.5) -> torch.Tensor:
    """Per-item loss (B,) on features (m, B, D) vs (B, D).

    ``"energy"``: the joint energy score (kernel ‖·‖^β, strictly proper for 0 < β < 2)
    + ``crps_weight`` × the mean per-coordinate CRPS (strictly proper for each marginal; the sum
    stays strictly proper for the joint law because the joint term is)
    + ``variogram_weight`` × the variogram score of order ``variogram_p`` (proper only; kept
    strictly proper by the joint term).  All three use the same m samples and the same features
    (e.g. whitened coordinates, :func:`linear_features`).  ``"mse"``: squared error (the
    conditional mean; not a scoring rule for the law).
    """
    if objective == "energy":
        out = energy_score(samples_f, target_f, beta)
        if crps_weight:
            out = out + crps_weight * crps_per_coordinate(samples_f, target_f, beta)
        if variogram_weight:
            out = out + variogram_weight * variogram_score(samples_f, target_f, variogram_p)
        return out
    if objective == "mse":
        return mse(samples_f, target_f)
    raise ValueError(f"objective must be 'energy' or 'mse', got {objective!r}")


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def _repeat(x: torch.Tensor, m: int) -> torch.Tensor:
    return x.repeat((m,) + (1,) * (x.ndim - 1))


def _draw(model, z, L, tau, latent_fn, m, generator):
    """m outputs per item with independent latents: (m, B, *S), one batched model call."""
    b = z.shape[0]
    eps = latent_fn(m * b, generator)
    if m == 1:
        return model(z, L, eps, tau).unsqueeze(0)
    out = model(_repeat(z, m), _repeat(L, m), eps, _repeat(tau, m))
    return out.reshape((m, b) + tuple(out.shape[1:]))


def _default_m(objective: str, n_latent: int | None) -> int:
    if n_latent is None:
        return 2 if objective == "energy" else 1
    return int(n_latent)


def local_loss(model, z_s: torch.Tensor, z_t: torch.Tensor, L: torch.Tensor, tau: torch.Tensor, *,
               latent_fn: Callable, objective: str = "energy", n_latent: int | None = None,
               score_features: Callable | None = None, beta: float = 1.0, crps_weight: float = 0.0,
               variogram_weight: float = 0.0, variogram_p: float = 0.5, tau_power: float = 1.0,
               generator: torch.Generator | None = None, item_score: Callable | None = None,
               weights: torch.Tensor | None = None):
    """Scoring-rule loss of ``model(z_s, L, ε_j, τ)`` (j = 1..m) against the target ``z_t``.

    ``z_s``, ``z_t`` (B, *S); ``L`` (B, N, *W) the coefficients of [s, s+τ]; ``tau`` (B,).
    ``objective`` "energy" (m = ``n_latent`` ≥ 2, default 2) or "mse" (default m = 1).  The
    per-item score (on ``score_features``) is weighted by τ^(-tau_power) and averaged.
    Returns ``(loss, {"score": mean unweighted score, "spread": mean ‖T_1 − T_2‖ of the first two
    samples (0 for m = 1), "error": mean ‖T_1 − y‖, "tau": mean τ})`` — diagnostics detached, in
    feature units.

    ``item_score(samples (m, B, *S), z_t, z_s, tau) -> (B,)`` replaces features + scoring rule where
    the score depends on the start state (the molecular trainer's displacement features and whitened
    internal coordinates; diagnostics then hold only "score" and "tau"). ``weights`` (B,) weigh the
    items (0 leaves one out): the loss is then sum(w_τ weights score) / sum(weights).
    """
    m = _default_m(objective, n_latent)
    samples = _draw(model, z_s, L, tau, latent_fn, m, generator)
    if item_score is None:
        features = score_features or flatten_features
        sf = features(samples.reshape((-1,) + tuple(samples.shape[2:]))).reshape(m, z_s.shape[0], -1)
        tf = features(z_t)
        per = score(sf, tf, objective, beta, crps_weight, variogram_weight, variogram_p)
    else:
        per = item_score(samples, z_t, z_s, tau)
    w = tau.to(per).pow(-tau_power) if tau_power else torch.ones_like(per)
    if weights is None:
        loss = (w * per).mean()
    else:
        weights = weights.to(per)
        loss = (w * weights * per).sum() / weights.sum().clamp_min(1.0)
    with torch.no_grad():
        diag = {"score": per.mean().detach(), "tau": tau.mean().detach().to(per)}
        if item_score is None:
            diag["error"] = (sf[0] - tf).norm(dim=-1).mean()
            diag["spread"] = (sf[0] - sf[1]).norm(dim=-1).mean() if m >= 2 else torch.zeros((), dtype=per.dtype)
    return loss, diag


direct_loss = local_loss
"""Direct supervision on long recorded jumps: the same maths as :func:`local_loss` (target = the
recorded frame τ later, ``L`` = the recorded coefficients composed over the frames in between,
e.g. with :func:`compose_consecutive`)."""


@functools.lru_cache(maxsize=64)
def _split_mats_cached(n: int, n_steps: tuple | None, dt: float | None):
    if n_steps is None:
        mm, ff = _B.split_matrices([0.5, 0.5], n)  # total duration 1: noise scales as sqrt(τ)
    else:
        mm, ff = _B.split_matrices(None, n, n_steps_list=list(n_steps), dt_ps=dt)
    return mm, ff


def _apply_split(L: torch.Tensor, mm: np.ndarray, ff: np.ndarray, noise_scale, generator):
    """children (2 × (b, N, *W)) = mean_map @ L + noise_scale · noise_factor @ eta."""
    b, n = L.shape[:2]
    flat = L.reshape(b, n, -1)
    mt = torch.as_tensor(mm, dtype=L.dtype, device=L.device)
    ft = torch.as_tensor(ff, dtype=L.dtype, device=L.device)
    eta = _randn((b, ft.shape[2], flat.shape[2]), generator, L.dtype, L.device)
    out = torch.einsum("pnk,bkw->pbnw", mt, flat)
    noise = torch.einsum("pnr,brw->pbnw", ft, eta)
    if noise_scale is not None:
        noise = noise * noise_scale.reshape(1, b, 1, 1)
    out = out + noise
    return out[0].reshape(L.shape), out[1].reshape(L.shape)


def continuous_half_split(L: torch.Tensor, tau: torch.Tensor, generator: torch.Generator | None = None):
    """Split coefficients (B, N, *W) of [s, s+τ] into equal halves, continuous Brownian law.

    Exact Gaussian conditioning (``brownian.split_matrices``; the mean map depends only on the
    fractions, the noise scales as sqrt(τ), so one pair of matrices serves any per-item τ).
    Returns ``(L_left, tau_left, L_right, tau_right)``; composing the halves gives ``L`` back.
    """
    mm, ff = _split_mats_cached(L.shape[1], None, None)
    left, right = _apply_split(L, mm, ff, tau.to(L).sqrt(), generator)
    return left, 0.5 * tau, right, 0.5 * tau


class DiscreteHalfSplit:
    """Split function for engine paths (exact discrete law of K steps of ``dt``).

    Each item's K = round(τ/dt) steps are split into K//2 and K - K//2 steps (unequal halves when K
    is odd); items are grouped by K.  Use it when τ covers few steps (DESIGN §2: the continuous law
    is within 1% from K ≈ 100).  Same call and return as :func:`continuous_half_split`.
    """

    def __init__(self, dt: float):
        self.dt = float(dt)

    def __call__(self, L: torch.Tensor, tau: torch.Tensor, generator: torch.Generator | None = None):
        k = torch.round(tau.detach().double() / self.dt).long()
        if torch.any(k < 2) or torch.any((k.double() * self.dt - tau.detach().double()).abs() > 1e-6 * tau.detach().double()):
            raise ValueError("each τ must be a whole number (>= 2) of steps of dt")
        left = torch.empty_like(L)
        right = torch.empty_like(L)
        for kk in torch.unique(k).tolist():
            idx = torch.nonzero(k == kk).reshape(-1)
            k1 = kk // 2
            mm, ff = _split_mats_cached(L.shape[1], (k1, kk - k1), self.dt)
            lo, ro = _apply_split(L[idx], mm, ff, None, generator)
            left[idx] = lo
            right[idx] = ro
        tl = (k // 2).to(tau) * self.dt
        return left, tl, right, tau - tl


def semigroup_loss(model, teacher, z_s: torch.Tensor, L: torch.Tensor, tau: torch.Tensor, *,
                   latent_fn: Callable, split_fn: Callable | None = None, objective: str = "energy",
                   n_latent: int | None = None, score_features: Callable | None = None, beta: float = 1.0,
                   crps_weight: float = 0.0, variogram_weight: float = 0.0, variogram_p: float = 0.5,
                   tau_power: float = 1.0, generator: torch.Generator | None = None,
                   item_score: Callable | None = None, broken: Callable | None = None):
    """Self-distillation (semigroup) loss on jumps [s, s+τ] (DESIGN §3.2).

    ``L`` (B, N, *W): the coefficients of the whole jump (recorded/composed, or freshly drawn).
    ``split_fn(L, tau, generator) -> (L_left, tau_left, L_right, tau_right)`` draws the halves'
    coefficients by exact conditioning (default :func:`continuous_half_split`; use
    :class:`DiscreteHalfSplit` for few-step engine paths).  Teacher (``teacher``, e.g.
    ``EMA.model``; no gradient): two half-jumps, an independent fresh latent per half — one sample
    of the composed law.  Student: one jump with the full coefficients and m latents, scored as in
    :func:`local_loss` (weighted by τ^(-tau_power)).  Returns ``(loss, diagnostics)``.

    ``broken(z_s, z_mid, z_end) -> (B,) bool``: teacher outputs that are no target (non-finite, a
    broken molecule); their items get weight 0 (and the start state as a harmless stand-in target,
    so 0 x score stays finite) and are counted in ``diagnostics["teacher_excluded"]``.
    ``item_score``: as in :func:`local_loss`.
    """
    split_fn = split_fn or continuous_half_split
    b = z_s.shape[0]
    weights = None
    with torch.no_grad():
        l1, t1, l2, t2 = split_fn(L, tau, generator)
        z_mid = teacher(z_s, l1, latent_fn(b, generator), t1)
        target = teacher(z_mid, l2, latent_fn(b, generator), t2)
        if broken is not None:
            bad = broken(z_s, z_mid, target)
            weights = (~bad).to(z_s.dtype)
            target = torch.where(bad.view((-1,) + (1,) * (target.ndim - 1)), z_s, target)
    loss, diag = local_loss(model, z_s, target, L, tau, latent_fn=latent_fn, objective=objective, n_latent=n_latent,
                            score_features=score_features, beta=beta, crps_weight=crps_weight,
                            variogram_weight=variogram_weight, variogram_p=variogram_p, tau_power=tau_power,
                            generator=generator, item_score=item_score, weights=weights)
    diag["teacher_excluded"] = int(bad.sum()) if broken is not None else 0
    return loss, diag


# ----------------------------------------------------------------------------------------------
# Coefficients on torch (coefficient axis 1)
# ----------------------------------------------------------------------------------------------
def sample_coefficients_torch(tau: torch.Tensor, n_coefficients: int, w_shape, generator=None) -> torch.Tensor:
    """Fresh coefficients (B, N, *W) of jumps of lengths ``tau`` (B,): continuous law.

    Independent, L^(n) ~ N(0, τ/(2n+1)) [sqrt(time)].  (Few-step engine paths: use
    ``brownian.sample_coefficients(..., n_steps=K)`` for the exact discrete law.)
    """
    w_shape = (int(w_shape),) if isinstance(w_shape, int) else tuple(w_shape)
    b = tau.shape[0]
    k = 2.0 * torch.arange(n_coefficients, dtype=tau.dtype, device=tau.device) + 1.0
    std = torch.sqrt(tau[:, None] / k[None, :]).reshape((b, n_coefficients) + (1,) * len(w_shape))
    return std * _randn((b, n_coefficients) + w_shape, generator, tau.dtype, tau.device)


@functools.lru_cache(maxsize=256)
def _equal_composition_matrices(k: int, n: int) -> np.ndarray:
    return np.stack(_B.composition_matrices(np.ones(k), n))  # (k, N, N); cached: direct items reuse k


def compose_consecutive(pieces: torch.Tensor) -> torch.Tensor:
    """Exact coefficients (B, N, *W) of the union of k equal consecutive pieces (B, k, N, *W)."""
    b, k, n = pieces.shape[:3]
    a = torch.as_tensor(_equal_composition_matrices(int(k), int(n)), dtype=pieces.dtype,
                        device=pieces.device)  # (k, N, N)
    flat = pieces.reshape(b, k, n, -1)
    return torch.einsum("pnm,bpmw->bnw", a, flat).reshape((b, n) + tuple(pieces.shape[3:]))


# ----------------------------------------------------------------------------------------------
# EMA, τ sampling and curriculum
# ----------------------------------------------------------------------------------------------
def warmup_cosine(step: int, total: int, floor: float) -> float:
    """Learning-rate factor: linear warm-up over max(1, total // 50) steps, then a cosine from 1 down
    to ``floor`` at step ``total``, constant after it (both molecular trainers use it)."""
    warm = max(1, total // 50)
    if step < warm:
        return (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


class EMA:
    """Exponential moving average of a model's parameters; ``.model`` is the teacher copy.

    ``decay``: the EMA factor per :meth:`update`; with ``warmup`` the factor is
    min(decay, (1 + k)/(10 + k)) at update k, so the teacher follows the student early on
    (short toy runs).  The copy never requires gradients and stays in eval mode.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.n_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay
        if self.warmup:
            d = min(d, (1.0 + self.n_updates) / (10.0 + self.n_updates))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1.0 - d)
        for be, bm in zip(self.model.buffers(), model.buffers()):
            be.copy_(bm)
        self.n_updates += 1

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay, "n_updates": self.n_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.decay = state["decay"]
        self.n_updates = state["n_updates"]


def curriculum_tau_max(step: int, total_steps: int, h0: float, tau_max: float, fraction: float = 0.5,
                       start: float | None = None) -> float:
    """Longest τ at ``step``: grows geometrically from ``start`` (default 2·h0, the shortest
    semigroup jump) to ``tau_max`` over the first ``fraction`` of ``total_steps``, then stays."""
    start = 2.0 * h0 if start is None else float(start)
    start = min(start, tau_max)
    if fraction <= 0 or total_steps <= 0:
        return float(tau_max)
    u = min(1.0, step / (fraction * total_steps))
    return float(start * (tau_max / start) ** u)


def log_uniform_tau(n: int, tau_min: float, tau_max: float, generator: torch.Generator | None = None, *,
                    dyadic_base: float | None = None, dtype=torch.float32, device=None) -> torch.Tensor:
    """n jump lengths, log-uniform on [tau_min, tau_max] (B,).

    With ``dyadic_base`` h: τ = h·2^j with j uniform on the integers for which τ lies in
    [tau_min, tau_max] (at least the smallest such level), so a semigroup jump's halves are again
    trained lengths (h0·2^(j-1)).  Units: time.
    """
    if dyadic_base is not None:
        h = float(dyadic_base)
        jmin = math.ceil(math.log2(tau_min / h) - 1e-9)
        jmax = max(jmin, math.floor(math.log2(tau_max / h) + 1e-9))
        j = torch.randint(jmin, jmax + 1, (n,), generator=generator, device=_gen_device(generator, device)).to(device)
        return (h * torch.pow(2.0, j.double())).to(dtype)
    u = torch.rand((n,), generator=generator, dtype=torch.float64, device=_gen_device(generator, device)).to(device)
    lo, hi = math.log(tau_min), math.log(max(tau_max, tau_min))
    return torch.exp(lo + u * (hi - lo)).to(dtype)


# ----------------------------------------------------------------------------------------------
# Training loop (generic; toys use it, the molecular trainer may use only the losses)
# ----------------------------------------------------------------------------------------------
@dataclass
class SSFMConfig:
    """Settings of :func:`train_ssfm` (time units: those of the data).

    objective: "energy" or "mse".  n_latent: latent draws per item (m; None -> 2 for energy, 1 for
    mse).  beta: energy-score exponent (0 < β < 2; β < 1 weighs small discrepancies more).
    crps_weight: weight of the per-coordinate CRPS added to the energy score.  variogram_weight,
    variogram_p: weight and order of the variogram score added to it (:func:`variogram_score`).
    Every energy-type combination is strictly proper (the joint energy score is; the CRPS and
    variogram terms are proper).  Which features they see (raw or whitened coordinates) is the
    caller's ``score_features`` (e.g. :func:`linear_features`), not a config field.

    Sample-mode fidelity (issue #10, benchmarks/mixed_mode_toy.py, results in
    benchmarks/results/mixed_mode_toy_cpu_small.json): on the mixed-mode toy the candidate chosen
    by the table is the energy score plus the per-coordinate CRPS (crps_weight = 1) in whitened
    coordinates (each coordinate scaled to unit thermal spread).  The defaults below stay the
    plain energy score (crps_weight = 0) because whitening needs a caller-supplied feature map;
    pass crps_weight=1.0 with whitened ``score_features`` to use the chosen objective.
    Barrier kinetics need a converged map more than a different objective: the toy's maps first
    settle on a linear-Gaussian plateau (≈ 4× too many barrier crossings) and leave it only
    after ≈ 6000-9000 steps of 256 items at τ = 0.5 (15000 steps: switch rate 1.00× fine).

    fractions: share of each batch per loss (local, semigroup, direct;
    normalised).  h0: base interval (the data's frame interval).  tau_max: longest jump.
    tau_min: shortest semigroup/direct jump (None: 2·h0).
    curriculum_fraction: share of training over which the longest τ grows from tau_min to tau_max.
    dyadic: semigroup/direct τ on the grid h0·2^j (then tau_max, tau_min must lie on it; use
    dyadic=False for other τ: log-uniform τ, direct jumps rounded to whole frames).
    tau_power: scores weighted by τ^(-tau_power).
    ema_decay: teacher EMA factor.  lr, lr_final_fraction (cosine decay to lr·fraction),
    weight_decay, grad_clip (max gradient norm; None: off), steps (optimiser steps), batch_size,
    seed (torch generator for sampling), log_every (history interval in steps).
    """

    objective: str = "energy"
    n_latent: int | None = None
    beta: float = 1.0
    crps_weight: float = 0.0
    variogram_weight: float = 0.0
    variogram_p: float = 0.5
    fractions: dict = field(default_factory=lambda: {"local": 0.25, "semigroup": 0.75, "direct": 0.0})
    h0: float = 0.01
    tau_max: float = 0.5
    tau_min: float | None = None
    curriculum_fraction: float = 0.5
    dyadic: bool = True
    tau_power: float = 1.0
    ema_decay: float = 0.99
    lr: float = 1e-3
    lr_final_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    steps: int = 2000
    batch_size: int = 256
    seed: int = 0
    log_every: int = 100

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings (e.g. a tau_max off the dyadic grid)."""
        if self.objective not in ("energy", "mse"):
            raise ValueError(f"objective must be 'energy' or 'mse', got {self.objective!r}")
        if self.objective == "energy" and self.n_latent is not None and self.n_latent < 2:
            raise ValueError("the energy score needs n_latent >= 2")
        if not (self.h0 > 0 and self.tau_max >= self.h0):
            raise ValueError("need h0 > 0 and tau_max >= h0")
        long_jumps = any(float(self.fractions.get(k, 0)) > 0 for k in ("semigroup", "direct"))
        if self.dyadic and long_jumps:
            for name in ("tau_max", "tau_min"):
                val = getattr(self, name)
                if val is None:
                    continue
                j = math.log2(val / self.h0)
                if abs(j - round(j)) > 1e-6:
                    raise ValueError(f"{name} = {val} is not h0·2^j (h0 = {self.h0}) but dyadic=True: the "
                                     f"longest jumps would never be trained; choose h0 or set dyadic=False")

    def counts(self) -> dict:
        """Items per loss in one batch (largest remainder; every positive fraction gets ≥ 1)."""
        fr = {k: float(v) for k, v in self.fractions.items() if float(v) > 0}
        unknown = set(fr) - {"local", "semigroup", "direct"}
        if unknown or not fr:
            raise ValueError(f"fractions need keys among local/semigroup/direct, got {self.fractions}")
        tot = sum(fr.values())
        raw = {k: v / tot * self.batch_size for k, v in fr.items()}
        out = {k: max(1, int(math.floor(r))) for k, r in raw.items()}
        rest = self.batch_size - sum(out.values())
        for k in sorted(raw, key=lambda k: raw[k] - math.floor(raw[k]), reverse=True)[: max(0, rest)]:
            out[k] += 1
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class TrajectoryDataSampler:
    """Training items from recorded trajectories (the engine's layout, coefficient axis moved).

    ``frames`` (R, F, *S) at interval ``h0``; ``coefficients`` (R, F-1, N, *W) of each frame
    interval.  Called as ``sampler(kind, n, tau_max=..., generator=...)`` it returns a dict with
    ``z_s``, ``tau`` (n,), ``L`` and, for "local"/"direct", ``z_t`` (τ of semigroup/direct items
    log-uniform, or dyadic h0·2^j, in [tau_min (default 2·h0), tau_max]):

    * "local": adjacent frames, their recorded coefficients, τ = h0;
    * "direct": frames k apart (τ = k·h0 ≤ tau_max, log-uniform / dyadic), recorded coefficients
      composed exactly over the k intervals (true samples of the conditional law);
    * "semigroup": a recorded start state, τ ∈ [2h0, tau_max], fresh coefficients (continuous law).

    ``dyadic`` is the default of the call's ``dyadic`` argument (``train_ssfm`` passes
    ``config.dyadic``).  States and coefficients are converted to ``dtype``.
    """

    def __init__(self, frames: torch.Tensor, coefficients: torch.Tensor, h0: float, *, dyadic: bool = True,
                 dtype=torch.float32):
        if coefficients.shape[:2] != (frames.shape[0], frames.shape[1] - 1):
            raise ValueError("coefficients must be (R, F-1, N, *W) for frames (R, F, *S)")
        self.frames = frames.to(dtype)
        self.coefficients = coefficients.to(dtype)
        self.h0 = float(h0)
        self.dyadic = bool(dyadic)
        self.n_replicas, self.n_frames = frames.shape[:2]
        self.n_coefficients = coefficients.shape[2]
        self.w_shape = tuple(coefficients.shape[3:])

    def _starts(self, n, max_offset, generator):
        dev = _gen_device(generator, "cpu")
        r = torch.randint(0, self.n_replicas, (n,), generator=generator, device=dev).to(self.frames.device)
        f = torch.randint(0, self.n_frames - max_offset, (n,), generator=generator, device=dev).to(self.frames.device)
        return r, f

    def __call__(self, kind: str, n: int, *, tau_max: float, tau_min: float | None = None,
                 dyadic: bool | None = None, generator: torch.Generator | None = None) -> dict:
        dt, dev = self.frames.dtype, self.frames.device
        if kind == "local":
            r, f = self._starts(n, 1, generator)
            return {"z_s": self.frames[r, f], "z_t": self.frames[r, f + 1], "L": self.coefficients[r, f],
                    "tau": torch.full((n,), self.h0, dtype=dt, device=dev)}
        longest = min(float(tau_max), (self.n_frames - 1) * self.h0)
        shortest = 2.0 * self.h0 if tau_min is None else float(tau_min)
        tau = log_uniform_tau(n, min(shortest, longest), longest, generator,
                              dyadic_base=self.h0 if (self.dyadic if dyadic is None else dyadic) else None,
                              dtype=torch.float64, device=dev)
        if kind == "semigroup":
            r, f = self._starts(n, 0, generator)
            tau = tau.to(dt)
            return {"z_s": self.frames[r, f], "tau": tau,
                    "L": sample_coefficients_torch(tau, self.n_coefficients, self.w_shape, generator)}
        if kind == "direct":
            k = torch.round(tau / self.h0).long().clamp(1, self.n_frames - 1)
            z_s = torch.empty((n,) + tuple(self.frames.shape[2:]), dtype=dt, device=dev)
            z_t = torch.empty_like(z_s)
            L = torch.empty((n,) + tuple(self.coefficients.shape[2:]), dtype=dt, device=dev)
            for kk in torch.unique(k).tolist():
                idx = torch.nonzero(k == kk).reshape(-1)
                r, f = self._starts(idx.numel(), kk, generator)
                z_s[idx] = self.frames[r, f]
                z_t[idx] = self.frames[r, f + kk]
                steps = f[:, None] + torch.arange(kk, device=dev)[None, :]
                L[idx] = compose_consecutive(self.coefficients[r[:, None], steps])
            return {"z_s": z_s, "z_t": z_t, "L": L, "tau": k.to(dt) * self.h0}
        raise ValueError(f"unknown item kind {kind!r}")


def gaussian_latent(shape) -> Callable:
    """``latent_fn`` drawing standard normal latents of per-item ``shape`` (float32 by default)."""
    shape = (int(shape),) if isinstance(shape, int) else tuple(shape)

    def latent_fn(batch_size, generator=None, dtype=torch.float32, device=None):
        return _randn((batch_size,) + shape, generator, dtype, device or "cpu")

    return latent_fn


def train_ssfm(model: nn.Module, data_sampler: Callable, config: SSFMConfig, *, latent_fn: Callable,
               score_features: Callable | None = None, split_fn: Callable | None = None, ema: EMA | None = None,
               optimizer: torch.optim.Optimizer | None = None, callback: Callable | None = None) -> dict:
    """Generic SSFM training loop (toys; the molecular trainer may reuse only the losses).

    Each optimiser step draws a batch split over the losses by ``config.fractions``
    (``data_sampler(kind, n, tau_min=..., tau_max=current longest τ, dyadic=config.dyadic,
    generator=g)`` -> dict, see
    :class:`TrajectoryDataSampler`), computes each loss, and minimises Σ_k (n_k/B)·loss_k; then the
    EMA teacher is updated.  The longest τ follows :func:`curriculum_tau_max`.
    ``callback(step, record)`` is called at every log step.
    Returns ``{"ema": EMA, "history": [records], "wall_s": seconds, "config": dict}``; a record
    holds step, lr, tau_cur, loss and per-loss score/error/spread (floats).
    """
    config.validate()
    g = torch.Generator().manual_seed(int(config.seed))
    ema = ema or EMA(model, config.ema_decay)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    counts = config.counts()
    tau_min = 2.0 * config.h0 if config.tau_min is None else float(config.tau_min)
    kw = dict(latent_fn=latent_fn, objective=config.objective, n_latent=config.n_latent,
              score_features=score_features, beta=config.beta, crps_weight=config.crps_weight,
              variogram_weight=config.variogram_weight, variogram_p=config.variogram_p,
              tau_power=config.tau_power, generator=g)
    history = []
    t0 = time.perf_counter()
    model.train()
    for step in range(config.steps):
        frac = step / max(1, config.steps - 1)
        lr = config.lr * (config.lr_final_fraction + (1 - config.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        tau_cur = curriculum_tau_max(step, config.steps, config.h0, config.tau_max, config.curriculum_fraction,
                                     start=tau_min)
        total = 0.0
        diags = {}
        for kind, n in counts.items():
            item = data_sampler(kind, n, tau_min=tau_min, tau_max=tau_cur, dyadic=config.dyadic, generator=g)
            if kind == "semigroup":
                loss, d = semigroup_loss(model, ema.model, item["z_s"], item["L"], item["tau"], split_fn=split_fn, **kw)
            else:
                loss, d = local_loss(model, item["z_s"], item["z_t"], item["L"], item["tau"], **kw)
            total = total + (n / config.batch_size) * loss
            diags[kind] = d
        opt.zero_grad(set_to_none=True)
        total.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        ema.update(model)
        if step % config.log_every == 0 or step == config.steps - 1:
            rec = {"step": step, "lr": lr, "tau_cur": tau_cur, "loss": float(total.detach())}
            for kind, d in diags.items():
                for key, val in d.items():
                    rec[f"{kind}/{key}"] = float(val)
            history.append(rec)
            if callback is not None:
                callback(step, rec)
    model.eval()
    return {"ema": ema, "history": history, "wall_s": time.perf_counter() - t0, "config": config.to_dict()}


# ----------------------------------------------------------------------------------------------
# Using a trained map
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, z: torch.Tensor, L: torch.Tensor, tau: torch.Tensor, latent_fn: Callable, *,
            mode: str = "sample", n_mean: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """One jump.  ``mode="sample"``: a fresh ε per item; ``"mean"``: the average over ``n_mean``
    independent ε (Monte Carlo E[T | z, L]; see the module docstring for why not ε = 0)."""
    if mode == "sample":
        return model(z, L, latent_fn(z.shape[0], generator), tau)
    if mode == "mean":
        return _draw(model, z, L, tau, latent_fn, int(n_mean), generator).mean(0)
    raise ValueError("mode must be 'sample' or 'mean'")


@torch.no_grad()
def rollout(model, z0: torch.Tensor, n_jumps: int, tau: float, latent_fn: Callable, *,
            coefficients: torch.Tensor | Callable, mode: str = "sample", n_mean: int = 16,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """K = ``n_jumps`` jumps of ``tau`` from ``z0`` (B, *S) -> trajectory (B, K+1, *S).

    ``coefficients``: a tensor (B, K, N, *W) (pathwise: e.g. a reference's composed coefficients)
    or a callable ``(tau (B,), generator) -> (B, N, *W)`` for fresh coefficients each jump
    (free-running; e.g. ``lambda t, g: sample_coefficients_torch(t, N, W, g)``).
    """
    b = z0.shape[0]
    tt = torch.full((b,), float(tau), dtype=z0.dtype, device=z0.device)
    out = [z0]
    z = z0
    for k in range(n_jumps):
        L = coefficients[:, k] if isinstance(coefficients, torch.Tensor) else coefficients(tt, generator)
        z = predict(model, z, L, tt, latent_fn, mode=mode, n_mean=n_mean, generator=generator)
        out.append(z)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------
# A flow map for toy SDEs
# ----------------------------------------------------------------------------------------------
class ToyFlowMap(nn.Module):
    """MLP flow map for toy additive-noise SDEs with flat states z (B, d) and L (B, N, m).

        z_next = base(z, L, τ [, ε]) + scale ⊙ (τ/τ_ref)^p · D_θ(ẑ, ℓ, ε, log(τ/τ_ref))

    with ẑ = (z - shift)/scale, ℓ^(n) = L^(n)·sqrt((2n+1)/τ) (standard normal under the Brownian
    law), D_θ an MLP whose last layer starts at zero.  τ → 0 gives the identity by construction
    (base → z, (τ/τ_ref)^p → 0).

    ``state_transform`` A (d, d): the network works in whitened coordinates, ẑ = ((z - shift) A)/scale,
    and its correction is mapped back, Δz = (scale ⊙ (τ/τ_ref)^p · D_θ) A⁻¹ (e.g. normal modes
    scaled to unit thermal spread: every mode, fast or slow, is an O(1) number to the network).
    ``linear_skip``: D_θ = MLP + a linear map of the same inputs (zero-initialised), so the linear
    (harmonic) part of the jump is represented exactly.  Both together made the mixed-mode toy's
    free-running rollouts stable (benchmarks/mixed_mode_toy.py has the measurements).  ``base``:

    * ``"identity"``: z (the network learns everything else);
    * ``"noise"``: z + G L^(0) — the exact solution of the pure-noise part dz = G dW (any SDE);
    * ``"ou"`` (Langevin z = (x, v), d = 2n, m = n): the exact conditional mean of the force-free
      Langevin step given L (friction ``gamma``, noise σ = ``noise_scale``[n:]; see
      ``sde.free_langevin_conditional``), plus, with ``ou_residual``, its exact conditional spread
      σ·chol·(ε_0.., ε_2n) from the first 2n latent components — so the free-particle / OU part is
      exact (in law, given L) and the network learns the force's correction.

    ``latent_dim`` k: ε (B, k).  ``latent_fn`` draws it.  Units: those of the SDE.
    """

    def __init__(self, state_dim: int, noise_dim: int, n_coefficients: int, latent_dim: int, *,
                 hidden: int = 64, depth: int = 2, base: str = "identity", noise_scale=None,
                 noise_index=None, gamma: float | None = None, ou_residual: bool = False, state_scale=None,
                 state_shift=None, state_transform=None, linear_skip: bool = False, tau_ref: float = 1.0,
                 tau_power: float = 1.0):
        super().__init__()
        self.state_dim, self.noise_dim = int(state_dim), int(noise_dim)
        self.n_coefficients, self.latent_dim = int(n_coefficients), int(latent_dim)
        self.base, self.tau_ref, self.tau_power = base, float(tau_ref), float(tau_power)
        self.ou_residual = bool(ou_residual)
        self.gamma = None if gamma is None else float(gamma)
        d = self.state_dim
        scale = torch.ones(d) if state_scale is None else torch.as_tensor(state_scale, dtype=torch.float32).reshape(d)
        shift = torch.zeros(d) if state_shift is None else torch.as_tensor(state_shift, dtype=torch.float32).reshape(d)
        self.register_buffer("state_scale", scale.clone())
        self.register_buffer("state_shift", shift.clone())
        if state_transform is not None:
            a = torch.as_tensor(state_transform, dtype=torch.float64).reshape(d, d)
            self.register_buffer("state_transform", a.float())
            self.register_buffer("state_transform_inv", torch.linalg.inv(a).float())
        else:
            self.state_transform = self.state_transform_inv = None
        self.register_buffer("ell_scale", torch.sqrt(2.0 * torch.arange(self.n_coefficients, dtype=torch.float32) + 1.0))
        if base in ("noise", "ou"):
            if noise_scale is None:
                raise ValueError(f"base {base!r} needs noise_scale")
            g = torch.as_tensor(noise_scale, dtype=torch.float32).reshape(d)
            idx = torch.nonzero(g != 0).reshape(-1) if noise_index is None else torch.as_tensor(noise_index).reshape(-1)
            if idx.numel() != self.noise_dim:
                raise ValueError("noise_scale has a different number of noisy coordinates than noise_dim")
            self.register_buffer("g_full", g)
            self.register_buffer("noise_index", idx.long())
            gmat = torch.zeros(self.noise_dim, d)
            gmat[torch.arange(self.noise_dim), idx.long()] = g[idx.long()]
            self.register_buffer("g_matrix", gmat)  # Gᵀ (m, d): noise increments -> state
        if base == "ou":
            if d % 2 or self.noise_dim != d // 2 or gamma is None:
                raise ValueError("base 'ou' needs z = (x, v) with n = d/2 noisy velocities and gamma")
            if ou_residual and self.latent_dim < d:
                raise ValueError("ou_residual needs latent_dim >= state_dim (2 latents per DOF)")
        elif base not in ("identity", "noise"):
            raise ValueError("base must be 'identity', 'noise' or 'ou'")
        n_in = d + self.n_coefficients * self.noise_dim + self.latent_dim + 1
        layers: list[nn.Module] = []
        width = n_in
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        self.linear = None
        if linear_skip:
            self.linear = nn.Linear(n_in, d)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    @classmethod
    def for_sde(cls, sde, n_coefficients: int, latent_dim: int | None = None, *, base: str = "auto", **kwargs):
        """Build for an ``AdditiveSDE``: base "auto" = "ou" for a LangevinSDE, else "noise"."""
        from .sde import LangevinSDE

        if base == "auto":
            base = "ou" if isinstance(sde, LangevinSDE) else "noise"
        latent_dim = sde.dim if latent_dim is None else latent_dim
        gamma = sde.gamma if isinstance(sde, LangevinSDE) else None
        return cls(sde.dim, sde.noise_dim, n_coefficients, latent_dim, base=base,
                   noise_scale=sde.noise_scale.float(), noise_index=sde.noise_index, gamma=gamma, **kwargs)

    def latent_fn(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.state_scale
        return _randn((batch_size, self.latent_dim), generator, p.dtype, p.device)

    def base_map(self, z: torch.Tensor, L: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if self.base == "identity":
            return z
        if self.base == "noise":
            return z + L[:, 0].reshape(z.shape[0], -1) @ self.g_matrix.to(z)
        g = self.g_full[self.noise_index].to(z)
        n = self.state_dim // 2
        c = {k: v.to(z.dtype) for k, v in _ou_coefficients(self, tau).items()}
        L = L[:, : self.n_coefficients]
        x, v = z[:, :n], z[:, n:]
        x_new = x + c["phi"][:, None] * v + g * torch.einsum("bn,bnk->bk", c["cx"], L)
        v_new = c["decay"][:, None] * v + g * torch.einsum("bn,bnk->bk", c["cv"], L)
        if self.ou_residual:
            e1, e2 = eps[:, :n], eps[:, n:2 * n]
            ch = c["chol"]
            x_new = x_new + g * ch[:, 0, 0, None] * e1
            v_new = v_new + g * (ch[:, 1, 0, None] * e1 + ch[:, 1, 1, None] * e2)
        return torch.cat([x_new, v_new], dim=1)

    def forward(self, z: torch.Tensor, L: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        tau = tau.to(z)
        rel = tau.clamp_min(1e-12) / self.tau_ref  # (B,) dimensionless
        ell = L[:, : self.n_coefficients].reshape(b, self.n_coefficients, -1)
        ell = ell * (self.ell_scale.to(z)[None, :, None] * torch.rsqrt(rel * self.tau_ref)[:, None, None])
        zh = z - self.state_shift
        if self.state_transform is not None:
            zh = zh @ self.state_transform
        zh = zh / self.state_scale
        feats = torch.cat([zh, ell.reshape(b, -1), eps.reshape(b, -1), torch.log(rel)[:, None]], dim=1)
        corr = self.net(feats)
        if self.linear is not None:
            corr = corr + self.linear(feats)
        step = rel[:, None] if self.tau_power == 1.0 else rel.pow(self.tau_power)[:, None]
        delta = self.state_scale * step * corr
        if self.state_transform_inv is not None:
            delta = delta @ self.state_transform_inv
        return self.base_map(z, L, eps, tau) + delta


class ComposedFlowMap(nn.Module):
    """One jump of τ made of ``k`` jumps of τ/k of an inner map (architecture, not objective).

    The coefficients L (B, N, *W) of [s, s+τ] are split into k equal pieces by exact Gaussian
    conditioning (``brownian.split_matrices``: the pieces compose back to L exactly), and each piece
    is one call of ``inner`` with its own latent.  Everything random comes from this map's latent
    ε = (ε_1, …, ε_k, η) — k inner latents and the r·W standard normals of the split — so
    ``model(z, L, eps, tau)`` stays a deterministic function (the losses, EMA teacher and
    :func:`rollout` need nothing new).  Exact in law whenever the inner map is exact at τ/k; costs
    k inner evaluations.  ``inner`` must have ``latent_dim`` (flat latents).
    """

    def __init__(self, inner: nn.Module, k: int, n_coefficients: int, w_shape):
        super().__init__()
        self.inner, self.k, self.n_coefficients = inner, int(k), int(n_coefficients)
        self.w_shape = (int(w_shape),) if isinstance(w_shape, int) else tuple(w_shape)
        mm, ff = _split_mats_cached_fractions(self.n_coefficients, self.k)
        self.register_buffer("mean_map", torch.as_tensor(mm, dtype=torch.float32))  # (k, N, N)
        self.register_buffer("noise_factor", torch.as_tensor(ff, dtype=torch.float32))  # (k, N, r), τ = 1
        self.inner_latent = int(inner.latent_dim)
        self.n_split = int(ff.shape[2]) * int(np.prod(self.w_shape))
        self.latent_dim = self.k * self.inner_latent + self.n_split

    def latent_fn(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.mean_map
        return _randn((batch_size, self.latent_dim), generator, p.dtype, p.device)

    def forward(self, z: torch.Tensor, L: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        tau = tau.to(z)
        flat = L[:, : self.n_coefficients].reshape(b, self.n_coefficients, -1)
        eta = eps[:, self.k * self.inner_latent:].reshape(b, self.noise_factor.shape[2], -1)
        pieces = torch.einsum("pnm,bmw->pbnw", self.mean_map.to(z), flat)
        pieces = pieces + tau.sqrt()[None, :, None, None] * torch.einsum("pnr,brw->pbnw", self.noise_factor.to(z), eta)
        for p in range(self.k):
            e = eps[:, p * self.inner_latent:(p + 1) * self.inner_latent]
            z = self.inner(z, pieces[p].reshape(flat.shape[:1] + L[:, : self.n_coefficients].shape[1:]), e,
                           tau / self.k)
        return z


@functools.lru_cache(maxsize=16)
def _split_mats_cached_fractions(n: int, k: int):
    return _B.split_matrices([1.0 / k] * k, n)


def _ou_coefficients(model: ToyFlowMap, tau: torch.Tensor) -> dict:
    """Free-Langevin conditional coefficients for ``tau``, computed per unique τ (float64)."""
    from .sde import free_langevin_conditional

    uniq, inv = torch.unique(tau.detach().double(), return_inverse=True)
    c = free_langevin_conditional(uniq, model.gamma, model.n_coefficients)
    return {k: v[inv] for k, v in c.items()}
