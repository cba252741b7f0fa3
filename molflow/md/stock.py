"""Stock OpenMM, the yardstick of every speed figure (DESIGN.md section 10).

Speed is always a ratio measured in one run on one machine: the sampler (or molflow's engine)
against stock OpenMM — ``LangevinMiddleIntegrator`` with the system's own force field and protocol
(NoCutoff, its temperature, friction and timestep), on the faster of the Reference and CPU
platforms with one thread, chosen by measurement.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from .engine import available_platforms, minimise, platform_object, platform_properties


def stock_context(mol, x0, platform: str, seed: int):
    """(Context, integrator) of stock OpenMM for ``mol`` on ``platform`` (one thread), started at
    x0 (nm) with Maxwell-Boltzmann velocities, 1000 steps already run."""
    import openmm

    integ = openmm.LangevinMiddleIntegrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs / 1000.0)
    integ.setRandomNumberSeed(seed)
    ctx = openmm.Context(mol.create_system("nocutoff"), integ, platform_object(platform),
                         platform_properties(platform, 1, False))
    ctx.setPositions(x0)
    ctx.setVelocitiesToTemperature(mol.temperature_K, seed)
    integ.step(1000)
    return ctx, integ


def time_call(fn: Callable[[], Any]) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of fn()."""
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c0, time.perf_counter() - w0


def stock_speed(mol, steps: int = 20000, repeats: int = 3, x0=None) -> dict[str, Any]:
    """Stock OpenMM's speed on this machine for ``mol``: the best of ``repeats`` timings of ``steps``
    steps (thread CPU time) on each of Reference and CPU (one thread); returns the faster platform,
    its us per step and simulated ns per CPU-second."""
    x0 = minimise(mol) if x0 is None else x0
    best = {}
    for p in [p for p in ("Reference", "CPU") if p in available_platforms()]:
        ctx, integ = stock_context(mol, x0, p, seed=7)
        best[p] = min(time_call(lambda: integ.step(steps))[0] for _ in range(repeats)) / steps * 1e6
        del ctx, integ
    plat = min(best, key=best.get)
    us = best[plat]
    return {"integrator": "LangevinMiddleIntegrator", "platform": plat, "threads": 1, "us_per_step_cpu": us,
            "us_per_step_by_platform": best, "timestep_fs": mol.timestep_fs, "steps_timed": steps,
            "ns_per_cpu_s": mol.timestep_fs * 1e-6 / (us * 1e-6)}
