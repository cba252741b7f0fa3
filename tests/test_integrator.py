"""The recording BAOAB integrator: replay, coefficients, composition, law, parity with OpenMM."""
from __future__ import annotations

import numpy as np
import openmm
import pytest

from molflow.brownian import (coefficients_from_noise, compose, continuous_variances,
                              discrete_covariance)
from molflow.md.integrator import (HostNoise, choose_substeps, onstep_velocities, read_coefficients,
                                   read_frame_outputs, read_noise, recording_integrator, step_physical)
from molflow.units import BOLTZMANN_KJ_MOL_K, kinetic_temperature
from molflow.md.multicopy import make_layout, multicopy_system

DT_PS = 0.001


def _context(mol, n_copies, integrator, platform="Reference", seed=3):
    system = multicopy_system(mol, n_copies, 1.5)
    props = {"Threads": "1"} if platform == "CPU" else {}
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform), props)
    layout = make_layout(n_copies, mol.positions_nm, 1.5)
    ctx.setPositions(layout.to_context_frame(np.broadcast_to(mol.positions_nm, (n_copies, mol.n_atoms, 3))))
    ctx.setVelocitiesToTemperature(mol.temperature_K, seed)
    return ctx


def _state(ctx, masses):
    """Positions and ON-STEP velocities (the context holds half-kicked ones: molflow.md.integrator)."""
    s = ctx.getState(getPositions=True, getVelocities=True, getForces=True)
    u, f = np.array(s.getVelocities(asNumpy=True)._value), np.array(s.getForces(asNumpy=True)._value)
    return np.array(s.getPositions(asNumpy=True)._value), onstep_velocities(u, f, masses, DT_PS)


