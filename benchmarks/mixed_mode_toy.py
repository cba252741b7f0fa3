"""Benchmark (issue #10): sample-mode fidelity of latent SSFM maps on the DESIGN §3.3 mixed-mode toy.

    python benchmarks/mixed_mode_toy.py [--size small|full] [--objective NAME|default|all] --out FILE.json

17-dimensional underdamped Langevin toy (``molflow.sde.mixed_mode_toy``): 16 harmonic modes with
ω log-spaced in [0.5, 20] and a double well 2(q²-1)², mixed by a random rotation R (x = R q);
γ = 1, kT = 1, unit masses; arbitrary time units.  Reference data: BAOAB dt = 0.004, N = 3 path coefficients,
h0 = 0.04 (recorded every h0/2, see Training).  For each objective a ``ToyFlowMap`` (network in
whitened normal-mode coordinates with a linear skip, MLP 3×128 at the small size) is trained per
jump length and rolled out free-running at τ = 0.5 and τ = 2 (fresh coefficients and latents every
jump, ``sample`` mode, EMA weights) from stationary starts (frames of the data); fine BAOAB from
the same starts, sampled every τ, is the reference.  Statistics per τ (JSON, one dict each):

* ``var_x_by_mode``, ``var_v_by_mode``: 17 variances in mode coordinates (q = Rᵀx, p = Rᵀv; the
  16 harmonic modes by increasing ω, then the double well) divided by theory (kT/ω², the double
  well's by quadrature; velocities kT);
* ``right_well_share``: fraction of frames with q_well > 0 (0.5 by symmetry);
* ``switch_rate``: sign changes of q_well between successive jumps, per replica and time unit;
* ``barrier_share`` (extra): fraction of frames with |q_well| < 0.5 (fine: 0.135).
Frames of the first ``burn_in`` time units are left out of all of them (for model and fine alike).

Objectives (``--objective``; all ``SSFMConfig`` settings of ``molflow.flowmap``, m = 2 unless said):
``energy`` joint energy score on raw (x, v); ``whitened`` energy score on whitened mode
coordinates (``linear_features``: q, p scaled by their thermal spreads); ``whitened_crps`` + mean
per-coordinate CRPS (weight 1); ``whitened_beta`` kernel ‖·‖^0.5; ``whitened_m8`` m = 8 latent
samples; ``whitened_variogram`` + variogram score p = 0.5 (weight 1); ``whitened_compose2`` the
whitened score on a ``ComposedFlowMap`` of 2 half-jumps; ``mse`` squared error (the conditional
mean, for reference).

Training (``--training``): ``direct`` (default) trains one map per τ on recorded jumps of exactly
τ (the direct loss: frames τ apart with their recorded coefficients composed exactly — true samples
of the conditional law, so any error is the objective's or the network's, not a teacher's).  The
data are recorded every 0.02 (= h0/2) so that jumps of exactly 0.5 exist (0.5/h0 = 12.5);
``ssfm`` trains one map for τ ∈ [2h0, 2] with local + semigroup + direct losses on the h0 = 0.04
subsample (recorded coefficients of interval pairs composed exactly).

Stability — fixed before any objective comparison (τ = 0.5 unless said; "fast" = the 8 fastest
harmonic modes; variance / theory in mode coordinates):

* earlier probes (benchmarks/results/mixed_mode_toy_cpu_probes.json): per-coordinate MLP (x, v
  scaled per coordinate), one map up to τ: every map diverged within 1-5 jumps;
* network in whitened normal modes (``ToyFlowMap(state_transform=...)``), MLP only, one map for
  τ ∈ [0.08, 2] (ssfm), 600 steps: fastest mode 26× theory after one jump (τ = 2: 100×); with
  lr 3e-4 8× (60×); with direct loss only over τ ∈ [0.08, 2]: 22× (79×);
* + linear skip (``linear_skip=True``: a linear map of the network's inputs added to the MLP's
  output), direct loss over τ ∈ [0.08, 2], 600 steps: largest mode 6.2× theory after one jump,
  840× by jump 8 (τ = 2: 6.2× and 7e12×): the τ *continuum* is the killer at this size —
  a harmonic mode's jump is a rotation by ωτ (10 rad at τ = 0.5, 40 at τ = 2 for ω = 20), and the
  MLP does not follow it as a function of τ; the same continuum with the full fix below
  (``--training ssfm --objective whitened_crps``, local 0.25 + semigroup 0.5 + direct 0.25,
  3000 steps, 66 s) still diverges: some mode > 10× theory at jump 7 (τ = 0.5) and at jump 1
  (τ = 2; first-jump mid/fast x variance 4-10×) — so the comparison below trains one map per τ;
* one map per τ (direct, τ = 0.5 exactly), whitened, MLP only, 600 steps: largest mode
  2.9-5.0× theory over jumps 1-8 (output scaled by τ/τ_ref; 2.0-3.3× with no τ scaling);
  + linear skip: 0.76-1.37× — the fix kept (the linear skip carries the linear, harmonic part of
  the map exactly and stably; the MLP learns the rest);
* at 2000 steps (whitened_crps, one map per τ): per-coordinate MLP diverges at jump 31 (fast x
  12000×); per-coordinate + linear skip (at the reduced test's size, 1500 steps) is stable but keeps the slow
  modes at 0.57-0.68 and the well at 0.45-0.49; whitened + linear skip: 33 of 34 modes within 10%.
  Whitened coordinates *and* the linear skip are both kept.
* EMA weights (decay 0.995) and a cosine lr decay to 5% are used for all rows; EMA vs raw
  weights was compared only on the unstable maps (both diverged at the same jump), so neither is
  the fix.  More training helps the variances, not the kinetics (τ = 0.5, whitened_crps): 6000
  steps 34/34 modes within 4.3%, hidden 256 34/34 within 8.4%; switch rate 0.291 and 0.297
  (2000 steps: 0.298).

Barrier kinetics — under-training, not the objective (session 4, τ = 0.5, whitened_crps, this
data).  The map first settles on a *linear-Gaussian* plateau: the linear skip's best linear jump
plus constant noise, whose one-jump sign-change probability of q_well from recorded starts is
≈ 0.066 against 0.041 in the data (trained 15000 steps: 0.039), and whose rollouts switch wells ≈ 4× too often.
``--probe-every 1000`` logs that probability during training
(benchmarks/results/mixed_mode_toy_cpu_small_probe.json): 0.065-0.068 up to step 5000 while the
loss sits near 2.0, then 0.058/0.052/0.042/0.040 at steps 6000-9000 as the loss falls to 1.6 and
the MLP learns the nonlinear, start-dependent law; 0.038-0.039 from step 10000 on.  Rollout
switch rate / fine by training length (``--steps``): 3000 (the old small size) 4.3×, 8000 4.2×,
3000 at ``--lr 3e-3`` 3.8×, 12000 0.93×, 15000 1.00× — so the small size now trains 15000 steps.
τ = 2 with one evaluation per jump stays on its plateau at this size: 15000 steps 1.84×,
``--steps 30000`` 1.76×, ``--lr 2e-3`` 1.88×, ``--hidden 256`` 1.89×; two ad-hoc probes outside
this script (m = 8 with the CRPS term 1.82×, warm start from the trained τ = 0.5 map 1.87×) agree.
What works at this size is τ = 2 as 4 jumps of the τ = 0.5 map (``whitened_crps_k4``, 4
evaluations per jump).

Table, default objective and measured sizes: see NOTES below and
benchmarks/results/mixed_mode_toy_cpu_small.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform as _pf
import sys
import time

import numpy as np
import torch

from molflow import flowmap as FM
from molflow import sde as S

SIZES = {
    # CPU: 15000 steps, enough to leave the linear-Gaussian plateau at τ = 0.5 (module docstring);
    # the default objective takes ≈ 3 min on 2 shared cores, 4 objectives (7 maps) 598 s; --objective
    # all (8 objectives, m = 8 and compose2 slower) ≈ 30-40 min (estimated, not run at 15000 steps)
    "small": dict(hidden=128, depth=3, steps=15000, batch=256, data_replicas=128, data_frames=500,
                  eval_replicas=256, eval_time=60.0, burn_in=4.0),
    # DESIGN §3.3's map size (MLP 3×512), 30000 steps, more data and longer rollouts: GPU
    "full": dict(hidden=512, depth=3, steps=30000, batch=512, data_replicas=512, data_frames=2000,
                 eval_replicas=1024, eval_time=200.0, burn_in=4.0),
}
H0, DT, N_COEF, TAUS, TAU_TRAIN = 0.04, 0.004, 3, (0.5, 2.0), 2.0
REC = 0.02  # recording interval: h0/2, so that recorded jumps of exactly τ = 0.5 (25 intervals) exist

OBJECTIVES = {
    "energy": dict(features="raw"),
    "whitened": dict(features="whitened"),
    "whitened_crps": dict(features="whitened", crps_weight=1.0),
    "whitened_beta": dict(features="whitened", beta=0.5),
    "whitened_m8": dict(features="whitened", n_latent=8),
    "whitened_variogram": dict(features="whitened", variogram_weight=1.0, variogram_p=0.5),
    "whitened_compose2": dict(features="whitened", compose=2),
    # τ = 2 as 4 jumps of the τ = 0.5 map (trained once, at 0.5): the coefficients of [0, 2] split
    # exactly into 4 pieces (ComposedFlowMap), 4 evaluations per τ = 2 jump
    "whitened_crps_k4": dict(features="whitened", crps_weight=1.0, compose_trained=4),
    "mse": dict(features="raw", objective="mse"),
}
DEFAULT_OBJECTIVE = "whitened_crps"  # chosen by the committed table: see NOTES
# what --objective all runs (mse is left out: it learns the conditional mean, DESIGN §3.2)
ALL = ["energy", "whitened", "whitened_crps", "whitened_beta", "whitened_m8", "whitened_variogram",
       "whitened_compose2", "whitened_crps_k4"]

NOTES = """\
Measured (benchmarks/results/mixed_mode_toy_cpu_small.json; 2 shared cores, 1 torch thread, no
GPU; `--size small --objective energy,whitened,whitened_crps,whitened_crps_k4`: 598 s in all, 15000
steps per map).  Columns: variance / theory averaged over the 8 slowest and 8 fastest harmonic
modes and the well (x: position, v: velocity); worst: largest |variance/theory - 1| over all 34
modes; n<10%: modes within 10% of theory; right: right-well share; switch: sign changes of q_well
per jump per time unit, /fine its ratio to fine simulation; barrier: share of frames with
|q_well| < 0.5.  Fine simulation's own "worst" (0.06) is the sampling floor of this evaluation
size (256 replicas × 56 time units).

     tau objective             x slow  x fast  x well  v slow  v fast   worst n<10%  right  switch  /fine barrier
     0.5 fine                   0.993   0.998   0.999   0.998   1.000   0.061    34  0.476   0.070   1.00   0.135
     0.5 energy                 1.003   0.893   0.992   1.003   0.955   0.396    29  0.523   0.068   0.96   0.140
     0.5 whitened               1.004   1.005   0.992   1.003   1.004   0.045    34  0.523   0.073   1.04   0.140
     0.5 whitened_crps          1.003   1.006   0.995   1.002   1.005   0.043    34  0.503   0.070   1.00   0.139
     0.5 whitened_crps_k4       (the same map as whitened_crps at τ = 0.5)
     2.0 fine                   0.991   0.991   1.002   1.002   1.003   0.064    34  0.474   0.064   1.00   0.133
     2.0 energy                 1.003   0.395   1.010   1.011   1.016   0.869    25  0.488   0.117   1.83   0.412
     2.0 whitened               1.017   0.979   1.132   1.021   1.018   0.132    32  0.479   0.114   1.79   0.390
     2.0 whitened_crps          1.008   0.997   0.948   1.007   1.035   0.129    33  0.495   0.117   1.84   0.424
     2.0 whitened_crps_k4       0.992   1.004   1.000   0.997   1.005   0.041    34  0.500   0.058   0.91   0.133

