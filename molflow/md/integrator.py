"""BAOAB Langevin integrator that records the Legendre coefficients of its own Brownian path.

The integrator is an OpenMM ``CustomIntegrator`` (LangevinMiddle / BAOAB splitting with on-step
velocities):

    B  v <- v + dt/2 f/m
    A  x <- x + dt/2 v
    O  v <- a v + sqrt((1 - a^2) kT/m) xi,   a = exp(-gamma dt),  xi ~ N(0, 1) per DOF
    A  x <- x + dt/2 v
    B  v <- v + dt/2 f(x)/m

The per-step Gaussian xi is the Brownian increment of the step in units of sqrt(dt):
dW_k = sqrt(dt) xi_k. With the piecewise-linear path, the coefficients of a frame interval of K
steps are L^(n) = sum_k w[n, k] xi_k (DESIGN.md section 2; ``molflow.brownian``), accumulated here
per DOF in variables ``L0 .. L{N-1}`` with the weights in tabulated functions of the step index,
so they are read once per frame. The step counter ``kstep`` wraps every K steps and the
accumulators restart at ``kstep == 0``: read them after each full frame.
"""
from __future__ import annotations

import numpy as np

from ..brownian import legendre_step_weights
from ..units import BOLTZMANN_KJ_MOL_K


def recording_integrator(temperature_K: float, friction_per_ps: float, timestep_fs: float,
                         steps_per_frame: int, n_coefficients: int, seed: int):
    """Build the BAOAB ``CustomIntegrator`` that accumulates L^(0..N-1) per DOF (sqrt(ps)).

    ``n_coefficients`` may be 0 (no recording, the plain engine). ``seed`` must be non-zero
    (OpenMM reads 0 as "random").
    """
    import openmm

    if seed <= 0:
        raise ValueError("integrator seed must be a positive integer (0 means random to OpenMM)")
    if not 0 <= n_coefficients <= 8:
        raise ValueError("n_coefficients must be between 0 and 8")
    dt_ps = timestep_fs / 1000.0
    integ = openmm.CustomIntegrator(dt_ps)
    integ.addGlobalVariable("a", float(np.exp(-friction_per_ps * dt_ps)))
    integ.addGlobalVariable("b", float(np.sqrt(-np.expm1(-2.0 * friction_per_ps * dt_ps))))
    integ.addGlobalVariable("kT", BOLTZMANN_KJ_MOL_K * temperature_K)
    integ.addGlobalVariable("kstep", 0)
    integ.addGlobalVariable("K", int(steps_per_frame))
    integ.addPerDofVariable("xi", 0)
    weights = legendre_step_weights(n_coefficients, steps_per_frame, dt_ps) if n_coefficients else None
    for n in range(n_coefficients):
        integ.addPerDofVariable(f"L{n}", 0)
        integ.addTabulatedFunction(f"w{n}", openmm.Discrete1DFunction(weights[n].tolist()))
    integ.addUpdateContextState()
    integ.addComputePerDof("v", "v + 0.5*dt*f/m")
    integ.addComputePerDof("x", "x + 0.5*dt*v")
    integ.addComputePerDof("xi", "gaussian")
    integ.addComputePerDof("v", "a*v + b*sqrt(kT/m)*xi")
    integ.addComputePerDof("x", "x + 0.5*dt*v")
    integ.addComputePerDof("v", "v + 0.5*dt*f/m")
    for n in range(n_coefficients):
        integ.addComputePerDof(f"L{n}", f"select(kstep, L{n}, 0) + w{n}(kstep)*xi")
    integ.addComputeGlobal("kstep", "kstep + 1")
    integ.addComputeGlobal("kstep", "select(kstep - K, kstep, 0)")
    integ.setRandomNumberSeed(int(seed))
    return integ


def read_coefficients(integrator, n_coefficients: int) -> np.ndarray:
    """(N, n_particles, 3) coefficients accumulated over the last full frame, in sqrt(ps)."""
    if n_coefficients == 0:
        return np.zeros((0, len(integrator.getPerDofVariableByName("xi")), 3))
    return np.stack([np.asarray(integrator.getPerDofVariableByName(f"L{n}"), dtype=np.float64)
                     for n in range(n_coefficients)])

