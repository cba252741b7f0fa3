"""The reverse-time VP diffusion SDE on centred positions and its few-step flow map.

**The SDE.** Positions are centred and scaled, y = (x - centroid)/s (s: one length in nm, the RMS
per-coordinate spread of the centred training frames, so the data have unit scale). The forward VP
process noises y towards N(0, I) on the centre-free subspace; its marginals are
y_t = α_t y_0 + σ_t ε with α² + σ² = 1. Time t ∈ [0, 1] runs *backwards* in noise, uniformly in
log-SNR: λ_t = log(α_t/σ_t) = λ_noise + Λ t, Λ = λ_data - λ_noise (defaults -6 and 5.75: at t = 0
α = 0.0025, at t = 1 σ = 0.0032, i.e. 0.0006 nm of noise left on a 0.18 nm scale). In this clock the
reverse-time SDE of the family with the forward process's marginals is

    dy = Λ σ_t² [ y + (1 + η²) ∇log p_t(y) ] dt + η sqrt(2Λ) σ_t dW_t ,      t: 0 -> 1,

additive noise whose scale depends on t only (η = 1: the usual reverse SDE; η = 0: the probability
flow ODE; every η has the same marginals). With the score written through the denoiser,
∇log p_t(y) = -(y - α_t D(y, t))/σ_t², and D frozen over a step [t_a, t_b] (h = t_b - t_a), the
step is solved exactly (an exponential integrator; DDIM(η) in other words):

    y_b = Φ y_a + κ D + η sqrt(2Λ) σ_b ∫_{t_a}^{t_b} e^{-η²Λ (t_b - t')} dW_t' ,
    Φ = (σ_b/σ_a) e^{-η²Λh},   κ = α_b (1 - e^{-(1+η²)Λh}),

and the stochastic integral has the same exponential kernel as the velocity of a free Langevin
particle with friction η²Λ, so its projection on the step's Legendre path coefficients L^(0..N-1)
and its independent remainder (drawn from the first latent vector) come from
:func:`molflow.sde.free_langevin_conditional` — no second copy of that algebra.

**The flow map.** One map step replaces the frozen denoiser by a learned one that may depend on the
whole step, the path and the latent: D_θ = α_a y + σ_a F_θ(y, t_a, t_b, L̂, ε) with an E(3)-equivariant
PaiNN backbone (:class:`molflow.models.painn.PaiNN`; L̂^(n) = L^(n)/sqrt(h/(2n+1)) are unit-variance
path vectors). At h = 0 the step is the identity whatever F (Φ = 1, κ = 0, no noise), and F at
t_b = t_a, L̂ = ε = 0 *is* the denoiser that defines the SDE (trained by denoising score matching):
with ``networks = 1`` one network plays both roles; with ``networks = 2`` a score network F_φ(y, t)
is trained first and frozen, and a second, zero-initialised network adds the step correction:
D_θ = α_a y + σ_a (F_φ(y, t_a) + G_θ(y, t_a, t_b, L̂, ε)).

State packing for the generic SSFM losses (:mod:`molflow.flowmap`): the non-autonomous SDE is made
autonomous by carrying the time in the state, z = (B, A + 1, 3) with z[:, :A] = y and
z[:, A] = (t, 0, 0); ``forward(z, L, eps, tau)`` returns the state at t + τ. Path coefficients L
(B, N, A, 3) are those of the Brownian motion in the clock t (unit: sqrt of the unit of t), latents
eps (B, k, A, 3) (or flat (B, k·A·3)); both are projected on the centre-free subspace on entry.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models.painn import PaiNN
from ..sde import free_langevin_conditional
from .geometry import centre


PAIR_CLAMP = 4.0  # the pair-deviation feature saturates smoothly at ± this many spreads


@dataclasses.dataclass
class BoltzmannConfig:
    """Architecture and SDE of the Boltzmann map (stored in checkpoints).

    ``networks``: 1 (default) — one network; its zero-length-step limit is the score model, so the
    SDE, the local loss's fine target and the few-step map share weights, and a map step costs one
    evaluation (the exact Jacobian, the reweighting's dominant cost, scales with it); 2 — a score
    network trained during the DSM warm-up and then frozen, plus a zero-initialised correction
    network (the map starts as the SDE's own DDIM(η) sampler; two evaluations per step). Measured
    on alanine dipeptide (1 CPU thread, F = 32, 2 layers, 800 optimiser steps of 32 items on 4000
    MD frames, seed 1; 200 samples): one network trained in 2.4 min of CPU time, two in 3.8; mean |bond
    length - reference| 0.088 vs 0.121 nm at 4 map steps, and the SDE's own 64-step sampler 0.010
    vs 0.178 nm (the frozen score saw only the 240 warm-up steps); the Jacobian costs twice as much
    with two (``benchmarks/boltzmann.py``, ``network_costs``). Both are far from converged at this
    size (reference bond spread 0.003 nm), so the choice rests on cost and on the score getting
    every step's DSM items; ``--compare-networks`` repeats the comparison at any size.
    ``eta``: noise scale of the reverse SDE family (1: the usual reverse SDE, 0: the probability-flow
    ODE). The default is small because path-conditional importance weights lose efficiency with the
    noise the path carries: for fixed ξ the map's output varies with z only by the part of the
    output's spread the path does not carry, so even for a *perfect* map Var(log w) grows with η² in
    every dimension. For a unit-variance Gaussian direction (score -y) the map contracts z by
    c = exp(-η² ∫σ² dλ) (∫σ² dλ = 6.0 for the default schedule), the path-conditional density has
    variance c², and the weights' variance is infinite once c² < 1/2, i.e. η > 0.24.
    Measured (``benchmarks/boltzmann.py``, η scan in ``benchmarks/results/boltzmann_cpu.json``:
    the *exact* denoiser of a Gaussian-mixture toy, 32 steps, 300 samples): ESS/N = 0.30, 0.31,
    0.24, 0.09, 0.025, 0.005, 0.003 at η = 0, 0.01, 0.02, 0.05, 0.1, 0.3, 1 in 62 dimensions (20
    stiff ones, like bonds), 0.95 / 0.76 / 0.11 at η = 0 / 0.1 / 1 in 2-D. η = 0.01 keeps a genuine SDE (the issue's) at no measurable ESS cost; ``eta = 0`` is
    allowed.
    """

    n_features: int = 64
    n_layers: int = 3
    n_rbf: int = 16
    cutoff_nm: float = 1.2
    n_coefficients: int = 3
    n_latent: int = 2  # latent vectors per atom per step (the first feeds the exact OU remainder)
    networks: int = 1
    eta: float = 0.01
    lambda_noise: float = -6.0
    lambda_data: float = 5.75

    def __post_init__(self):
        if self.networks not in (1, 2):
            raise InputError(f"networks must be 1 or 2, not {self.networks!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise InputError(f"eta must lie in [0, 1], not {self.eta}")
        if self.n_latent < 1:
            raise InputError("n_latent must be >= 1 (the first latent feeds the noise remainder)")
        if not self.lambda_data > self.lambda_noise:
            raise InputError("lambda_data must exceed lambda_noise")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BoltzmannConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class VPSchedule:
    """α_t, σ_t of the VP process in the log-SNR-uniform clock t ∈ [0, 1] (t = 0: noise, 1: data)."""

    def __init__(self, lambda_noise: float = -6.0, lambda_data: float = 5.75):
        self.lambda_noise, self.lambda_data = float(lambda_noise), float(lambda_data)
        self.Lambda = self.lambda_data - self.lambda_noise

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        return self.lambda_noise + self.Lambda * t

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(2.0 * self.lam(t)).sqrt()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-2.0 * self.lam(t)).sqrt()

    def step_coefficients(self, t_a: torch.Tensor, t_b: torch.Tensor, n_coefficients: int, eta: float
                          ) -> dict[str, torch.Tensor]:
        """Coefficients of the exact frozen-denoiser step t_a -> t_b (module docstring), float64.

        Returns ``phi`` (B,), ``kappa`` (B,), ``c`` (B, N) (mean of the noise integral per unit path
        coefficient) and ``r`` (B,) (the std of its remainder given the N coefficients); y_b =
        phi y_a + kappa D + Σ_n c_n L^(n) + r ε_0. At t_b = t_a: phi = 1, the rest 0. Also
        ``alpha_a``, ``sigma_a`` (B,) of the start. (Computed outside any torch.func transform:
        :meth:`BoltzmannMap.step` takes them precomputed.)
        """
        ta = t_a.detach().to(torch.float64).reshape(-1)
        tb = t_b.detach().to(torch.float64).reshape(-1)
        h = (tb - ta).clamp_min(0.0)
        lam_ = self.Lambda
        sa, sb, ab = self.sigma(ta), self.sigma(tb), self.alpha(tb)
        e2 = eta * eta
        out = {"phi": sb / sa * torch.exp(-e2 * lam_ * h), "kappa": -ab * torch.expm1(-(1.0 + e2) * lam_ * h),
               "alpha_a": self.alpha(ta), "sigma_a": sa}
        n = int(n_coefficients)
        if eta == 0.0:
            out["c"] = torch.zeros(ta.shape[0], n, dtype=torch.float64, device=ta.device)
            out["r"] = torch.zeros_like(ta)
            return out
        uniq, inv = torch.unique(h, return_inverse=True)
        o = free_langevin_conditional(uniq, e2 * lam_, max(n, 1))
        scale = eta * math.sqrt(2.0 * lam_) * sb
        cv = o["cv"][inv][:, :n] if n else torch.zeros(ta.shape[0], 0, dtype=torch.float64, device=ta.device)
        resid = torch.sqrt(o["chol"][:, 1, 0] ** 2 + o["chol"][:, 1, 1] ** 2)[inv]
        if n == 0:  # nothing resolved: the whole integral is the remainder
            resid = torch.sqrt(-torch.expm1(-2.0 * e2 * lam_ * h) / (2.0 * e2 * lam_))
        out["c"] = scale[:, None] * cv
        out["r"] = scale * resid
        return out


def sde_step(y: torch.Tensor, denoised: torch.Tensor, L: torch.Tensor, eps0: torch.Tensor,
             coeffs: dict[str, torch.Tensor]) -> torch.Tensor:
    """y_b = phi y + kappa D + Σ_n c_n L^(n) + r eps0 for any state shape: y, D, eps0 (B, *S),
    L (B, N, *S); coefficients from :meth:`VPSchedule.step_coefficients` (cast to y's dtype)."""
    dt = y.dtype
    ext = (1,) * (y.ndim - 1)
    phi = coeffs["phi"].to(dt).reshape(-1, *ext)
    kappa = coeffs["kappa"].to(dt).reshape(-1, *ext)
    out = phi * y + kappa * denoised
    if L.shape[1] and coeffs["c"].shape[1]:
        n = coeffs["c"].shape[1]
        out = out + torch.einsum("bn,bn...->b...", coeffs["c"].to(dt), L[:, :n])
    return out + coeffs["r"].to(dt).reshape(-1, *ext) * eps0


class BoltzmannMap(nn.Module):
    """The few-step map of the reverse VP SDE on centred positions (module docstring).

    ``scalars`` (A, S), ``edges`` (A, A, E): atom and bonded-pair features
    (:func:`molflow.models.molecular.atom_features`); ``scale_nm`` s: positions are y = x/s.
    ``pair_mean``, ``pair_std`` (A, A) nm: the training frames' mean and spread of the distances of
    bonded and 1-3 pairs (zero elsewhere). The network sees each such pair's deviation
    (d - α_t μ)/sqrt(α_t² s_pair² + 2 σ_t² s²) — O(1) at every noise level, and at the data end the
    bond-length fluctuation in units of its thermal spread, a scale (~0.003 nm) the radial basis
    alone does not resolve; soft-clamped to ±``PAIR_CLAMP`` (unbounded inputs made the
    multiplicative PaiNN updates overflow on distorted geometries: measured, a 16-step sample went
    from |F| ~ 4 to 1e17 in one step).
    """

    def __init__(self, scalars: np.ndarray, edges: np.ndarray, scale_nm: float, config: BoltzmannConfig,
                 pair_mean: np.ndarray | None = None, pair_std: np.ndarray | None = None):
        super().__init__()
        self.config = config
        self.schedule = VPSchedule(config.lambda_noise, config.lambda_data)
        dtype = torch.get_default_dtype()
        self.register_buffer("scalars", torch.as_tensor(scalars, dtype=dtype))
        self.register_buffer("edges", torch.as_tensor(edges, dtype=dtype).unsqueeze(0))
        self.register_buffer("scale", torch.tensor(float(scale_nm), dtype=dtype))
        A = scalars.shape[0]
        pm = np.zeros((A, A)) if pair_mean is None else np.asarray(pair_mean)
        ps = np.ones((A, A)) if pair_std is None else np.asarray(pair_std)
        self.register_buffer("pair_mean", torch.as_tensor(pm, dtype=dtype))
        self.register_buffer("pair_std", torch.as_tensor(np.where(pm > 0, ps, 1.0), dtype=dtype))
        self.register_buffer("pair_mask", torch.as_tensor(pm > 0, dtype=dtype))
        c = config
        n_vec = 1 + c.n_coefficients + c.n_latent
        kw = dict(n_edge=edges.shape[-1] + 1, n_vector_out=1, n_features=c.n_features, n_layers=c.n_layers,
                  n_rbf=c.n_rbf, cutoff_nm=c.cutoff_nm)
        self.net = PaiNN(n_scalar_in=scalars.shape[1] + 4, n_vector_in=n_vec, **kw)
        self.score_net = None
        if c.networks == 2:
            self.score_net = PaiNN(n_scalar_in=scalars.shape[1] + 4, n_vector_in=1, **kw)
            nn.init.zeros_(self.net.out.mix.weight)  # the correction starts at zero: the map starts as DDIM(η)

    # ------------------------------------------------------------------ sizes
    @property
    def n_atoms(self) -> int:
        return self.scalars.shape[0]

    @property
    def latent_dim(self) -> int:
        """Flat latent size k·A·3 (for :class:`molflow.flowmap.ComposedFlowMap`)."""
        return self.config.n_latent * self.n_atoms * 3

    def latent_fn(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fresh latents (batch, k, A, 3), drawn on the generator's device, centred."""
        dev = generator.device if generator is not None else self.scale.device
        eps = torch.randn(batch, self.config.n_latent, self.n_atoms, 3, generator=generator, device=dev,
                          dtype=self.scale.dtype).to(self.scale.device)
        return centre(eps)

    # ------------------------------------------------------------------ network
    def _scalars(self, B: int, t_a: torch.Tensor, t_b: torch.Tensor, dtype) -> torch.Tensor:
        h = (t_b - t_a).to(dtype)
        feats = torch.stack([t_a.to(dtype), t_b.to(dtype), h, torch.log(h + 1e-3) / 7.0], -1)  # (B, 4)
        return torch.cat([self.scalars.to(dtype).expand(B, -1, -1), feats[:, None, :].expand(B, self.n_atoms, 4)], -1)

    def _pair_deviation(self, x_nm: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, A, A, 1): noise-aware deviation of bonded and 1-3 distances from the data (docstring)."""
        dt = x_nm.dtype
        a = self.schedule.alpha(t.double()).to(dt)[:, None, None]
        sg = self.schedule.sigma(t.double()).to(dt)[:, None, None]
        d = torch.sqrt(((x_nm.unsqueeze(1) - x_nm.unsqueeze(2)) ** 2).sum(-1) + 1e-12)
        spread = torch.sqrt(a * a * self.pair_std.to(dt) ** 2 + 2.0 * sg * sg * self.scale.to(dt) ** 2)
        dev = (d - a * self.pair_mean.to(dt)) / spread
        dev = dev * torch.rsqrt(1.0 + (dev / PAIR_CLAMP) ** 2)  # soft clamp to ±PAIR_CLAMP
        return (dev * self.pair_mask.to(dt)).unsqueeze(-1)

    def _net(self, net: PaiNN, y: torch.Tensor, t_a, t_b, vectors: torch.Tensor) -> torch.Tensor:
        B = y.shape[0]
        x = y * self.scale.to(y.dtype)
        edges = torch.cat([self.edges.to(y.dtype).expand(B, -1, -1, -1), self._pair_deviation(x, t_a)], -1)
        out = net(x, self._scalars(B, t_a, t_b, y.dtype), vectors, edges)[:, :, 0]
        return centre(out)

    def score_output(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """F(y, t) of the SDE's denoiser D = α y + σ F (the zero-step limit): (B, A, 3)."""
        if self.score_net is not None:
            return self._net(self.score_net, y, t, t, y.unsqueeze(2))
        B, A = y.shape[:2]
        c = self.config
        zeros = torch.zeros(B, A, c.n_coefficients + c.n_latent, 3, dtype=y.dtype, device=y.device)
        return self._net(self.net, y, t, t, torch.cat([y.unsqueeze(2), zeros], 2))

    def step_output(self, y: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, L: torch.Tensor,
                    eps: torch.Tensor) -> torch.Tensor:
        """F_θ(y, t_a, t_b, L̂, ε) of one map step: (B, A, 3)."""
        c = self.config
        h = (t_b - t_a).to(y.dtype).clamp_min(1e-12)
        n = c.n_coefficients
        k = (2.0 * torch.arange(n, dtype=y.dtype, device=y.device) + 1.0)
        Lhat = L[:, :n] * torch.rsqrt(h[:, None] / k[None, :])[:, :, None, None]
        vectors = torch.cat([y.unsqueeze(2), Lhat.transpose(1, 2), eps.transpose(1, 2)], 2)
        out = self._net(self.net, y, t_a, t_b, vectors)
        if self.score_net is not None:
            out = out + self.score_output(y, t_a)
        return out

    # ------------------------------------------------------------------ steps
    def coefficients(self, t_a: torch.Tensor, t_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`VPSchedule.step_coefficients` of this map's SDE (float64)."""
        return self.schedule.step_coefficients(t_a, t_b, self.config.n_coefficients, self.config.eta)

    def step(self, y: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, L: torch.Tensor, eps: torch.Tensor,
             score_only: bool = False, coeffs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One step t_a -> t_b ((B,) or (1,)) of centred scaled positions y (B, A, 3).

        ``score_only``: the SDE's own exponential-integrator step (denoiser frozen at the start,
        no dependence on the step beyond the exact coefficients): the fine solver of the local loss.
        ``coeffs``: :meth:`coefficients` of (t_a, t_b), precomputed (needed under torch.func).
        """
        B, A = y.shape[:2]
        eps = centre(eps.reshape(B, self.config.n_latent, A, 3))
        L = centre(L)
        t_a = t_a.to(y.dtype).reshape(-1).expand(B)
        t_b = t_b.to(y.dtype).reshape(-1).expand(B)
        if coeffs is None:
            coeffs = self.coefficients(t_a, t_b)
        sa = coeffs["sigma_a"].to(y.dtype).reshape(-1, 1, 1)
        aa = coeffs["alpha_a"].to(y.dtype).reshape(-1, 1, 1)
        f = self.score_output(y, t_a) if score_only else self.step_output(y, t_a, t_b, L, eps)
        return sde_step(y, aa * y + sa * f, L, eps[:, 0], coeffs)

    def forward(self, z: torch.Tensor, L: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Packed state z (B, A+1, 3) -> the state τ later (the generic flow-map call)."""
        A = self.n_atoms
        y, t = z[:, :A], z[:, A, 0]
        tb = t + tau.to(z.dtype)
        yb = self.step(y, t, tb, L, eps)
        trow = torch.zeros_like(z[:, A:])
        trow[:, 0, 0] = tb
        return torch.cat([yb, trow], 1)

    def grid_coefficients(self, grid: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Step coefficients of consecutive grid times (K+1,) -> K dicts of (1,) tensors."""
        g = grid.detach().double().reshape(-1)
        return [self.coefficients(g[k:k + 1], g[k + 1:k + 2]) for k in range(len(g) - 1)]

    def run(self, y0: torch.Tensor, path: list[tuple[torch.Tensor, torch.Tensor]], grid: torch.Tensor,
            coeffs: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """K map steps on ``grid`` (K+1 times from 0 to 1) with a fixed path: ``path[k] = (L_k, eps_k)``
        (``coeffs``: :meth:`grid_coefficients`, precomputed under torch.func)."""
        coeffs = coeffs or self.grid_coefficients(grid)
        y = y0
        for k, (L, eps) in enumerate(path):
            y = self.step(y, grid[k:k + 1], grid[k + 1:k + 2], L, eps, coeffs=coeffs[k])
        return y


class ScoreSolver(nn.Module):
    """The SDE's own exponential-integrator step of a :class:`BoltzmannMap` (``score_only``), as a
    flow-map module (for :class:`molflow.flowmap.ComposedFlowMap`: fine local-loss targets)."""

    def __init__(self, model: BoltzmannMap):
        super().__init__()
        self.model = model
        self.latent_dim = model.latent_dim

    def forward(self, z, L, eps, tau):
        A = self.model.n_atoms
        y, t = z[:, :A], z[:, A, 0]
        tb = t + tau.to(z.dtype)
        yb = self.model.step(y, t, tb, L, eps, score_only=True)
        trow = torch.zeros_like(z[:, A:])
        trow[:, 0, 0] = tb
        return torch.cat([yb, trow], 1)


def pack(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, A, 3) positions and (B,) times -> packed state (B, A+1, 3)."""
    trow = torch.zeros(y.shape[0], 1, 3, dtype=y.dtype, device=y.device)
    trow[:, 0, 0] = t.to(y.dtype)
    return torch.cat([y, trow], 1)