Default objective: whitened_crps (energy score + per-coordinate CRPS, weight 1, both in whitened
normal-mode coordinates).  At τ = 0.5 it meets every target of issue #10 with one evaluation per
jump: all 34 modes within 4.3% of theory, right-well share 0.503, switch rate 1.00× fine, barrier
share 0.139 (0.135).  The joint energy score on raw coordinates gets the kinetics (0.96×) but not
the fast modes (x 0.89, worst 0.40); whitening alone is close (worst 0.045, switch 1.04×).  At
τ = 2 no one-evaluation map leaves the linear-Gaussian plateau at this size (switch 1.8×, barrier
share 0.39-0.42; see "Barrier kinetics" in the module docstring); τ = 2 as 4 jumps of the τ = 0.5
map (whitened_crps_k4) meets every target: worst mode 4.1%, share 0.500, switch 0.91×, barrier
0.133 — at 4 evaluations per jump (fine BAOAB: 500 steps).

Earlier run at 3000 steps per map (the old small size; every objective on the plateau;
benchmarks/results/mixed_mode_toy_cpu_small_3000steps.json, 752 s on a slower 2-core machine):

     tau objective             x slow  x fast  x well  v slow  v fast   worst n<10%  right  switch  /fine barrier
     0.5 fine                   0.993   0.998   0.999   0.998   1.000   0.061    34  0.476   0.070   1.00   0.135
     0.5 energy                 1.009   0.905   0.952   1.011   0.963   0.497    29  0.482   0.295   4.19   0.423
     0.5 whitened               1.015   0.998   0.958   1.018   1.011   0.146    33  0.483   0.301   4.27   0.426
     0.5 whitened_crps          1.008   1.004   1.004   1.009   1.011   0.064    34  0.484   0.300   4.26   0.415
     0.5 whitened_beta          1.011   1.008   0.953   1.012   1.010   0.062    34  0.479   0.294   4.18   0.418
     0.5 whitened_m8            1.015   1.002   0.935   1.018   1.011   0.106    33  0.471   0.286   4.06   0.419
     0.5 whitened_variogram     1.015   1.003   0.965   1.017   1.012   0.116    33  0.477   0.289   4.11   0.421
     0.5 whitened_compose2      1.020   1.198   0.342   1.009   1.198   0.981    22  0.451   0.342   4.86   0.642
     2.0 fine                   0.991   0.991   1.002   1.002   1.003   0.064    34  0.474   0.064   1.00   0.133
     2.0 energy                 1.041   0.361   0.702   1.057   0.938   0.875    22  0.459   0.113   1.77   0.474
     2.0 whitened               1.124   0.931   0.646   1.150   0.909   0.354     9  0.466   0.115   1.80   0.494
     2.0 whitened_crps          1.020   1.029   0.815   1.029   1.021   0.205    31  0.467   0.111   1.74   0.453
     2.0 whitened_beta          1.130   0.937   0.436   1.174   0.874   0.564     8  0.463   0.113   1.78   0.583
     2.0 whitened_m8            1.063   0.978   0.716   1.079   0.965   0.284    25  0.478   0.117   1.83   0.479
     2.0 whitened_variogram     1.059   0.994   0.740   1.072   0.987   0.260    30  0.474   0.121   1.89   0.478
     2.0 whitened_compose2      1.187   0.838   0.423   1.178   0.832   0.964     6  0.458   0.114   1.78   0.584

