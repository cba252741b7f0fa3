"""The reference-MD engine: recording integrator, multi-copy systems, runs and resume."""
from .engine import simulate

__all__ = ["simulate"]
