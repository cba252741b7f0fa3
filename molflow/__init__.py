"""molflow: accelerated molecular-dynamics sampling with strong stochastic flow maps.

Units everywhere: nm, ps, kJ/mol, K, amu. Public API (imported lazily, so ``import molflow``
and the command line stay fast and torch is loaded only by the parts that need it):

- :func:`load_system` — a built-in molecule or any peptide PDB
- :func:`simulate` — reference Langevin MD with the Brownian path recorded
- :class:`Trajectory` — read a run file (lazy arrays, ``to_mdtraj``, ``iter_chunks``)
- :func:`floor` — the irreducible error of a map fed N path coefficients (pairs of MD runs)
- :func:`train`, :class:`FlowMap` — train a molecular flow map; load it and sample
- :func:`evaluate` — judge samples (trajectories or i.i.d. conformations) against reference MD
- :func:`train_boltzmann`, :class:`BoltzmannSampler` — few-step equilibrium conformations with exact
  Boltzmann weights
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_system": ("molflow.systems", "load_system"),
    "builtin_systems": ("molflow.systems", "builtin_systems"),
    "MolecularSystem": ("molflow.systems", "MolecularSystem"),
    "simulate": ("molflow.md.engine", "simulate"),
    "Trajectory": ("molflow.trajectory", "Trajectory"),
    "train": ("molflow.training.loop", "train"),
    "FlowMap": ("molflow.sampling", "FlowMap"),
    "floor": ("molflow.noise_floor", "floor"),
    "evaluate": ("molflow.evaluation.report", "evaluate"),
    "train_boltzmann": ("molflow.boltzmann.training", "train_boltzmann"),
    "BoltzmannSampler": ("molflow.boltzmann.sampler", "BoltzmannSampler"),
    "MolflowError": ("molflow.errors", "MolflowError"),
    "InputError": ("molflow.errors", "InputError"),
    "SimulationError": ("molflow.errors", "SimulationError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'molflow' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
