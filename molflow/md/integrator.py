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
steps are L^(n) = sum_k w[n, k] xi_k (DESIGN.md section 2; ``molflow.brownian``), accumulated
per DOF in variables ``L0 .. L{N-1}`` with the weights in tabulated functions of the step index,
and read once per frame.

How it is made fast (measured on the Reference platform, which the engine uses for small
molecules on a CPU; ``benchmarks/md_throughput.py``). OpenMM's Reference ``CustomIntegrator``
draws a uniform and a Gaussian random number for every degree of freedom in *every* per-DOF
computation and copies every per-DOF variable into the expression, so its cost is the number of
per-DOF computations per step (about 2-3 us each for 22 atoms) times (1 + a little per per-DOF
variable); the expressions themselves cost almost nothing. So:

* **Merged kicks.** The context's velocity variable holds the half-kicked velocity
  ``u = v + dt/2 f(x)/m`` (the closing B of one step merged with the opening B of the next),
  and one BAOAB step is three per-DOF computations:

      xi <- gaussian
      x  <- x + dt/2 ((1 + a) u + s xi)          (A O A in one: x + dt/2 u + dt/2 (a u + s xi))
      u  <- a u + s xi + dt f(x)/m                (O, then B of this step and B of the next)

  with s = sqrt((1 - a^2) kT/m). On-step velocities are ``v = u - dt/2 f/m``
  (:func:`onstep_velocities`; the engine reads f at every frame anyway), and a state is set with
  :func:`set_onstep_velocities`. Algebraically this is the BAOAB step above; only rounding
  (1e-16 relative in double precision) differs.
* **Substeps per call.** One call of ``integrator.step(1)`` runs ``substeps`` = M physical steps
  (M divides the steps per frame K; see :func:`choose_substeps`), drawing ``xi0 .. xi{M-1}``, and
  updates each accumulator once per call with M terms: N/M accumulator computations per step
  instead of N. The step size OpenMM sees is M·dt, so the context's time stays right.