Default: whitened_crps (energy score + per-coordinate CRPS, weight 1, both in whitened
normal-mode coordinates).  It is the only candidate with every mode within 10% at τ = 0.5
(worst 0.064 ≈ the sampling floor) and the best at τ = 2 (31 of 34 modes within 10%, worst
0.205: the double well's x variance 0.81 and the fastest mode's 1.21); β = 0.5 ties at τ = 0.5
but loses the well at τ = 2 (0.44); m = 8 and the variogram term are between whitened and
whitened_crps at 2-3× the cost; the raw joint energy score loses the fast modes at τ = 2 (0.36,
as DESIGN §3.3 measured); composing 2 half-jumps is worse at this training length (the inner
map learns only through the composition).  No candidate changes the barrier kinetics (switch
rate 4.1-4.9× fine at τ = 0.5, 1.7-1.9× at τ = 2; barrier share ≈ 0.42-0.64 vs 0.135) —
at 3000 steps, which is too few to leave the plateau (the run above).
"""


def stationary_start(toy, n, generator):
    """Exact stationary harmonic modes and velocities; the well coordinate from ±1 + noise
    (relaxed by the burn-in)."""
    var = toy.info["stationary_var"]
    nd = toy.n_dof
    q = torch.randn(n, nd, generator=generator, dtype=torch.float64) * var[:nd].sqrt()
    q[:, -1] = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) + 0.3 * torch.randn(
        n, generator=generator, dtype=torch.float64)
    p = torch.randn(n, nd, generator=generator, dtype=torch.float64)
    r = toy.info["rotation"]
    return torch.cat([q @ r.T, p @ r.T], dim=1)


def mode_stats(toy, traj: torch.Tensor, tau: float, burn_in: float) -> dict:
    """traj (R, T, 2n) sampled every tau -> the issue's statistics (see the module docstring)."""
    nd = toy.n_dof
    skip = int(round(burn_in / tau))
    traj = traj[:, skip:].double()
    modes = toy.info["to_modes"](traj.reshape(-1, 2 * nd)).reshape(traj.shape[0], traj.shape[1], 2 * nd)
    finite = bool(torch.isfinite(modes).all())
    ratio = modes.reshape(-1, 2 * nd).var(0) / toy.info["stationary_var"]
    qw = modes[:, :, nd - 1]
    flips = (torch.sign(qw[:, 1:]) != torch.sign(qw[:, :-1])).double().sum().item()
    clean = lambda v: v if math.isfinite(v) else None  # noqa: E731
    return {"var_x_by_mode": [clean(v) for v in ratio[:nd].tolist()],
            "var_v_by_mode": [clean(v) for v in ratio[nd:].tolist()],
            "right_well_share": clean((qw > 0).double().mean().item()),
            "switch_rate": clean(flips / (traj.shape[0] * (traj.shape[1] - 1) * tau)),
            "barrier_share": clean((qw.abs() < 0.5).double().mean().item()),  # frames with |q_well| < 0.5
            "finite": finite}


