"""Additive-noise SDEs on torch, a fine reference solver driven by recorded noise, and toy SDEs.

An additive-noise SDE here is

    dz = b(z, t) dt + G dW_t ,      G = the columns of diag(g) at the coordinates where g != 0,

with a drift ``b`` (a torch callable on a state batch (B, d)) and a constant per-coordinate noise
scale ``g`` (d,) whose zeros mark noise-free coordinates.  The Brownian motion W has one component
per noisy coordinate (m = number of non-zero entries of g), in the order of those coordinates.
Underdamped Langevin dynamics is the case z = (x, v) (d = 2n), noise on v only:

    dx = v dt ,    dv = (F(x)/m - γ v) dt + sqrt(2 γ kT / m) dW      (W: n components).

Units.  The molecular code uses ps, nm, amu, kJ/mol; the toy SDEs below have *arbitrary* time
units (the same "time unit" everywhere: dt, τ, 1/γ, 1/ω), path coefficients in sqrt(time unit),
kT = 1 energy unit and unit masses unless given.

Reference solutions share the Brownian path with the learned map: :func:`fine_solve` takes the
per-step standard Gaussians ``xi`` (K, B, m) (ΔW_k = sqrt(dt) ξ_k), so the path coefficients of
the same K steps are :func:`path_coefficients` (``xi``) = ``brownian.coefficients_from_noise``
(with the coefficient axis moved to position 1: (B, N, m)).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from . import brownian as _B

__all__ = [
    "AdditiveSDE",
    "LangevinSDE",
    "fine_solve",
    "path_coefficients",
    "simulate_with_coefficients",
    "double_well_overdamped",
    "underdamped_langevin",
    "harmonic_langevin",
    "mixed_mode_toy",
    "free_langevin_conditional",
]


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x,
                           dtype=torch.float64)


class AdditiveSDE:
    """dz = b(z, t) dt + G dW with constant per-coordinate noise scale g (d,), zeros = no noise.

    ``drift(z, t) -> (B, d)`` for ``z`` (B, d) and a float time ``t``.  ``noise_scale`` g (d,)
    [state unit / sqrt(time unit)].  ``info`` holds toy-specific facts (stationary variances,
    potentials, mixing matrices, ...).  ``default_scheme`` is the fine solver used by
    :func:`fine_solve` when none is named ("em": Euler–Maruyama).
    """

    default_scheme = "em"

    def __init__(self, drift: Callable, noise_scale, name: str = "sde", info: dict | None = None):
        self._drift = drift
        g = _as64(noise_scale).reshape(-1)
        self.noise_scale = g
        self.noise_index = torch.nonzero(g != 0).reshape(-1)
        if self.noise_index.numel() == 0:
            raise ValueError("an SDE needs at least one noisy coordinate (all of g is zero)")
        self.name = name
        self.info = dict(info or {})

    @property
    def dim(self) -> int:
        """d, the state dimension."""
        return int(self.noise_scale.numel())

    @property
    def noise_dim(self) -> int:
        """m, the number of Brownian components (= noisy coordinates)."""
        return int(self.noise_index.numel())

    def drift(self, z: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        return self._drift(z, t)

    def diffusion_matrix(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """G (d, m): column j is g at noisy coordinate j, zero elsewhere."""
        gmat = torch.zeros(self.dim, self.noise_dim, dtype=torch.float64)
        gmat[self.noise_index, torch.arange(self.noise_dim)] = self.noise_scale[self.noise_index]
        return gmat.to(dtype=dtype, device=device)

    def noise_to_state(self, w: torch.Tensor) -> torch.Tensor:
        """G w for Brownian-space vectors ``w`` (..., m) -> (..., d)."""
        g = self.noise_scale[self.noise_index].to(dtype=w.dtype, device=w.device)
        out = torch.zeros(w.shape[:-1] + (self.dim,), dtype=w.dtype, device=w.device)
        out[..., self.noise_index.to(w.device)] = w * g
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, d={self.dim}, m={self.noise_dim})"


class LangevinSDE(AdditiveSDE):
    """Underdamped Langevin dynamics in (x, v) form: z = cat(x, v), d = 2n, m = n.

    ``force(x) -> (B, n)`` [energy / length], ``masses`` (n,), friction ``gamma`` [1/time],
    ``kT`` [energy].  Noise scale on v: sqrt(2 γ kT / m).  Fine solver: BAOAB (as the engine).
    """

    default_scheme = "baoab"

    def __init__(self, force: Callable, masses, gamma: float, kT: float, name: str = "langevin",
                 potential: Callable | None = None, info: dict | None = None):
        masses = _as64(masses).reshape(-1)
        n = masses.numel()
        self.n_dof = int(n)
        self.masses = masses
        self.gamma = float(gamma)
        self.kT = float(kT)
        self.force = force
        self.potential = potential
        sigma = torch.sqrt(2.0 * self.gamma * self.kT / masses)
        g = torch.cat([torch.zeros(n, dtype=torch.float64), sigma])

        def drift(z, t=0.0):
            x, v = z[:, :n], z[:, n:]
            return torch.cat([v, force(x) / masses.to(z) - self.gamma * v], dim=1)

        super().__init__(drift, g, name=name, info=info)

    @property
    def sigma(self) -> torch.Tensor:
        """sqrt(2 γ kT / m) (n,) [velocity / sqrt(time)]."""
        return self.noise_scale[self.n_dof:]

    def split_state(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z[:, : self.n_dof], z[:, self.n_dof:]


# ----------------------------------------------------------------------------------------------
# Fine solvers driven by recorded per-step noise
# ----------------------------------------------------------------------------------------------
def path_coefficients(xi: torch.Tensor, n_coefficients: int, dt: float) -> torch.Tensor:
    """Coefficients (B, N, *W) of the piecewise-linear path of K steps of ``dt``.

    ``xi``: (K, B, *W) per-step standard Gaussians (ΔW_k = sqrt(dt) ξ_k).  Same numbers as
    ``brownian.coefficients_from_noise`` (whose coefficient axis is leading), in sqrt(time).
    """
    w = torch.as_tensor(_B.legendre_step_weights(n_coefficients, xi.shape[0], dt), dtype=xi.dtype,
                        device=xi.device)
    return torch.einsum("nk,kb...->bn...", w, xi)


def fine_solve(sde: AdditiveSDE, z0: torch.Tensor, dt: float, xi: torch.Tensor, scheme: str | None = None,
               t0: float = 0.0, return_trajectory: bool = False) -> torch.Tensor:
    """Integrate K = ``xi.shape[0]`` steps of ``dt`` from ``z0`` (B, d) with the given noise.

    ``xi`` (K, B, m): per-step standard Gaussians, one per Brownian component.  Schemes:

    * ``"em"`` Euler–Maruyama: z += b(z, t) dt + G sqrt(dt) ξ_k (any additive SDE);
    * ``"baoab"`` (:class:`LangevinSDE` only; the engine's LangevinMiddle splitting with on-step
      velocities): v += dt/2 F/m; x += dt/2 v; v = a v + sqrt((1-a²) kT/m) ξ (a = e^{-γ dt});
      x += dt/2 v; v += dt/2 F(x)/m.  Its O-step noise sqrt((1-a²)kT/m) ξ equals
      sqrt(2γkT/m) ΔW to O(dt), ΔW = sqrt(dt) ξ, as in the engine.

    Returns z_K (B, d), or the trajectory (K+1, B, d) with ``return_trajectory``.
    """
    scheme = scheme or sde.default_scheme
    if xi.ndim != 3 or xi.shape[1] != z0.shape[0] or xi.shape[2] != sde.noise_dim:
        raise ValueError(f"xi must be (K, B={z0.shape[0]}, m={sde.noise_dim}), got {tuple(xi.shape)}")
    xi = xi.to(z0)
    traj = [z0] if return_trajectory else None
    z = z0
    if scheme == "em":
        sq = math.sqrt(dt)
        for k in range(xi.shape[0]):
            z = z + sde.drift(z, t0 + k * dt) * dt + sde.noise_to_state(sq * xi[k])
            if traj is not None:
                traj.append(z)
    elif scheme == "baoab":
        if not isinstance(sde, LangevinSDE):
            raise ValueError("BAOAB needs a LangevinSDE")
        n = sde.n_dof
        m = sde.masses.to(z0)
        a = math.exp(-sde.gamma * dt)
        b = math.sqrt(-math.expm1(-2.0 * sde.gamma * dt))
        vth = torch.sqrt(sde.kT / m)
        x, v = z0[:, :n], z0[:, n:]
        f = sde.force(x)
        for k in range(xi.shape[0]):
            v = v + 0.5 * dt * f / m
            x = x + 0.5 * dt * v
            v = a * v + b * vth * xi[k]
            x = x + 0.5 * dt * v
            f = sde.force(x)
            v = v + 0.5 * dt * f / m
            if traj is not None:
                traj.append(torch.cat([x, v], dim=1))
        z = torch.cat([x, v], dim=1)
    else:
        raise ValueError(f"unknown scheme {scheme!r} (em, baoab)")
    return torch.stack(traj) if traj is not None else z


def simulate_with_coefficients(sde: AdditiveSDE, z0: torch.Tensor, dt: float, steps_per_frame: int,
                               n_frames: int, n_coefficients: int, generator: torch.Generator | None = None,
                               scheme: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference trajectories with the path recorded, like the engine's files.

    Returns ``frames`` (B, F+1, d) (frame 0 = ``z0``; frame interval h0 = steps_per_frame·dt) and
    ``coefficients`` (B, F, N, m): L^(0..N-1) of each frame interval [sqrt(time)], computed from
    the same per-step noise that drove the solver (the exact discrete path).
    """
    frames = [z0]
    coeffs = []
    z = z0
    for f in range(n_frames):
        xi = torch.randn((steps_per_frame, z0.shape[0], sde.noise_dim), generator=generator,
                         dtype=z0.dtype, device=z0.device)
        z = fine_solve(sde, z, dt, xi, scheme=scheme, t0=f * steps_per_frame * dt)
        frames.append(z)
        coeffs.append(path_coefficients(xi, n_coefficients, dt))
    return torch.stack(frames, dim=1), torch.stack(coeffs, dim=1)


