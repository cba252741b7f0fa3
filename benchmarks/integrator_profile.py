"""Where a step of the recording integrator goes (issue 18; not a test).

Times, per 1-fs step of alanine dipeptide on OpenMM's Reference platform (thread CPU time, best of
``--repeats``): stock ``LangevinMiddleIntegrator``; a bare force evaluation (a ``CustomIntegrator``
that moves x and reads f); one per-DOF computation with a constant, with ``gaussian``, and with
13 extra per-DOF variables present; molflow's recording integrator at N = 0 and 3 coefficients with
M = 1, 5, 10 substeps per call; the CPU platform (one thread) for stock and N = 3. The point: a
Reference ``CustomIntegrator`` per-DOF computation costs about the same whatever its expression, and
a recording BAOAB step needs three of them (draw xi; x; v: one Gaussian feeds two updates and must be
kept for the coefficients), so the recording engine's floor is the force plus ~3 computations.

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
    from molflow.md.integrator import recording_integrator
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
    cases["stock, CPU platform (1 thread)"] = (openmm.LangevinMiddleIntegrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs / 1000.0), 1, "CPU")
    cases["recording N=3, M=10, CPU platform (1 thread)"] = (recording_integrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs, 100, 3, 5, substeps=10), 10, "CPU")
    contexts = {name: context(integ, plat) for name, (integ, _, plat) in cases.items()}
    rows = []
    for name, (integ, M, plat) in cases.items():
        integ.step(max(1, 100 // M))
        us = min(time_call(lambda: integ.step(n // M))[0] for _ in range(args.repeats)) / n * 1e6
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