def summary(st: dict) -> dict:
    """Worst-mode and group numbers for the printed table (variance / theory)."""
    x = np.array([np.nan if v is None else v for v in st["var_x_by_mode"]])
    v = np.array([np.nan if u is None else u for u in st["var_v_by_mode"]])
    dev = np.abs(np.concatenate([x, v]) - 1)
    return {"x_slow": np.mean(x[:8]), "x_fast": np.mean(x[8:16]), "x_well": x[16], "v_slow": np.mean(v[:8]),
            "v_fast": np.mean(v[8:16]), "worst_dev": np.nanmax(dev) if np.isfinite(dev).any() else np.nan,
            "n_within_10pct": int(np.sum(dev < 0.1))}


def build(size, seed):
    toy = S.mixed_mode_toy(seed=0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    z0 = stationary_start(toy, size["data_replicas"], g)
    burn, _ = S.simulate_with_coefficients(toy, z0, DT, int(round(H0 / DT)), 100, N_COEF, g)  # 4 time units
    frames, coeffs = S.simulate_with_coefficients(toy, burn[:, -1], DT, int(round(REC / DT)),
                                                  2 * size["data_frames"], N_COEF, g)
    data_s = time.perf_counter() - t0
    # fine reference from stationary starts (data frames), sampled every 0.5 (τ = 2: every 4th)
    t0 = time.perf_counter()
    n = size["eval_replicas"]
    starts = frames[torch.randint(0, frames.shape[0], (n,), generator=g),
                    torch.randint(0, frames.shape[1], (n,), generator=g)]
    fine_traj, _ = S.simulate_with_coefficients(toy, starts, DT, int(round(TAUS[0] / DT)),
                                                int(round(size["eval_time"] / TAUS[0])), 1, g)
    ref_s = time.perf_counter() - t0
    fine = {}
    for tau in TAUS:
        stride = int(round(tau / TAUS[0]))
        fine[str(tau)] = mode_stats(toy, fine_traj[:, ::stride], tau, size["burn_in"])
    return toy, frames, coeffs, starts, fine, data_s, ref_s


def whitening(toy):
    """(A, σ): z -> (q, p) = z·blockdiag(R, R), and the modes' thermal spreads σ (34,)."""
    nd = toy.n_dof
    rot = toy.info["rotation"]
    a = torch.zeros(2 * nd, 2 * nd, dtype=torch.float64)
    a[:nd, :nd] = rot
    a[nd:, nd:] = rot
    return a, toy.info["stationary_var"].sqrt()


def h0_data(frames, coeffs):
    """The h0 = 0.04 data set: every second recorded frame, coefficients of interval pairs composed
    exactly (what a run recorded at h0 would hold)."""
    r, f = coeffs.shape[:2]
    f2 = f // 2
    pairs = coeffs[:, : 2 * f2].reshape((r * f2, 2) + tuple(coeffs.shape[2:]))
    return frames[:, : 2 * f2 + 1 : 2], FM.compose_consecutive(pairs).reshape((r, f2) + tuple(coeffs.shape[2:]))


def make_model(toy, size, args, k, tau_ref):
    nd = toy.n_dof
    a, sig = whitening(toy)
    if args.param == "whitened":
        kw = dict(state_transform=a.float(), state_scale=sig.float(), linear_skip=True)
    else:  # the earlier parametrisation: x, v scaled per coordinate, MLP only
        rot = toy.info["rotation"]
        x_std = torch.sqrt((rot**2) @ toy.info["stationary_var"][:nd])
        kw = dict(state_scale=torch.cat([x_std, torch.ones(nd, dtype=torch.float64)]).float())
    model = FM.ToyFlowMap.for_sde(toy, N_COEF, latent_dim=2 * nd, hidden=size["hidden"], depth=size["depth"],
                                  base="identity", tau_ref=tau_ref, **kw)
    return FM.ComposedFlowMap(model, k, N_COEF, (nd,)) if k > 1 else model


def evaluate(toy, net, starts, tau, size, seed, dev):
    nd = toy.n_dof
    net.eval()
    t0 = time.perf_counter()
    fresh = lambda t, gen: FM.sample_coefficients_torch(t, N_COEF, (nd,), gen)  # noqa: E731
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    n_jumps = int(round(size["eval_time"] / tau))
    traj = FM.rollout(net, starts.float().to(dev), n_jumps, tau, net.latent_fn, coefficients=fresh,
                      mode="sample", generator=gen).cpu()
    roll_s = time.perf_counter() - t0
    stats = mode_stats(toy, traj, tau, size["burn_in"])
    modes_t = toy.info["to_modes"](traj.double().reshape(-1, 2 * nd)).reshape(traj.shape[0], -1, 2 * nd)
    per_jump = (modes_t.var(0) / toy.info["stationary_var"]).max(1).values
    bad = torch.nonzero(~(per_jump < 10)).reshape(-1)
    stats["diverged_at_jump"] = int(bad[0]) if bad.numel() else None  # first jump with a mode > 10x theory
    stats["first_jump_var_x_by_mode"] = (modes_t[:, 1, :nd].var(0) / toy.info["stationary_var"][:nd]).tolist()
    stats["first_jump_var_v_by_mode"] = (modes_t[:, 1, nd:].var(0) / toy.info["stationary_var"][nd:]).tolist()
    stats["rollout_wall_s"] = roll_s
    return stats


@torch.no_grad()
def one_jump_flip(toy, net, frames, tau, n=8000, seed=9):
    """Sign-change probability of q_well over one jump of ``tau`` from ``n`` recorded start frames
    (fixed by ``seed``): (data — the recorded frame τ later, model — one sample-mode jump with
    fresh coefficients and latent).  The plateau diagnostic of the module docstring."""
    nd, k = toy.n_dof, int(round(tau / REC))
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, frames.shape[0], (n,), generator=g)
    f = torch.randint(0, frames.shape[1] - k, (n,), generator=g)
    z0, z1 = frames[r, f], frames[r, f + k]
    dev = next(net.parameters()).device
    t = torch.full((n,), tau, device=dev)
    zm = net(z0.float().to(dev), FM.sample_coefficients_torch(t, N_COEF, (nd,), g.manual_seed(seed + 1)).to(dev),
             net.latent_fn(n, torch.Generator(device=dev).manual_seed(seed + 2)), t).cpu()
    q = lambda z: toy.info["to_modes"](z.double())[:, nd - 1]  # noqa: E731
    flip = lambda a, b: (torch.sign(q(a)) != torch.sign(q(b))).double().mean().item()  # noqa: E731
    return flip(z0, z1), flip(z0, zm)


