"""Exact importance weights for a map of Gaussian noise (DESIGN.md section 6), generic in the map.

For a map x = T_ξ(z) that, for a fixed auxiliary input ξ (the Brownian path and latents of a
few-step SDE map), is a bijection of its input z ~ N(0, I_d), the density of x given ξ is
N(z) / |det ∂T_ξ/∂z|, so

    log w = -U(x)/kT + log|det ∂T_ξ/∂z| - log N(z)

is an importance weight for exp(-U/kT) on the joint space of (x, ξ): the target p(ξ) π(x) against
the proposal p(ξ) q(x | ξ). Self-normalised expectations Σ w f(x) / Σ w are consistent for π
whatever the model error, provided T_ξ is injective and onto the support of π. Nothing here
knows molecules: ``fn`` is any torch function of one flat sample.

- :func:`jacobian_and_value`: the exact Jacobian (d x d) of ``fn`` at every sample, batched with
  ``torch.func`` (``vmap`` of ``jacrev``) — use float64;
- :func:`inverse_iteration`, :func:`invertibility_check`: an inverse by fixed-point iteration,
  z <- z - H (T(z) - x) with H = J⁻¹ at the sample refined by Broyden updates, started away from
  the sample; the weight is kept as exact only where it returns to the start (a finite-radius
  check, not a proof of global injectivity: an iteration that lands on another preimage proves a
  fold, one that does not converge is counted as a failure too);
- :func:`self_normalise`, :func:`kish_ess`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.func import jacrev, vmap

from ..evaluation.metrics import kish_ess  # noqa: F401  (part of this module's reweighting API)


def gaussian_log_density(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I_d) of flat samples (B, d)."""
    d = z.shape[-1]
    return -0.5 * (z * z).sum(-1) - 0.5 * d * math.log(2.0 * math.pi)


def jacobian_and_value(fn: Callable, z: torch.Tensor, *args: torch.Tensor, chunk: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(J (B, d_out, d), T(z) (B, d_out)) of ``fn(z_i, *args_i)`` for flat samples ``z`` (B, d).

    ``fn`` takes one sample (d,) and its per-sample arguments and returns (d_out,); reverse mode,
    batched over samples with ``vmap`` (``chunk``: samples per vmapped call, bounds memory).
    """
    def both(zz, *aa):
        out = fn(zz, *aa)
        return out, out

    jf = vmap(jacrev(both, has_aux=True))
    B = z.shape[0]
    step = B if not chunk else int(chunk)
    js, vs = [], []
    for s in range(0, B, step):
        j, v = jf(z[s:s + step], *[a[s:s + step] for a in args])
        js.append(j)
        vs.append(v)
    return torch.cat(js), torch.cat(vs)


def logabsdet(jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log|det J| (B,), smallest singular value (B,)); non-finite Jacobians give NaN."""
    finite = torch.isfinite(jac).flatten(1).all(1)
    safe = torch.where(finite[:, None, None], jac, torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device))
    _, lad = torch.linalg.slogdet(safe)
    smin = torch.linalg.svdvals(safe)[:, -1]
    nan = torch.full_like(lad, float("nan"))
    return torch.where(finite, lad, nan), torch.where(finite, smin, nan)


