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
steps are L^(n) = sum_k w[n, k] xi_k (DESIGN.md section 2; ``molflow.brownian``,
``legendre_step_weights``).

Two programs share the same step (one implementation, :func:`_add_baoab_step`) and differ in where
xi comes from:

* **Host noise** (``host_noise=True``; the engine's program on the CPU and Reference platforms):
  the caller draws each frame's Gaussians in numpy, sets ``xi0 .. xi{M-1}`` before every call
  (:class:`HostNoise`) and computes the frame's coefficients as one matrix product ``w @ xi``.
* **OpenMM noise** (``host_noise=False``; the GPU program, where a host array per call would cost a
  host-to-device copy): the integrator draws ``xi{m} <- gaussian`` itself and accumulates the
  coefficients per DOF in variables ``L0 .. L{N-1}`` with the weights in tabulated functions of
  the step index, read once per frame (:func:`read_coefficients`).

How it is made fast (measured on the Reference platform, which the engine uses for small
molecules on a CPU; ``benchmarks/integrator_profile.py``, ``benchmarks/md_throughput.py``). OpenMM's
Reference ``CustomIntegrator`` draws a uniform and a Gaussian random number for every degree of
freedom in *every* per-DOF computation and copies every per-DOF variable into the expression, so its
cost is the number of per-DOF computations per step (about 2 us each for 22 atoms) times (1 + a
little per per-DOF variable, ~0.04 us each); the expressions themselves cost almost nothing. So:

* **Merged kicks.** The context's velocity variable holds the half-kicked velocity
  ``u = v + dt/2 f(x)/m`` (the closing B of one step merged with the opening B of the next),
  and one BAOAB step is two per-DOF computations given xi:

      x  <- x + dt/2 ((1 + a) u + s xi)          (A O A in one: x + dt/2 u + dt/2 (a u + s xi))
      u  <- a u + s xi + dt f(x)/m                (O, then B of this step and B of the next)

  with s = sqrt((1 - a^2) kT/m). On-step velocities are ``v = u - dt/2 f/m``
  (:func:`onstep_velocities`; the engine reads f at every frame anyway), and a state is set with
  :func:`set_onstep_velocities`. Algebraically this is the BAOAB step above; only rounding
  (1e-16 relative in double precision) differs.
* **Host noise** removes the third computation (``xi <- gaussian``: one Gaussian feeds both updates
  and must be kept) and the accumulators, for one ``setPerDofVariableByName`` of a (P, 3) array per
  step (~1.1 us), P·3 numpy normals per step (~0.8 us for 22 atoms) and a (N, K) x (K, 3P) product
  per frame; it also spares the engine reading N per-DOF variables per frame (~45 us at N = 3).
  With OpenMM's noise one step is 3 + N/M per-DOF computations.
* **Substeps per call.** One call of ``integrator.step(1)`` runs ``substeps`` = M physical steps
  (M divides the steps per frame K; see :func:`choose_substeps`) with ``xi0 .. xi{M-1}``: the
  per-call overhead (~2.5 us) is shared by M steps, and with OpenMM's noise each accumulator is
  updated once per call with M terms. The step size OpenMM sees is M·dt, so the context's time
  stays right.

The global ``kstep`` counts steps within the frame (0, M, 2M, ...) and wraps at K (the frame's last
call writes the frame outputs; the accumulators restart when a call begins at ``kstep == 0``: read
them after each full frame). No ``UpdateContextState``: the systems have no barostat, thermostat
force or CMMotionRemover.
"""
from __future__ import annotations

from itertools import chain

import numpy as np

from ..brownian import legendre_step_weights
from ..units import BOLTZMANN_KJ_MOL_K

#: the largest number of physical steps per integrator call (see the module docstring). Measured with
#: ``benchmarks/md_throughput.py --compare-only --frame-fs 100 --rounds 9 --max-substeps M`` (Reference
#: platform, one replica, N = 3, stock/this per core): 0.789 at 5, 0.806 at 10 (N = 8: 0.714 vs 0.733;
#: benchmarks/results/md_throughput_stock_cpu_substeps{5,10}.json); more substeps add per-DOF
#: variables but fewer accumulator updates. Both measured with OpenMM's noise; the host-noise program
#: costs the same at 5 and 10 (set and step only, interleaved, 60 rounds: 48.7 vs 48.8 us per step at
#: 20-step frames, 49.6 vs 49.5 at 100; 1: 51.2, 2: 50.0, 20: 49.9-50.3), as it trades per-call
#: overhead (~2.5 us) against ~0.04 us per per-DOF variable and computation
MAX_SUBSTEPS = 10
#: names this integrator's program and state convention (the context's velocities are half-kicked
#: u = v + dt/2 f/m); recorded in run files: an OpenMM checkpoint is only reused by the same program.
#: INTEGRATOR_ID: Gaussians drawn by OpenMM, coefficients accumulated in the integrator (GPU platforms);
#: HOST_NOISE_INTEGRATOR_ID: Gaussians set by the host each call, no accumulators (CPU and Reference)
INTEGRATOR_ID = "molflow-baoab-merged-kicks-3"
HOST_NOISE_INTEGRATOR_ID = "molflow-baoab-merged-kicks-host-noise-1"


def choose_substeps(steps_per_frame: int, other_steps: int = 0) -> int:
    """Physical steps per integrator call: the largest M <= MAX_SUBSTEPS dividing both counts.

    ``other_steps`` is any other stretch the same integrator must run exactly (equilibration).
    """
    g = int(np.gcd(int(steps_per_frame), int(other_steps)))
    return next(m for m in range(MAX_SUBSTEPS, 0, -1) if g % m == 0)


def recording_integrator(temperature_K: float, friction_per_ps: float, timestep_fs: float,
                         steps_per_frame: int, n_coefficients: int, seed: int, substeps: int = 1,
                         frame_forces: bool = False, frame_energy: bool = False, host_noise: bool = False):
    """Build the BAOAB ``CustomIntegrator`` (module docstring) for frames of ``steps_per_frame`` steps.

    ``host_noise=False`` (the GPU program, :data:`INTEGRATOR_ID`): OpenMM draws ``xi{m}`` and the
    integrator accumulates L^(0..N-1) per DOF (sqrt(ps)); read them with :func:`read_coefficients`.
    ``n_coefficients`` may be 0 (no recording, the plain engine).
    ``host_noise=True`` (the CPU/Reference program, :data:`HOST_NOISE_INTEGRATOR_ID`): the caller sets
    ``xi0 .. xi{M-1}`` before every call (:class:`HostNoise`) and computes the coefficients itself;
    the program has no accumulators and ``n_coefficients`` only has to be valid.

    ``seed`` must be non-zero (OpenMM reads 0 as "random"). ``substeps`` physical steps of
    ``timestep_fs`` run per call of ``step(1)``; it must divide ``steps_per_frame``. The context's
    velocities are half-kicked (module docstring): convert with :func:`onstep_velocities` /
    :func:`set_onstep_velocities`.

    Frame outputs, so a frame is read without another force evaluation (``Context.getState``
    with forces or energy evaluates them again, about as long as one step): with
    ``frame_forces``, the last call of each frame copies the forces at the frame's positions into
    ``xi0`` once that call has used it; with ``frame_energy``, the force evaluation of that
    call's last substep also computes the potential energy into the global ``epot``. Read them with
    :func:`read_frame_outputs`, only right after a full frame. With OpenMM's noise these extra
    computations draw random numbers too, so a run with and without them differs (each is
    reproducible); with host noise they change nothing else.
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
    integ.addGlobalVariable("host_noise", 1.0 if host_noise else 0.0)
    if host_noise:  # the host's noise-stream position, kept here so the OpenMM checkpoint carries it
        for name in HostNoise.CHECKPOINT_GLOBALS:
            integ.addGlobalVariable(name, 0)
    for m in range(M):  # first, so xi{m} is per-DOF variable m
        integ.addPerDofVariable(f"xi{m}", 0)
    n_acc = 0 if host_noise else int(n_coefficients)
    weights = legendre_step_weights(n_acc, K, dt_ps) if n_acc else None
    for n in range(n_acc):
        integ.addPerDofVariable(f"L{n}", 0)
        integ.addTabulatedFunction(f"w{n}", openmm.Discrete1DFunction(weights[n].tolist()))
    if frame_energy:
        integ.addGlobalVariable("epot", 0)
    last_call = f"kstep = {K - M}"  # the condition of a frame's last call (kstep is the frame's step)
    for m in range(M):
        if not host_noise:
            integ.addComputePerDof(f"xi{m}", "gaussian")
        _add_baoab_step(integ, f"xi{m}", energy_if=last_call if frame_energy and m == M - 1 else None)
    for n in range(n_acc):
        terms = " + ".join(f"w{n}(kstep + {m})*xi{m}" for m in range(M))
        integ.addComputePerDof(f"L{n}", f"select(kstep, L{n}, 0) + {terms}")
    if frame_forces:
        integ.beginIfBlock(last_call)
        integ.addComputePerDof("xi0", "f")
        integ.endBlock()
    integ.addComputeGlobal("kstep", f"select(kstep + {M} - K, kstep + {M}, 0)")
    integ.setRandomNumberSeed(int(seed))
    return integ


def _add_baoab_step(integ, xi: str, energy_if: str | None = None) -> None:
    """One merged-kick BAOAB step driven by the per-DOF Gaussian ``xi`` (the two per-DOF computations
    of the module docstring; globals h, a, b, c, bh, kT). ``energy_if``: a condition under which the
    step's force evaluation also computes the potential energy into the global ``epot``."""
    integ.addComputePerDof("x", f"x + c*v + bh*sqrt(kT/m)*{xi}")
    if energy_if is not None:  # OpenMM then evaluates forces and energy together here
        integ.beginIfBlock(energy_if)
        integ.addComputeGlobal("epot", "energy")
        integ.endBlock()
    integ.addComputePerDof("v", f"a*v + b*sqrt(kT/m)*{xi} + h*f/m")


def integrator_id(host_noise: bool) -> str:
    """The program name recorded in run files for an integrator built with ``host_noise``."""
    return HOST_NOISE_INTEGRATOR_ID if host_noise else INTEGRATOR_ID


def uses_host_noise(integrator) -> bool:
    """Whether ``integrator`` was built with ``host_noise=True`` (its caller supplies the Gaussians)."""
    return bool(integrator.getGlobalVariableByName("host_noise"))


class HostNoise:
    """The per-step Gaussians of a ``host_noise`` integrator, drawn with numpy and set before each call.

    A *stretch* (a frame, or a piece of equilibration) of ``n`` steps gets ``xi`` (n, P, 3) standard
    normals, a function of the stream's ``key`` (integers: the run's seed, the group's index, the
    restart, the phase) and the stretch's index only: the stream is numpy's PCG64 seeded by
    ``SeedSequence(key)``, and stretch ``j`` starts ``j``·2^64 draws into it (``PCG64.advance``, ~2 us),
    so no stretch reads another's numbers and a run continued from any stretch draws what an
    uninterrupted one would. :meth:`save` keeps the stream's position (restart, next stretch) in
    integrator globals, so an OpenMM checkpoint of the context carries it; :meth:`saved` reads it back.

    Cost per physical step on the Reference platform (22 atoms): one ``setPerDofVariable`` of a
    (P, 3) array (~1 us) and ~0.8 us of Gaussians, against the ~2 us per-DOF computation that drew
    them inside OpenMM plus the accumulators (module docstring).
    """

    #: integrator globals holding the stream position (restart, next stretch index) in OpenMM checkpoints
    CHECKPOINT_GLOBALS = ("noise_restart", "noise_next")
    _STRIDE = 1 << 64

    def __init__(self, integrator, n_particles: int):
        if not uses_host_noise(integrator):
            raise ValueError("HostNoise needs an integrator built with host_noise=True")
        self.integrator = integrator
        self.n_particles = int(n_particles)
        self._names = [f"xi{m}" for m in range(substeps_of(integrator))]
        # set by index (recording_integrator adds xi0 .. xi{M-1} first, so xi{m} is per-DOF variable m):
        # ~0.1 us per step less than by name
        self._by_index = all(integrator.getPerDofVariableName(m) == name for m, name in enumerate(self._names))
        self._bitgen = np.random.PCG64(0)
        self._generator = np.random.Generator(self._bitgen)
        self._base: dict | None = None
        self.key: tuple[int, ...] = ()
        self.last: np.ndarray | None = None  # the Gaussians of the last stretch drawn or run (n, P, 3)

    def select(self, *key: int) -> None:
        """Use the stream of ``key`` (non-negative integers below 2^32)."""
        self.key = tuple(int(k) for k in key)
        self._base = np.random.PCG64(np.random.SeedSequence(self.key)).state

    def draw(self, index: int, n_steps: int) -> np.ndarray:
        """The Gaussians (n_steps, P, 3) float64 of stretch ``index`` of the selected stream."""
        self.last = self.draw_many(index, 1, n_steps)[0]
        return self.last

    def draw_many(self, first: int, count: int, n_steps: int) -> np.ndarray:
        """The Gaussians (count, n_steps, P, 3) of stretches ``first .. first + count - 1``: entry ``j`` is
        :meth:`draw` ``(first + j, n_steps)``, number for number.

        Drawing several stretches in one go is what the engine does between frames: the same numbers,
        but numpy's code stays in the CPU caches between the stretches instead of being evicted by the
        OpenMM steps of every frame (~15 us per 20-step frame on the Reference platform)."""
        if self._base is None:
            raise RuntimeError("HostNoise.select a stream first")
        out = np.empty((int(count), int(n_steps), self.n_particles, 3))
        bitgen, normal = self._bitgen, self._generator.standard_normal
        for j in range(int(count)):
            bitgen.state = self._base
            bitgen.advance((int(first) + j) * self._STRIDE)
            normal(out=out[j])  # the same numbers as standard_normal((n_steps, P, 3))
        return out

    def run(self, xi: np.ndarray) -> None:
        """Advance ``len(xi)`` physical steps (a multiple of the substeps) driven by ``xi`` (n, P, 3);
        ``last`` is then ``xi``."""
        names, M = self._names, len(self._names)
        if len(xi) % M:
            raise ValueError(f"{len(xi)} steps is not a multiple of the integrator's {M} substeps")
        self.last = xi
        step = self.integrator.step
        if not self._by_index:
            set_xi = self.integrator.setPerDofVariableByName
            for k in range(0, len(xi), M):
                for m in range(M):
                    set_xi(names[m], xi[k + m])
                step(1)
            return
        set_xi, m = self.integrator.setPerDofVariable, 0
        for row in xi:
            set_xi(m, row)
            m += 1
            if m == M:
                step(1)
                m = 0

    def save(self, restart: int, next_index: int) -> None:
        """Store the stream position (restart, next stretch) in the integrator's globals."""
        for name, value in zip(self.CHECKPOINT_GLOBALS, (restart, next_index)):
            self.integrator.setGlobalVariableByName(name, float(value))

    def saved(self) -> tuple[int, int]:
        """(restart, next stretch) as stored by :meth:`save` (or restored with an OpenMM checkpoint)."""
        return tuple(int(round(self.integrator.getGlobalVariableByName(n))) for n in self.CHECKPOINT_GLOBALS)


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
    if uses_host_noise(integrator):
        raise ValueError("a host-noise integrator accumulates no coefficients: apply the weights to the "
                         "Gaussians it was given (HostNoise.last)")
    return np.stack([_vec3_array(integrator.getPerDofVariableByName(f"L{n}")) for n in range(n_coefficients)])


def read_noise(integrator) -> np.ndarray:
    """(M, n_particles, 3) Gaussians of the last call's M substeps (for tests and debugging): drawn by
    OpenMM, or as the host set them; with ``frame_forces``, ``xi0`` holds forces after a frame's last call."""
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
    fast = getattr(state, "_getVectorAsNumpy", None)
    if fast is not None:
        out = np.empty((state._getNumParticles(), 3), dtype=np.float64)
        fast((_STATE_CODES or _state_codes())[kind], out)
        return out
    get = {"positions": state.getPositions, "velocities": state.getVelocities, "forces": state.getForces}[kind]
    return np.array(get(asNumpy=True)._value, dtype=np.float64)


_STATE_CODES: dict[str, int] = {}  # kind -> openmm.State code, filled on first use (openmm imports lazily)


def _state_codes() -> dict[str, int]:
    import openmm

    _STATE_CODES.update(positions=openmm.State.Positions, velocities=openmm.State.Velocities,
                        forces=openmm.State.Forces)
    return _STATE_CODES


def _vec3_array(values) -> np.ndarray:
    """A sequence of OpenMM Vec3 as a (P, 3) float64 array (about 3x faster than np.asarray on it; measured
    against np.array, a list comprehension and array.array, np.fromiter over the chained tuples is the
    fastest; the 22 Vec3 objects OpenMM builds for a per-DOF read cost ~10 us more, which no public call avoids)."""
    return np.fromiter(chain.from_iterable(values), dtype=np.float64, count=3 * len(values)).reshape(-1, 3)