# ----------------------------------------------------------------------------------------------
# Exact free-particle / Ornstein–Uhlenbeck part given the path coefficients
# ----------------------------------------------------------------------------------------------
_GL_NODES = 24


def _gauss01_torch(dtype, device):
    y, w = np.polynomial.legendre.leggauss(_GL_NODES)
    return (torch.as_tensor((y + 1.0) / 2.0, dtype=dtype, device=device),
            torch.as_tensor(w / 2.0, dtype=dtype, device=device))


def free_langevin_conditional(tau: torch.Tensor, gamma: float, n_coefficients: int):
    """Exact law of the force-free Langevin step given its path coefficients (continuous law).

    Per degree of freedom, dx = v dt, dv = -γ v dt + σ dW over [0, τ]:

        v_τ = e^{-γτ} v_0 + σ ∫ e^{-γ(τ-u)} dW_u ,
        x_τ = x_0 + φ(τ) v_0 + σ ∫ φ(τ-u) dW_u ,     φ(t) = (1 - e^{-γt})/γ  (= t at γ = 0).

    Given L^(n) = ∫ P_n(u/τ) dW_u (n < N), each stochastic integral ∫ f dW is Gaussian with mean
    Σ_n c_n L^(n), c_n = (2n+1) ∫_0^1 f(τs) P_n(s) ds, and residual covariance
    τ[∫ f f' ds - Σ_n c_n c'_n/(2n+1)] (independent of L).  Integrals by 24-node Gauss–Legendre in
    float64 (agrees with adaptive quadrature to 1e-9 or better for γτ from 0.1 to 40).

    ``tau`` (B,) [time].  Returns a dict of float64 tensors, per unit σ:
    ``decay`` e^{-γτ} (B,), ``phi`` φ(τ) (B,), ``cx``/``cv`` (B, N) [time, 1] (mean of the x and v
    integrals per unit coefficient), ``chol`` (B, 2, 2) lower Cholesky factor of the residual
    covariance of (x-integral, v-integral) [sqrt(time)·(time, 1)].
    """
    tau = tau.to(torch.float64).reshape(-1)
    s, w = _gauss01_torch(torch.float64, tau.device)
    a = gamma * tau  # (B,)
    one_minus = 1.0 - s  # (q,)
    fv = torch.exp(-a[:, None] * one_minus[None, :])  # (B, q)
    if gamma > 0:
        safe_a = torch.where(a > 1e-8, a, torch.ones_like(a))
        fx_small = one_minus[None, :] * (1.0 - 0.5 * a[:, None] * one_minus[None, :])
        fx = torch.where(a[:, None] > 1e-8, -torch.expm1(-a[:, None] * one_minus[None, :]) / safe_a[:, None],
                         fx_small) * tau[:, None]
        phi = torch.where(a > 1e-8, -torch.expm1(-a) / safe_a, 1.0 - 0.5 * a) * tau
    else:
        fx = one_minus[None, :] * tau[:, None]
        phi = tau.clone()
    p = torch.as_tensor(_B.shifted_legendre(n_coefficients - 1, s.cpu().numpy()), dtype=torch.float64,
                        device=tau.device)  # (N, q)
    k = (2.0 * torch.arange(n_coefficients, dtype=torch.float64, device=tau.device) + 1.0)
    cx = (fx * w) @ p.T * k  # (B, N)
    cv = (fv * w) @ p.T * k
    exx = tau * ((fx * fx) @ w - (cx * cx / k).sum(1))
    evv = tau * ((fv * fv) @ w - (cv * cv / k).sum(1))
    exv = tau * ((fx * fv) @ w - (cx * cv / k).sum(1))
    exx = exx.clamp_min(0.0)
    evv = evv.clamp_min(0.0)
    l11 = torch.sqrt(exx)
    l21 = torch.where(l11 > 0, exv / torch.where(l11 > 0, l11, torch.ones_like(l11)), torch.zeros_like(l11))
    l22 = torch.sqrt((evv - l21 * l21).clamp_min(0.0))
    chol = torch.zeros(tau.shape[0], 2, 2, dtype=torch.float64, device=tau.device)
    chol[:, 0, 0] = l11
    chol[:, 1, 0] = l21
    chol[:, 1, 1] = l22
    return {"decay": torch.exp(-a), "phi": phi, "cx": cx, "cv": cv, "chol": chol}