@pytest.fixture(scope="module")
def debug_run(ala2):
    """200 steps on Reference (double precision), 5 substeps per call, Gaussians read after every call."""
    K, N, M = 100, 4, 5
    integ = recording_integrator(300.0, 1.0, 1.0, K, N, seed=17, substeps=M)
    ctx = _context(ala2, 1, integ)
    step_physical(integ, 50)  # leave the minimum; kstep is then 50: restart the frame counter
    integ.setGlobalVariableByName("kstep", 0)
    x0, v0 = _state(ctx, ala2.masses_amu)
    xis, frames_L = [], []
    for k in range(200 // M):
        integ.step(1)
        xis.extend(read_noise(integ))
        if (k + 1) % (K // M) == 0:
            frames_L.append(read_coefficients(integ, N))
    x1, v1 = _state(ctx, ala2.masses_amu)
    return dict(x0=x0, v0=v0, x1=x1, v1=v1, xi=np.array(xis), L=frames_L, K=K, N=N)


@pytest.fixture(scope="module")
def host_debug_run(ala2):
    """The host-noise program: 200 steps driven by HostNoise's Gaussians (two 100-step stretches)."""
    K, M = 100, 5
    integ = recording_integrator(300.0, 1.0, 1.0, K, 3, seed=17, substeps=M, host_noise=True)
    ctx = _context(ala2, 1, integ)
    noise = HostNoise(integ, ala2.n_atoms)
    noise.select(17, 0, 0, 2)
    noise.run(noise.draw(99, 50))  # leave the minimum
    x0, v0 = _state(ctx, ala2.masses_amu)
    xis = []
    for j in range(2):
        xis.append(noise.draw(j, K))
        noise.run(xis[-1])
        np.testing.assert_array_equal(read_noise(integ), xis[-1][-M:])  # the integrator holds what was set
    x1, v1 = _state(ctx, ala2.masses_amu)
    return dict(x0=x0, v0=v0, x1=x1, v1=v1, xi=np.concatenate(xis))


@pytest.mark.parametrize("run", ["debug_run", "host_debug_run"])
def test_replay_numpy_baoab_reproduces_openmm(ala2, run, request):
    """An independent numpy BAOAB with OpenMM forces and the recorded Gaussians lands on OpenMM, for
    the Gaussians drawn by OpenMM and for those set by the host."""
    debug_run = request.getfixturevalue(run)
    force_ctx = openmm.Context(ala2.create_system("nocutoff"), openmm.VerletIntegrator(DT_PS),
                               openmm.Platform.getPlatformByName("Reference"))

    def force(x):
        force_ctx.setPositions(x)
        return np.array(force_ctx.getState(getForces=True).getForces(asNumpy=True)._value)

    m = ala2.masses_amu[:, None]
    gamma, kT = 1.0, BOLTZMANN_KJ_MOL_K * 300.0
    a = np.exp(-gamma * DT_PS)
    b = np.sqrt(1 - a * a)
    x, v = debug_run["x0"].copy(), debug_run["v0"].copy()
    f = force(x)
    for xi in debug_run["xi"]:
        v = v + 0.5 * DT_PS * f / m
        x = x + 0.5 * DT_PS * v
        v = a * v + b * np.sqrt(kT / m) * xi
        x = x + 0.5 * DT_PS * v
        f = force(x)
        v = v + 0.5 * DT_PS * f / m
    # the contract asks 1e-5 nm over 200 steps; in double precision the two agree far closer
    assert np.abs(x - debug_run["x1"]).max() < 1e-5
    assert np.abs(v - debug_run["v1"]).max() < 1e-4
    assert np.abs(x - debug_run["x0"]).max() > 1e-3  # and the molecule did move


def test_accumulated_coefficients_equal_those_of_the_noise(debug_run):
    K, N, xi = debug_run["K"], debug_run["N"], debug_run["xi"]
    for i, L in enumerate(debug_run["L"]):
        expected = coefficients_from_noise(xi[i * K:(i + 1) * K], N, DT_PS)
        np.testing.assert_allclose(L, expected, atol=1e-12, rtol=0)


def test_composing_frames_equals_coefficients_of_the_union(debug_run):
    K, N, xi = debug_run["K"], debug_run["N"], debug_run["xi"]
    union = coefficients_from_noise(xi, N, DT_PS)  # 200 steps accumulated directly
    composed = compose(debug_run["L"], [K * DT_PS, K * DT_PS])
    np.testing.assert_allclose(composed, union, atol=1e-12, rtol=0)


@pytest.mark.parametrize("substeps", [1, 3, 4])
def test_coefficients_for_any_substeps(ala2, substeps):
    """Every substep count accumulates exactly sum_k w[n, k] xi_k (12-step frames, N = 3)."""
    K, N = 12, 3
    integ = recording_integrator(300.0, 1.0, 1.0, K, N, seed=5, substeps=substeps)
    ctx = _context(ala2, 1, integ)  # noqa: F841 - the integrator needs its context alive
    for frame in range(2):
        xis = []
        for _ in range(K // substeps):
            integ.step(1)
            xis.extend(read_noise(integ))
        np.testing.assert_allclose(read_coefficients(integ, N), coefficients_from_noise(np.array(xis), N, DT_PS),
                                   atol=1e-12, rtol=0)


def test_frame_outputs_equal_a_fresh_evaluation(ala2):
    """Forces and energy kept by a frame's last call equal OpenMM's own evaluation at that frame."""
    K = 20
    integ = recording_integrator(300.0, 1.0, 1.0, K, 3, seed=5, substeps=choose_substeps(K),
                                 frame_forces=True, frame_energy=True)
    ctx = _context(ala2, 1, integ)
    for _ in range(3):
        step_physical(integ, K)
        f, e = read_frame_outputs(integ, energy=True)
        s = ctx.getState(getForces=True, getEnergy=True)
        np.testing.assert_array_equal(f, s.getForces(asNumpy=True)._value)
        assert e == pytest.approx(s.getPotentialEnergy()._value, abs=1e-9)
    assert read_frame_outputs(integ, energy=False)[1] is None


def test_host_noise_streams(ala2):
    """A stretch's Gaussians depend on (key, index) only: drawn in any order, after any other draws, by
    another HostNoise; different keys and indices differ; they are standard normal; the stream
    position survives an OpenMM checkpoint; a host-noise program accumulates no coefficients."""
    integ = recording_integrator(300.0, 1.0, 1.0, 20, 3, seed=5, substeps=10, host_noise=True)
    ctx = _context(ala2, 1, integ)
    a, b = HostNoise(integ, 22), HostNoise(integ, 22)
    a.select(7, 1, 0, 2)
    b.select(7, 1, 0, 2)
    x3 = a.draw(3, 20).copy()
    a.draw(0, 20), a.draw(5, 7)
    np.testing.assert_array_equal(a.draw(3, 20), x3)
    np.testing.assert_array_equal(b.draw(3, 20), x3)
    np.testing.assert_array_equal(b.draw(3, 10), x3[:10])  # a stretch's first steps do not depend on its length
    assert not np.array_equal(a.draw(4, 20), x3)
    b.select(7, 1, 1, 2)
    assert not np.array_equal(b.draw(3, 20), x3)
    z = np.concatenate([a.draw(j, 20) for j in range(200)]).ravel()  # 264000 draws
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    a.save(4, 123456)
    ck = ctx.createCheckpoint()
    a.save(0, 0)
    ctx.loadCheckpoint(ck)
    assert a.saved() == (4, 123456)
    with pytest.raises(ValueError, match="no coefficients"):
        read_coefficients(integ, 3)
    with pytest.raises(ValueError, match="host_noise=True"):
        HostNoise(recording_integrator(300.0, 1.0, 1.0, 20, 3, seed=5, substeps=10), 22)


def test_choose_substeps():
    assert choose_substeps(100, 10000) == 10 and choose_substeps(20) == 10 and choose_substeps(12) == 6
    assert choose_substeps(100, 10002) == 2 and choose_substeps(7) == 7 and choose_substeps(11) == 1 and choose_substeps(9, 3) == 3
    with pytest.raises(ValueError, match="divisor"):
        recording_integrator(300.0, 1.0, 1.0, 10, 3, seed=1, substeps=4)


def test_coefficient_law(ala2):
    """Empirical covariance of L^(0..3) over many DOFs and frames against the exact discrete law.

    8 copies x 22 atoms x 3 axes x 12 frames = 6336 iid draws per coefficient (the per-DOF
    Gaussians are independent). A covariance entry estimated from n draws has standard error
    sqrt((S_ii S_jj + S_ij^2)/n); we allow 5 SE. The exact law at K = 100 is within 1% of
    h/(2n+1), so the same data also pins the continuous variances within 5 SE + 1%.
    """
    K, N, frames = 100, 4, 12
    integ = recording_integrator(300.0, 1.0, 1.0, K, N, seed=99, substeps=5)
    ctx = _context(ala2, 8, integ, platform="CPU")
    samples = []
    for _ in range(frames):
        step_physical(integ, K)
        samples.append(read_coefficients(integ, N).reshape(N, -1))
    L = np.concatenate(samples, axis=1)
    n = L.shape[1]
    emp = L @ L.T / n
    exact = discrete_covariance(N, K, DT_PS)
    se = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact**2) / n)
    assert np.all(np.abs(emp - exact) < 5 * se), (emp, exact)
    cont = continuous_variances(N, K * DT_PS)
    assert np.all(np.abs(np.diag(exact) / cont - 1) < 0.01)
    assert np.all(np.abs(np.diag(emp) / cont - 1) < 5 * np.sqrt(2 / n) + 0.01)
    del ctx


def test_same_distribution_as_stock_langevin_middle(ala2):
    """Potential energy and kinetic temperature against OpenMM's LangevinMiddleIntegrator.

    8 copies x 15 ps per integrator after 3 ps equilibration, frames every 50 fs. Error bars come
    from the spread of the 8 independent copy means (SE = std/sqrt(8)); we allow 4 combined SE.
    Kinetic temperature: BAOAB's on-step velocities are biased low by (1 - (omega dt/2)^2) on stiff
    bonds (about 2% at 1 fs), while the mid-step velocity v - dt/2 f/m (after the O step) is
    the thermostat's exact one; so the test checks mid-step temperature against 300 K, like the
    stock integrator's reported half-step velocities, and that the on-step one is within 4% below.
    """
    C, equil, frames, every = 8, 3000, 300, 50
    A = ala2.n_atoms
    masses = np.tile(ala2.masses_amu, 1)

    def run(integ, on_step):
        ctx = _context(ala2, C, integ, platform="CPU", seed=5)
        step = (lambda n: step_physical(integ, n)) if on_step else integ.step
        step(equil)
        pe, t_mid, t_on = np.zeros((frames, C)), np.zeros((frames, C)), np.zeros((frames, C))
        from molflow.md.engine import EnergyEvaluator
        energy = EnergyEvaluator(ala2, "CPU")
        for i in range(frames):
            step(every)
            s = ctx.getState(getPositions=True, getVelocities=True, getForces=True)
            x = np.array(s.getPositions(asNumpy=True)._value).reshape(C, A, 3)
            v = np.array(s.getVelocities(asNumpy=True)._value).reshape(C, A, 3)
            f = np.array(s.getForces(asNumpy=True)._value).reshape(C, A, 3)
            pe[i] = energy(x)
            if on_step:  # ours holds half-kicked u = v + dt/2 f/m: on-step v, and mid-step v - dt/2 f/m
                v = onstep_velocities(v, f, masses, DT_PS)
            v_mid = v - 0.5 * DT_PS * f / masses[:, None] if on_step else v
            for c in range(C):
                t_mid[i, c] = kinetic_temperature(v_mid[c], masses)
                t_on[i, c] = kinetic_temperature(v[c], masses)
        return pe, t_mid, t_on

    ours = run(recording_integrator(300.0, 1.0, 1.0, 100, 3, seed=21, substeps=5), on_step=True)
    stock = openmm.LangevinMiddleIntegrator(300.0, 1.0, DT_PS)
    stock.setRandomNumberSeed(22)
    theirs = run(stock, on_step=False)

    def mean_se(a):
        m = a.mean(0)
        return m.mean(), m.std(ddof=1) / np.sqrt(len(m))

    (pe1, s1), (pe2, s2) = mean_se(ours[0]), mean_se(theirs[0])
    assert abs(pe1 - pe2) < 4 * np.hypot(s1, s2), (pe1, s1, pe2, s2)
    (t1, u1), (t2, u2) = mean_se(ours[1]), mean_se(theirs[1])
    assert abs(t1 - 300.0) < 4 * u1, (t1, u1)
    assert abs(t2 - 300.0) < 4 * u2, (t2, u2)
    # paired ratio on the same frames: each harmonic mode's on-step factor is 1 - (omega dt/2)^2,
    # between 1 and 0.918 for the stiffest mode (C-H stretch, period ~11 fs): the mean must too.
    ratio = ours[2].mean() / ours[1].mean()
    assert 0.918 < ratio < 1.0, ratio


def test_state_array_equals_the_public_reads(ala2):
    """state_array (OpenMM's numpy fast path) gives exactly what getPositions/getVelocities/getForces
    (asNumpy) give."""
    from molflow.md.integrator import state_array

    ctx = openmm.Context(ala2.create_system("nocutoff"), openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(ala2.positions_nm)
    ctx.setVelocitiesToTemperature(300.0, 1)
    st = ctx.getState(getPositions=True, getVelocities=True, getForces=True)
    for kind, get in (("positions", st.getPositions), ("velocities", st.getVelocities), ("forces", st.getForces)):
        np.testing.assert_array_equal(state_array(st, kind), np.array(get(asNumpy=True)._value))
