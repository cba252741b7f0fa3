"""The reference-MD engine: recording integrator, multi-copy systems, runs and resume.

Imports run one way: ``engine`` imports neither executor module; ``distributed`` imports the engine
and registers its "dask" executor (``engine.register_executor``), and this package loads it, so
``simulate(..., executor="dask")`` finds it whichever module the caller imported.
"""
from . import distributed as _distributed  # noqa: F401 - registers the "dask" executor
from .engine import simulate

__all__ = ["simulate"]