def inverse_iteration(fn: Callable, x: torch.Tensor, z_start: torch.Tensor, jac: torch.Tensor, *args: torch.Tensor,
                      n_iter: int = 40, tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve T(z) = x by the fixed-point iteration z <- z - H (T(z) - x) from ``z_start`` (B, d).

    H starts as J⁻¹ (``jac``: the Jacobian at the sample) and is refined by Broyden's ("good")
    rank-one updates from the steps taken, so the iteration can also reach a preimage where the
    Jacobian differs (e.g. the other side of a fold); its fixed points are exactly the preimages of
    x. A step that does not reduce |T(z) - x| is retried at half length (per sample; a sample stops
    once its step falls below 1e-4 or its residual below ``tol``). Only forward evaluations of
    ``fn`` (vmapped over samples) are used. Returns (z, |T(z) - x|); NaN residuals where the
    Jacobian is not finite.
    """
    fb = vmap(fn)
    finite = torch.isfinite(jac).flatten(1).all(1)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    safe = torch.where(finite[:, None, None], jac, eye)
    H = torch.linalg.pinv(safe)  # = J⁻¹ where J is invertible; finite where it is singular
    z = z_start.clone()
    with torch.no_grad():
        r = fb(z, *args) - x
        res = r.norm(dim=-1)
        step = torch.ones_like(res)
        for _ in range(int(n_iter)):
            todo = torch.nonzero((res >= tol) & torch.isfinite(res) & (step > 1e-4)).reshape(-1)
            if todo.numel() == 0:
                break
            dz = -step[todo, None] * (H[todo] @ r[todo].unsqueeze(-1)).squeeze(-1)
            z_new = z[todo] + dz
            r_new = fb(z_new, *[a[todo] for a in args]) - x[todo]
            res_new = r_new.norm(dim=-1)
            fin = torch.isfinite(res_new)
            better = fin & (res_new < res[todo])
            # Broyden update from every finite trial (accepted or not: the secant holds either way)
            s_ = dz.unsqueeze(-1)  # (n, d, 1)
            y_ = torch.where(fin[:, None], r_new - r[todo], torch.zeros_like(r_new)).unsqueeze(-1)
            Hy = H[todo] @ y_
            den = (s_.transpose(1, 2) @ Hy).squeeze(-1).squeeze(-1)
            good = fin & (den.abs() > 1e-12 * (s_.norm(dim=1) * Hy.norm(dim=1)).squeeze(-1))
            upd = ((s_ - Hy) @ (s_.transpose(1, 2) @ H[todo])) / torch.where(good, den, torch.ones_like(den))[:, None, None]
            H[todo] = H[todo] + torch.where(good[:, None, None], upd, torch.zeros_like(upd))
            idx = todo[better]
            z[idx], r[idx], res[idx] = z_new[better], r_new[better], res_new[better]
            step[idx] = torch.clamp(step[idx] * 2.0, max=1.0)
            step[todo[~better]] *= 0.5
    return z, torch.where(finite, res, torch.full_like(res, float("nan")))


#: outcomes of :func:`invertibility_check` (``status``)
INVERSE_OK, INVERSE_SINGULAR, INVERSE_OTHER_PREIMAGE, INVERSE_NOT_CONVERGED = 0, 1, 2, 3
#: a sample of the internal-coordinate sampler outside its Z-matrix's domain (an angle outside (0, π),
#: a bond <= 0, a stiff torsion off its mean by more than π), where the map is not injective
INVERSE_OUTSIDE_DOMAIN = 4


def invertibility_check(fn: Callable, z: torch.Tensor, x: torch.Tensor, jac: torch.Tensor, *args: torch.Tensor,
                        radius: float = 0.1, generator: torch.Generator | None = None, n_iter: int = 40,
                        tol: float = 1e-6, min_singular: float = 1e-12) -> dict[str, torch.Tensor]:
    """Per sample: does the fixed-point inverse, started ``radius`` away from z in a random direction,
    return to z?

    ``status``: 0 it does (``ok``); 1 the Jacobian is non-finite or numerically singular (smallest
    singular value <= ``min_singular``); 2 it converged (|T(z') - x| < 1e-8 (1 + |x|)) to *another*
    preimage z' — the map is proven not injective there; 3 it did not converge (inconclusive: the
    iteration stalls where the Jacobian changes too much over ``radius``). ``tol``: the allowed
    |z' - z| / (1 + |z|). Returns ``ok``, ``status``, ``distance``, ``residual``, ``smallest_singular``.
    """
    d = z.shape[-1]
    u = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=generator.device if generator else z.device)
    u = u.to(z.device)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    z_found, res = inverse_iteration(fn, x, z + radius * u, jac, *args, n_iter=n_iter, tol=1e-12 * math.sqrt(d))
    dist = (z_found - z).norm(dim=-1) / (1.0 + z.norm(dim=-1))
    _, smin = logabsdet(jac)
    converged = torch.isfinite(res) & (res < 1e-8 * (1.0 + x.norm(dim=-1)))
    status = torch.full(z.shape[:1], INVERSE_NOT_CONVERGED, dtype=torch.int64, device=z.device)
    status[converged & ~(dist < tol)] = INVERSE_OTHER_PREIMAGE
    status[torch.isfinite(dist) & (dist < tol)] = INVERSE_OK
    status[~(torch.isfinite(smin) & (smin > min_singular))] = INVERSE_SINGULAR
    return {"ok": status == INVERSE_OK, "status": status, "distance": dist, "residual": res,
            "smallest_singular": smin}


def boltzmann_log_weights(energy_over_kT, log_det, log_base, *keep_masks) -> tuple[np.ndarray, np.ndarray]:
    """log w = -U/kT + log|det J| - log ρ0 per sample, and the keep mask.

    A sample is kept where every mask in ``keep_masks`` holds (e.g. chirality ok, invertible) and its
    log-weight is finite (a NaN energy is not); log w is -inf where it is not kept. Returns
    ``(log_w, keep)`` (float64, bool).
    """
    lw = -np.asarray(energy_over_kT, dtype=np.float64) + np.asarray(log_det, dtype=np.float64) \
        - np.asarray(log_base, dtype=np.float64)
    keep = np.isfinite(lw)
    for m in keep_masks:
        keep &= np.asarray(m, dtype=bool)
    return np.where(keep, lw, -np.inf), keep


def self_normalise(log_w: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Weights summing to 1 from log-weights; zero where ``keep`` is False or log w is not finite
    (NaN included). All zeros when nothing is left."""
    lw = np.asarray(log_w, dtype=np.float64)
    ok = np.isfinite(lw) if keep is None else np.isfinite(lw) & np.asarray(keep, dtype=bool)
    w = np.zeros_like(lw)
    if ok.any():
        w[ok] = np.exp(lw[ok] - lw[ok].max())
        w /= w.sum()
    return w


