"""Where a step of the recording integrator goes (issue 18; not a test).

Times, per 1-fs step of alanine dipeptide on OpenMM's Reference platform (thread CPU time, best of
``--repeats``): stock ``LangevinMiddleIntegrator``; a bare force evaluation (a ``CustomIntegrator``
that moves x and reads f); one per-DOF computation with a constant, with ``gaussian``, and with
13 extra per-DOF variables present; molflow's recording integrator with OpenMM's Gaussians (the GPU
program) at N = 0 and 3 coefficients with M = 1, 5, 10 substeps per call, and at N = 3, M = 10 with
the coefficients read once per 100-step frame as the engine does; the host-noise program (the
engine's CPU/Reference program: numpy draws each frame's Gaussians, sets M per-DOF variables before
each call and applies the coefficient weights once per frame) at N = 3, M = 10 with 100- and 20-step
frames; the CPU platform (one thread) for stock and the OpenMM-noise program. The point: a Reference
``CustomIntegrator`` per-DOF computation costs about the same whatever its expression, so with
OpenMM's Gaussians a recording BAOAB step needs three of them (draw xi; x; v: one Gaussian feeds two
updates and must be kept for the coefficients) plus the accumulators, and with host noise two, for
the price of setting one (P, 3) array and drawing P·3 normals in numpy per step. The cases run one
after another (not interleaved): on a shared machine compare ratios from ``md_throughput.py``.

    python benchmarks/integrator_profile.py --out benchmarks/results/integrator_profile_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import openmm

    import molflow
    from molflow.md.engine import cpu_description, minimise, platform_object, platform_properties
    from molflow.brownian import legendre_step_weights
    from molflow.md.integrator import HostNoise, read_coefficients, recording_integrator
    from molflow.md.stock import time_call
    from molflow.systems import load_system

    mol = load_system("alanine_dipeptide")
    x0 = minimise(mol)
    n = int(args.steps)

    def context(integ, plat="Reference"):
        c = openmm.Context(mol.create_system("nocutoff"), integ, platform_object(plat), platform_properties(plat, 1, False))
        c.setPositions(x0)
        c.setVelocitiesToTemperature(mol.temperature_K, 3)
        return c

    def host_noise_runner(integ, K, N):
        """Steps in whole frames of K: draw the frame's Gaussians, run them, apply the coefficient weights."""
        noise, w = HostNoise(integ, mol.n_atoms), legendre_step_weights(N, K, mol.timestep_fs / 1000.0)
        noise.select(5, 0, 0, 2)
        frame = [0]

        def run(steps):
            for _ in range(-(-steps // K)):
                xi = noise.draw(frame[0], K)
                frame[0] += 1
                noise.run(xi)
                w @ xi.reshape(K, -1)
        return run

    def custom(*ops, extra_vars=0):
        ci = openmm.CustomIntegrator(mol.timestep_fs / 1000.0)
        ci.addPerDofVariable("xi", 0)
        for k in range(extra_vars):
            ci.addPerDofVariable(f"y{k}", 0)
        for var, expr in ops:
            ci.addComputePerDof(var, expr)
        return ci, 1

    cases = {
        "stock (LangevinMiddleIntegrator)": (openmm.LangevinMiddleIntegrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs / 1000.0), 1, "Reference"),
        "force evaluation + 2 per-DOF computations": (*custom(("x", "x+1e-9"), ("v", "v+1e-9*f")), "Reference"),
        "1 per-DOF computation: constant": (*custom(("xi", "1")), "Reference"),
        "1 per-DOF computation: gaussian": (*custom(("xi", "gaussian")), "Reference"),
        "1 per-DOF computation: constant, 13 more per-DOF variables": (*custom(("xi", "1"), extra_vars=13), "Reference"),
    }
    for N in (0, 3):
        for M in (1, 5, 10):
            cases[f"recording N={N}, M={M}"] = (recording_integrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs, 100, N, 5, substeps=M), M, "Reference")
    # what the engine pays per frame on top with OpenMM's noise: reading the N accumulators
    integ = recording_integrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs, 100, 3, 5, substeps=10)
    cases["recording N=3, M=10, coefficients read per 100-step frame"] = (
        integ, 10, "Reference", lambda steps, integ=integ: [(integ.step(10), read_coefficients(integ, 3))
                                                            for _ in range(steps // 100)])
    # host noise (the engine's CPU/Reference program): the two per-DOF computations per step, the M
    # Gaussian arrays set before each call, and per frame of K steps the numpy draws and the coefficients
    for K in (100, 20):
        integ = recording_integrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs, K, 3, 5, substeps=10,
                                     host_noise=True)
        cases[f"recording N=3, host noise, M=10, {K}-step frames"] = (integ, 10, "Reference",
                                                                      host_noise_runner(integ, K, 3))
    cases["stock, CPU platform (1 thread)"] = (openmm.LangevinMiddleIntegrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs / 1000.0), 1, "CPU")
    cases["recording N=3, M=10, CPU platform (1 thread)"] = (recording_integrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs, 100, 3, 5, substeps=10), 10, "CPU")
    contexts = {name: context(integ, plat) for name, (integ, _, plat, *_) in cases.items()}
    rows = []
    for name, (integ, M, plat, *runner) in cases.items():
        run = runner[0] if runner else (lambda steps, integ=integ, M=M: integ.step(steps // M))
        run(100)
        us = min(time_call(lambda: run(n))[0] for _ in range(args.repeats)) / n * 1e6
        rows.append({"case": name, "platform": plat, "us_per_step_cpu": us})
        print(f"{name:62s} {us:7.1f} us/step", flush=True)
    del contexts
    stock = rows[0]["us_per_step_cpu"]
    for r in rows:
        r["stock_over_this"] = stock / r["us_per_step_cpu"]
    res = {"benchmark": "integrator_profile", "system": "alanine_dipeptide", "settings": vars(args), "rows": rows,
           "hardware": cpu_description(), "openmm": openmm.__version__, "molflow": molflow.__version__,
           "python": platform.python_version()}
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