# ----------------------------------------------------------------------------------------------
# Toy SDEs (arbitrary time units; kT = 1 and unit masses unless given)
# ----------------------------------------------------------------------------------------------
def double_well_overdamped(g: float = 0.7) -> AdditiveSDE:
    """dX = (X - X³) dt + g dW (1-D): U(x) = x⁴/4 - x²/2, wells at ±1, barrier 1/4 [energy].

    Stationary density ∝ exp(-2U/g²).  Units arbitrary (time unit; g in length/sqrt(time)).
    """
    g = float(g)

    def drift(z, t=0.0):
        return z - z**3

    xs = np.linspace(-4, 4, 20001)
    dens = np.exp(-2.0 * (xs**4 / 4 - xs**2 / 2) / g**2)
    var = float(np.sum(xs**2 * dens) / np.sum(dens))
    return AdditiveSDE(drift, [g], name=f"double_well_overdamped(g={g})",
                       info={"stationary_var": var, "potential": lambda x: x**4 / 4 - x**2 / 2})


def underdamped_langevin(force: Callable, masses, gamma: float = 1.0, kT: float = 1.0,
                         potential: Callable | None = None, name: str = "langevin",
                         info: dict | None = None) -> LangevinSDE:
    """Underdamped Langevin SDE in (x, v) form (see :class:`LangevinSDE`)."""
    return LangevinSDE(force, masses, gamma, kT, name=name, potential=potential, info=info)