def run_objective(name, toy, frames, coeffs, starts, size, args, dev):
    """Train (per τ with --training direct, once with --training ssfm) and roll out at both τ."""
    st = dict(OBJECTIVES[name])
    a, sig = whitening(toy)
    feats = FM.linear_features(a.float().to(dev), sig.float().to(dev)) if st["features"] == "whitened" else None
    k = st.get("compose", 1)
    out = {"features": st["features"], "compose": k, "training": args.training}
    kt = st.get("compose_trained", 1)
    if kt > 1 and args.training != "direct":
        raise SystemExit("compose_trained objectives need --training direct")
    if args.training == "direct":
        plans = [(str(tau), tau, tau, {"direct": 1.0}, FM.TrajectoryDataSampler(frames.to(dev), coeffs.to(dev), REC))
                 for tau in TAUS if kt == 1 or tau == TAUS[0]]
    else:
        f4, c4 = h0_data(frames, coeffs)
        fractions = {kk: float(v) for kk, v in (kv.split("=") for kv in args.fractions.split(","))}
        plans = [("all", 2 * H0, TAU_TRAIN, fractions, FM.TrajectoryDataSampler(f4.to(dev), c4.to(dev), H0))]
    for key, tau_min, tau_max, fractions, sampler in plans:
        torch.manual_seed(args.seed)
        model = make_model(toy, size, args, k, tau_ref=tau_max if args.training == "direct" else 1.0).to(dev)
        cfg = FM.SSFMConfig(objective=st.get("objective", "energy"), n_latent=st.get("n_latent"),
                            beta=st.get("beta", 1.0), crps_weight=st.get("crps_weight", 0.0),
                            variogram_weight=st.get("variogram_weight", 0.0),
                            variogram_p=st.get("variogram_p", 0.5), h0=sampler.h0, tau_min=tau_min,
                            tau_max=tau_max, steps=size["steps"], batch_size=size["batch"], lr=args.lr,
                            lr_final_fraction=args.lr_final, ema_decay=args.ema, fractions=fractions,
                            curriculum_fraction=args.curriculum if len(plans) == 1 else 0.0, seed=args.seed,
                            log_every=args.probe_every or max(1, size["steps"] // 6),
                            dyadic=False)  # τ = 0.5 or 2 is not h0·2^j for h0 = 0.04
        probe = []  # (step, one-jump flip of the raw weights) with --probe-every, direct training only

        def callback(step, rec, key=key, model=model):
            msg = f"  [{name} {key}] step {step} loss {rec['loss']:.4f}"
            if args.probe_every and args.training == "direct":
                probe.append((step, one_jump_flip(toy, model, frames, float(key))[1]))
                msg += f" one-jump flip {probe[-1][1]:.4f}"
            print(msg, file=sys.stderr, flush=True)

        res = FM.train_ssfm(model, sampler, cfg, latent_fn=model.latent_fn, score_features=feats, callback=callback)
        out.setdefault("train", {})[key] = {
            "config": {kk: v for kk, v in cfg.to_dict().items() if kk != "log_every"},
            "train_wall_s": res["wall_s"], "loss_history": [(h["step"], h["loss"]) for h in res["history"]]}
        if args.training == "direct":
            data_flip, model_flip = one_jump_flip(toy, res["ema"].model, frames, float(key))
            out["train"][key].update(one_jump_flip_data=data_flip, one_jump_flip_model=model_flip,
                                     one_jump_flip_by_step=probe)
        for tau in TAUS:
            if kt > 1 and tau == TAUS[0] * kt:  # the longer τ: k jumps of the map trained at TAUS[0]
                composed = FM.ComposedFlowMap(res["ema"].model, kt, N_COEF, (toy.n_dof,)).to(dev)
                out[str(tau)] = evaluate(toy, composed, starts, tau, size, args.seed, dev)
                out[str(tau)]["evaluations_per_jump"] = kt
            elif key in (str(tau), "all"):
                out[str(tau)] = evaluate(toy, res["ema"].model, starts, tau, size, args.seed, dev)
                if args.also_raw:
                    raw = evaluate(toy, model, starts, tau, size, args.seed, dev)
                    out.setdefault("raw_weights", {})[str(tau)] = raw
    return out


def print_table(result):
    fine = result["fine"]
    print(f"{'tau':>4} {'objective':<20} {'x slow':>7} {'x fast':>7} {'x well':>7} {'v slow':>7} {'v fast':>7} "
          f"{'worst':>7} {'n<10%':>5} {'right':>6} {'switch':>7} {'/fine':>6} {'barrier':>7}")
    for tau in TAUS:
        rows = [("fine", fine[str(tau)])] + [(k, v[str(tau)]) for k, v in result["objectives"].items()]
        fs = fine[str(tau)]["switch_rate"]
        for name, st in rows:
            s = summary(st)
            sw = st["switch_rate"]
            ratio = sw / fs if (sw is not None and fs) else float("nan")
            f = lambda v: f"{v:7.3f}" if v is not None and np.isfinite(v) else "    nan"  # noqa: E731
            print(f"{tau:>4} {name:<20} {f(s['x_slow'])} {f(s['x_fast'])} {f(s['x_well'])} {f(s['v_slow'])} "
                  f"{f(s['v_fast'])} {f(s['worst_dev'])} {s['n_within_10pct']:>5} "
                  f"{f(st['right_well_share'])[1:]} {f(sw)} {ratio:6.2f} {f(st.get('barrier_share'))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--objective", default="default", help=f"one of {list(OBJECTIVES)}, 'default' "
                    f"({DEFAULT_OBJECTIVE}), 'all' ({','.join(ALL)}) or a comma-separated list")
    ap.add_argument("--out", required=True)
    ap.add_argument("--training", default="direct", choices=["direct", "ssfm"],
                    help="direct: one map per τ, trained on recorded jumps of exactly τ (default); ssfm: one map "
                         "for τ in [2h0, 2] (local + semigroup + direct, --fractions, curriculum)")
    ap.add_argument("--param", default="whitened", choices=["whitened", "coordinate"],
                    help="network coordinates: whitened normal modes (default) or x, v scaled per coordinate")
    ap.add_argument("--fractions", default="local=0.25,semigroup=0.5,direct=0.25", help="batch shares per loss")
    ap.add_argument("--steps", type=int, help="override the size's optimiser steps")
    ap.add_argument("--hidden", type=int, help="override the size's MLP width")
    ap.add_argument("--eval-time", type=float, help="override the rollout length (time units)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-final", type=float, default=0.05, help="cosine decay to lr × this")
    ap.add_argument("--ema", type=float, default=0.995, help="EMA decay (the EMA copy is rolled out)")
    ap.add_argument("--curriculum", type=float, default=0.4, help="share of steps over which τ grows to 2")
    ap.add_argument("--also-raw", action="store_true", help="also roll out the raw (non-EMA) weights")
    ap.add_argument("--probe-every", type=int, default=0,
                    help="log (and write) the raw weights' one-jump q_well sign-change probability every this "
                         "many steps (the plateau diagnostic; --training direct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = dict(SIZES[args.size])
    for key, val in (("steps", args.steps), ("hidden", args.hidden), ("eval_time", args.eval_time)):
        if val:
            size[key] = val
    if size["eval_time"] <= size["burn_in"] + max(TAUS):
        ap.error(f"--eval-time must exceed the burn-in ({size['burn_in']}) by more than one jump")
    if args.objective == "all":
        names = ALL
    elif args.objective == "default":
        names = [DEFAULT_OBJECTIVE]
    else:
        names = args.objective.split(",")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        ap.error(f"unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}, default, all")
    dev = torch.device(args.device)
    t_start = time.perf_counter()
    toy, frames, coeffs, starts, fine, data_s, ref_s = build(size, args.seed)
    print(f"data {data_s:.1f} s, fine reference {ref_s:.1f} s", file=sys.stderr)
    result = {
        "benchmark": "mixed_mode_toy", "issue": 10, "size": args.size, "command": "python " + " ".join(sys.argv),
        "default_objective": DEFAULT_OBJECTIVE,
        "settings": {"h0": H0, "dt": DT, "n_coefficients": N_COEF, "gamma": 1.0, "kT": 1.0, "taus": list(TAUS),
                     "tau_train_max": TAU_TRAIN, **size, "param": args.param, "training": args.training,
                     "recording_interval": REC, "fractions": args.fractions,
                     "lr": args.lr, "lr_final_fraction": args.lr_final, "ema_decay": args.ema,
                     "curriculum_fraction": args.curriculum, "seed": args.seed,
                     "model": f"ToyFlowMap(base='identity', latent_dim=34, MLP {size['depth']}x{size['hidden']})",
                     "mode_order": "16 harmonic modes by increasing omega (0.5..20), then the double well",
                     "time_units": "arbitrary toy units"},
        "hardware": {"device": str(dev), "cpu": _pf.processor() or _pf.machine(), "threads": args.threads,
                     "cpu_count": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": _pf.python_version()},
        "data_wall_s": data_s, "reference_wall_s": ref_s, "fine": fine, "objectives": {},
    }
    for name in names:
        result["objectives"][name] = run_objective(name, toy, frames, coeffs, starts, size, args, dev)
        result["total_wall_s"] = time.perf_counter() - t_start
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print_table({"fine": fine, "objectives": {name: result["objectives"][name]}})
    print()
    print_table(result)
    print(f"total {result['total_wall_s']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
