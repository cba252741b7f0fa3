"""A toy with an analytically known Boltzmann density, for tests and the η scan of the benchmark.

π(x) ∝ exp(-U(x)/kT) with kT = 1 is a mixture of Gaussians with diagonal covariances in d
dimensions, so everything the sampler needs is exact and cheap: the VP marginals are mixtures
again, the denoiser E[x_0 | y_t] is analytic, and the moments the weighted estimates must reproduce
are closed-form. The few-step map is the same exponential-integrator step of the reverse SDE as the
molecular map (:func:`molflow.boltzmann.model.sde_step`, same schedule and path algebra) driven by
the denoiser of a *chosen* mixture — the true one (the map is then only as wrong as its K steps), or
a deliberately wrong one.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import norm

from ..flowmap import sample_coefficients_torch
from .model import VPSchedule, sde_step


class GaussianMixture:
    """π(x) = Σ_k w_k N(x; μ_k, diag(s_k²)); ``weights`` (k,), ``means``, ``stds`` (k, d); float64."""

    def __init__(self, weights, means, stds):
        self.w = torch.as_tensor(np.asarray(weights, dtype=np.float64) / np.sum(weights))
        self.mu = torch.as_tensor(np.asarray(means, dtype=np.float64))
        self.s = torch.as_tensor(np.asarray(stds, dtype=np.float64))
        self.dim = self.mu.shape[1]

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log π(x) (normalised) of (..., d)."""
        return self._log_mix(x, self.mu, self.s)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """U(x)/kT = -log π(x) (up to nothing: π is normalised)."""
        return -self.log_density(x)

    def _log_mix(self, y, mu, s):
        z = (y[..., None, :] - mu) / s  # (..., k, d)
        comp = -0.5 * (z * z).sum(-1) - torch.log(s).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return torch.logsumexp(comp + torch.log(self.w), -1)

    def denoiser(self, y: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x_0 | y_t = y] for y_t = α x_0 + σ ε: (..., d); α, σ broadcast against y[..., :1]."""
        a = alpha[..., None, None]
        sg = sigma[..., None, None]
        v = a * a * self.s * self.s + sg * sg  # (..., k, d)
        z = (y[..., None, :] - a * self.mu) / v.sqrt()
        logr = -0.5 * (z * z).sum(-1) - 0.5 * torch.log(v).sum(-1) + torch.log(self.w)
        r = torch.softmax(logr, -1)[..., None]  # (..., k, 1)
        post = self.mu + a * self.s * self.s / v * (y[..., None, :] - a * self.mu)
        return (r * post).sum(-2)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.choice(len(self.w), size=n, p=self.w.numpy())
        return self.mu.numpy()[k] + self.s.numpy()[k] * rng.standard_normal((n, self.dim))

    def moments(self) -> dict[str, float]:
        """Exact E[x_1], E[x_1²], P(x_1 > 0) under π."""
        w, m, s = self.w.numpy(), self.mu.numpy()[:, 0], self.s.numpy()[:, 0]
        return {"mean_x1": float(w @ m), "second_moment_x1": float(w @ (m * m + s * s)),
                "p_x1_positive": float(w @ norm.cdf(m / s))}

    def perturbed(self, delta: float, rng_seed: int = 0) -> "GaussianMixture":
        """A deliberately wrong mixture: means shifted by δ·(a fixed random unit direction per
        component), weights tilted by e^{±δ} (alternating), stds inflated by e^{0.5δ} — wider than the
        truth, so that a map built on it covers π's tails and the weights have finite variance."""
        rng = np.random.default_rng(rng_seed)
        k, d = self.mu.shape
        shift = rng.standard_normal((k, d))
        shift /= np.linalg.norm(shift, axis=1, keepdims=True)
        wt = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)
        return GaussianMixture(self.w.numpy() * np.exp(delta * wt), self.mu.numpy() + delta * shift,
                               self.s.numpy() * np.exp(0.5 * delta))


def double_well_2d() -> GaussianMixture:
    """The 2-D test density: two unequal, anisotropic wells (x_1 bimodal, x_2 correlated in scale)."""
    return GaussianMixture([0.65, 0.35], [[-1.0, 0.3], [1.3, -0.4]], [[0.45, 0.8], [0.3, 0.5]])


def stiff_toy(dim: int, n_stiff: int) -> GaussianMixture:
    """d dimensions like a molecule: a bimodal first coordinate, soft ones, and ``n_stiff`` stiff
    ones (std 0.02 — a bond beside a torsion when the data have unit scale)."""
    base = double_well_2d()
    mu = np.zeros((2, dim))
    s = np.ones((2, dim)) * 0.7
    mu[:, :2] = base.mu.numpy()
    s[:, :2] = base.s.numpy()
    s[:, dim - n_stiff:] = 0.02
    return GaussianMixture(base.w.numpy(), mu, s)


def draw_path(batch: int, steps: int, n_coefficients: int, dim: int, generator: torch.Generator | None = None):
    """Base noise z (B, d), path coefficients L (B, K, N, d) of each step of 1/K, latents (B, K, d)."""
    z = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    tau = torch.full((batch * steps,), 1.0 / steps, dtype=torch.float64)
    L = sample_coefficients_torch(tau, n_coefficients, (dim,), generator).reshape(batch, steps, n_coefficients, dim)
    eps = torch.randn(batch, steps, dim, generator=generator, dtype=torch.float64)
    return z, L, eps


def toy_map(model: GaussianMixture, steps: int, eta: float, n_coefficients: int = 3,
            schedule: VPSchedule | None = None):
    """The K-step map x = T_ξ(z) of the reverse SDE with ``model``'s exact denoiser, per sample:
    ``fn(z (d,), L (K, N, d), eps (K, d)) -> x (d,)`` (works under torch.func and on batches)."""
    sch = schedule or VPSchedule()
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    coeffs = [sch.step_coefficients(grid[k:k + 1], grid[k + 1:k + 2], n_coefficients, eta) for k in range(steps)]

    def fn(z, L, eps):
        y = z.unsqueeze(0) if z.ndim == 1 else z
        Lb = L.unsqueeze(0) if L.ndim == 3 else L
        eb = eps.unsqueeze(0) if eps.ndim == 2 else eps
        for k in range(steps):
            c = coeffs[k]
            d = model.denoiser(y, c["alpha_a"], c["sigma_a"])
            y = sde_step(y, d, Lb[:, k], eb[:, k], c)
        return y[0] if z.ndim == 1 else y

    return fn