def harmonic_langevin(omega, gamma: float = 1.0, kT: float = 1.0, mass: float = 1.0) -> LangevinSDE:
    """Independent harmonic oscillators U = Σ ½ m ω_i² x_i² (n = len(omega)), Langevin dynamics.

    Period 2π/ω [time].  Stationary law Gaussian: var x = kT/(m ω²), var v = kT/m, independent
    (``info['stationary_var']`` (2n,) in (x, v) order).  A linear SDE, so
    ``info['sample_stationary'](B, generator)`` draws exact stationary states.
    """
    om = _as64(omega).reshape(-1)
    n = om.numel()
    k = mass * om**2

    def force(x):
        return -k.to(x) * x

    def potential(x):
        return 0.5 * (k.to(x) * x * x).sum(-1)

    var = torch.cat([kT / k, torch.full((n,), kT / mass, dtype=torch.float64)])

    def sample_stationary(batch, generator=None, dtype=torch.float64):
        return torch.randn((batch, 2 * n), generator=generator, dtype=dtype) * var.sqrt().to(dtype)

    return LangevinSDE(force, torch.full((n,), float(mass)), gamma, kT, name=f"harmonic(omega={om.tolist()})",
                       potential=potential,
                       info={"omega": om, "stationary_var": var, "sample_stationary": sample_stationary})