With N = 3 this is 3 + 3/M per-DOF computations per step instead of 9 (3.3 at M = 10) (and no
``UpdateContextState``: the systems have no barostat, thermostat force or CMMotionRemover).
The global ``kstep`` counts steps within the frame (0, M, 2M, ...) and wraps at K; the
accumulators restart when a call begins at ``kstep == 0``: read them after each full frame.
"""
from __future__ import annotations

import numpy as np

from ..brownian import legendre_step_weights
from ..units import BOLTZMANN_KJ_MOL_K

#: the largest number of physical steps per integrator call (see the module docstring). Measured with
#: ``benchmarks/md_throughput.py --compare-only --frame-fs 100 --rounds 9 --max-substeps M`` (Reference
#: platform, one replica, N = 3, stock/this per core): 0.789 at 5, 0.806 at 10 (N = 8: 0.714 vs 0.733;
#: benchmarks/results/md_throughput_stock_cpu_substeps{5,10}.json); more substeps add per-DOF
#: variables but fewer accumulator updates
MAX_SUBSTEPS = 10
#: names this integrator's program and state convention (the context's velocities are half-kicked
#: u = v + dt/2 f/m); recorded in run files: an OpenMM checkpoint is only reused by the same program
INTEGRATOR_ID = "molflow-baoab-merged-kicks-3"


def choose_substeps(steps_per_frame: int, other_steps: int = 0) -> int:
    """Physical steps per integrator call: the largest M <= MAX_SUBSTEPS dividing both counts.

    ``other_steps`` is any other stretch the same integrator must run exactly (equilibration).
    """
    g = int(np.gcd(int(steps_per_frame), int(other_steps)))
    return next(m for m in range(MAX_SUBSTEPS, 0, -1) if g % m == 0)


def recording_integrator(temperature_K: float, friction_per_ps: float, timestep_fs: float,
                         steps_per_frame: int, n_coefficients: int, seed: int, substeps: int = 1,
                         frame_forces: bool = False, frame_energy: bool = False):
    """Build the BAOAB ``CustomIntegrator`` that accumulates L^(0..N-1) per DOF (sqrt(ps)).

    ``n_coefficients`` may be 0 (no recording, the plain engine). ``seed`` must be non-zero
    (OpenMM reads 0 as "random"). ``substeps`` physical steps of ``timestep_fs`` run per call of
    ``step(1)``; it must divide ``steps_per_frame``. The context's velocities are half-kicked
    (module docstring): convert with :func:`onstep_velocities` / :func:`set_onstep_velocities`.

    Frame outputs, so a frame is read without another force evaluation (``Context.getState``
    with forces or energy evaluates them again, about as long as one step): with
    ``frame_forces``, the last call of each frame copies the forces at the frame's positions into
    ``xi0`` once the accumulators have used it; with ``frame_energy``, the force evaluation of that
    call's last substep also computes the potential energy into the global ``epot``. Read them with
    :func:`read_frame_outputs`, only right after a full frame. These extra computations draw
    random numbers too, so a run with and without them differs (each is reproducible).
    """
    import openmm

    if seed <= 0:
        raise ValueError("integrator seed must be a positive integer (0 means random to OpenMM)")
    if not 0 <= n_coefficients <= 8:
        raise ValueError("n_coefficients must be between 0 and 8")
    M, K = int(substeps), int(steps_per_frame)
    if M < 1 or K % M:
        raise ValueError(f"substeps ({substeps}) must be a positive divisor of steps_per_frame ({K})")
    dt_ps = timestep_fs / 1000.0
    a = float(np.exp(-friction_per_ps * dt_ps))
    integ = openmm.CustomIntegrator(dt_ps * M)
    integ.addGlobalVariable("h", dt_ps)  # the physical step (OpenMM's dt is M·h)
    integ.addGlobalVariable("a", a)
    integ.addGlobalVariable("c", 0.5 * dt_ps * (1.0 + a))
    integ.addGlobalVariable("bh", 0.5 * dt_ps * float(np.sqrt(-np.expm1(-2.0 * friction_per_ps * dt_ps))))
    integ.addGlobalVariable("b", float(np.sqrt(-np.expm1(-2.0 * friction_per_ps * dt_ps))))
    integ.addGlobalVariable("kT", BOLTZMANN_KJ_MOL_K * temperature_K)
    integ.addGlobalVariable("kstep", 0)
    integ.addGlobalVariable("K", K)
    integ.addGlobalVariable("substeps", M)
    for m in range(M):
        integ.addPerDofVariable(f"xi{m}", 0)
    weights = legendre_step_weights(n_coefficients, K, dt_ps) if n_coefficients else None
    for n in range(n_coefficients):
        integ.addPerDofVariable(f"L{n}", 0)
        integ.addTabulatedFunction(f"w{n}", openmm.Discrete1DFunction(weights[n].tolist()))
    if frame_energy:
        integ.addGlobalVariable("epot", 0)
    last_call = f"kstep = {K - M}"  # the condition of a frame's last call (kstep is the frame's step)
    for m in range(M):
        integ.addComputePerDof(f"xi{m}", "gaussian")
        integ.addComputePerDof("x", f"x + c*v + bh*sqrt(kT/m)*xi{m}")
        if frame_energy and m == M - 1:  # OpenMM then evaluates forces and energy together here
            integ.beginIfBlock(last_call)
            integ.addComputeGlobal("epot", "energy")
            integ.endBlock()
        integ.addComputePerDof("v", f"a*v + b*sqrt(kT/m)*xi{m} + h*f/m")
    for n in range(n_coefficients):
        terms = " + ".join(f"w{n}(kstep + {m})*xi{m}" for m in range(M))
        integ.addComputePerDof(f"L{n}", f"select(kstep, L{n}, 0) + {terms}")
    if frame_forces:
        integ.beginIfBlock(last_call)
        integ.addComputePerDof("xi0", "f")
        integ.endBlock()
    integ.addComputeGlobal("kstep", f"select(kstep + {M} - K, kstep + {M}, 0)")
    integ.setRandomNumberSeed(int(seed))
    return integ


def substeps_of(integrator) -> int:
    """Physical steps per call of ``integrator.step(1)``."""
    return int(round(integrator.getGlobalVariableByName("substeps")))


def step_physical(integrator, n_steps: int) -> None:
    """Advance ``n_steps`` physical steps (a multiple of the integrator's substeps)."""
    M = substeps_of(integrator)
    if n_steps % M:
        raise ValueError(f"{n_steps} steps is not a multiple of the integrator's {M} substeps")
    if n_steps:
        integrator.step(n_steps // M)


def onstep_velocities(u: np.ndarray, forces: np.ndarray, masses_amu: np.ndarray, dt_ps: float) -> np.ndarray:
    """On-step velocities ``v = u - dt/2 f/m`` from the context's half-kicked ``u`` (..., P, 3)."""
    return u - (0.5 * dt_ps) * forces / np.asarray(masses_amu, dtype=np.float64)[:, None]


def set_onstep_velocities(context, velocities: np.ndarray, masses_amu: np.ndarray, dt_ps: float) -> np.ndarray:
    """Give the context on-step ``velocities`` (P, 3) nm/ps at its current positions.

    Stores ``u = v + dt/2 f(x)/m`` (one force evaluation); returns the forces (P, 3).
    """
    f = np.array(context.getState(getForces=True).getForces(asNumpy=True)._value)
    context.setVelocities(np.asarray(velocities, dtype=np.float64)
                          + (0.5 * dt_ps) * f / np.asarray(masses_amu, dtype=np.float64)[:, None])
    return f


def read_frame_outputs(integrator, energy: bool) -> tuple[np.ndarray, float | None]:
    """(forces (P, 3) kJ/mol/nm, potential energy kJ/mol or None) stored by the frame's last call.

    Valid only right after a full frame of an integrator built with ``frame_forces``; ``energy``
    says it was built with ``frame_energy`` too (else the energy returned is None).
    """
    e = float(integrator.getGlobalVariableByName("epot")) if energy else None
    return _vec3_array(integrator.getPerDofVariableByName("xi0")), e


def read_coefficients(integrator, n_coefficients: int) -> np.ndarray:
    """(N, n_particles, 3) coefficients accumulated over the last full frame, in sqrt(ps)."""
    if n_coefficients == 0:
        return np.zeros((0, len(integrator.getPerDofVariableByName("xi0")), 3))
    return np.stack([_vec3_array(integrator.getPerDofVariableByName(f"L{n}")) for n in range(n_coefficients)])


def read_noise(integrator) -> np.ndarray:
    """(M, n_particles, 3) Gaussians of the last call's M substeps (for tests and debugging)."""
    return np.stack([_vec3_array(integrator.getPerDofVariableByName(f"xi{m}"))
                     for m in range(substeps_of(integrator))])


def state_array(state, kind: str) -> np.ndarray:
    """``kind`` ("positions", "velocities" or "forces") of an OpenMM ``State`` as a (P, 3) float64 array
    in OpenMM's units (nm, nm/ps, kJ/mol/nm).

    Read with ``State._getVectorAsNumpy`` when this OpenMM has it: ``getPositions(asNumpy=True)`` also
    lists the object's attributes and attaches units on every call, which at one read per 20-fs frame
    cost ~5% of the engine's speed (benchmarks/results/md_throughput_stock_cpu_before_state_read.json
    against md_throughput_stock_cpu.json: 0.704x to 0.739x stock at 20-fs frames). Falls back to the
    public call; tests/test_integrator.py checks both give the same arrays."""
    import openmm

    code = {"positions": openmm.State.Positions, "velocities": openmm.State.Velocities,
            "forces": openmm.State.Forces}[kind]
    fast = getattr(state, "_getVectorAsNumpy", None)
    if fast is not None:
        out = np.empty((state._getNumParticles(), 3), dtype=np.float64)
        fast(code, out)
        return out
    get = {"positions": state.getPositions, "velocities": state.getVelocities, "forces": state.getForces}[kind]
    return np.array(get(asNumpy=True)._value, dtype=np.float64)


def _vec3_array(values) -> np.ndarray:
    """A tuple of OpenMM Vec3 as a (P, 3) float64 array (faster than np.asarray on the tuple)."""
    import itertools

    return np.fromiter(itertools.chain.from_iterable(values), dtype=np.float64, count=3 * len(values)).reshape(-1, 3)