def mixed_mode_toy(seed: int = 0, n_modes: int = 16, omega_min: float = 0.5, omega_max: float = 20.0,
                   gamma: float = 1.0, kT: float = 1.0, barrier_scale: float = 2.0) -> LangevinSDE:
    """DESIGN §3.3 / issue #10 toy: 16 harmonic modes and a double well, mixed by a rotation.

    Mode coordinates q (n = n_modes + 1): q_i (i < n_modes) harmonic, U_i = ½ ω_i² q_i² with ω_i
    log-spaced in [omega_min, omega_max] [1/time]; q_last in the double well
    U(q) = barrier_scale·(q² - 1)² (default 2(q²-1)², barrier 2 kT at kT = 1).  Positions
    x = R q with R a fixed random orthogonal matrix (QR of a Gaussian matrix, seed ``seed``), unit
    masses (so the dynamics in q is the same Langevin dynamics, γ = 1, kT = 1 by default).
    ``info``: ``rotation`` R (n, n), ``omega`` (n_modes,), ``to_modes(z)`` -> (q, p) mode
    coordinates (B, 2n), ``stationary_var`` (2n,) of (q, p) in mode coordinates (harmonic:
    kT/ω²; double well: by quadrature; velocities kT), ``well_index`` = n - 1.
    Stiffest period 2π/20 ≈ 0.31 time units: BAOAB needs dt ≲ 0.01.
    """
    rng = np.random.default_rng(seed)
    n = n_modes + 1
    q_mat, r_mat = np.linalg.qr(rng.standard_normal((n, n)))
    q_mat = q_mat * np.sign(np.diag(r_mat))[None, :]
    rot = torch.as_tensor(q_mat, dtype=torch.float64)
    om = torch.as_tensor(np.geomspace(omega_min, omega_max, n_modes), dtype=torch.float64)
    c = float(barrier_scale)

    def mode_force(q):
        fh = -(om.to(q) ** 2) * q[:, :n_modes]
        qw = q[:, n_modes:]
        fw = -4.0 * c * qw * (qw * qw - 1.0)
        return torch.cat([fh, fw], dim=1)

    def force(x):
        r = rot.to(x)
        return mode_force(x @ r) @ r.T  # q = Rᵀx (rows: x @ R); F_x = R F_q

    def potential(x):
        q = x @ rot.to(x)
        return 0.5 * ((om.to(x) ** 2) * q[:, :n_modes] ** 2).sum(-1) + c * (q[:, n_modes] ** 2 - 1.0) ** 2

    def to_modes(z):
        r = rot.to(z)
        return torch.cat([z[:, :n] @ r, z[:, n:] @ r], dim=1)

    qs = np.linspace(-3, 3, 20001)
    dens = np.exp(-c * (qs**2 - 1) ** 2 / kT)
    var_w = float(np.sum(qs**2 * dens) / np.sum(dens))
    var = torch.cat([kT / om**2, torch.tensor([var_w], dtype=torch.float64),
                     torch.full((n,), float(kT), dtype=torch.float64)])
    return LangevinSDE(force, torch.ones(n), gamma, kT, name=f"mixed_mode_toy(seed={seed})", potential=potential,
                       info={"rotation": rot, "omega": om, "to_modes": to_modes, "stationary_var": var,
                             "well_index": n - 1, "barrier_scale": c})
