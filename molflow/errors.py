"""Exceptions molflow raises for problems a user can fix (bad input, a blown-up run)."""
from __future__ import annotations


class MolflowError(Exception):
    """Base class: the command line prints these as one line and exits non-zero."""


class InputError(MolflowError, ValueError):
    """Bad input: a missing or malformed file, an unknown residue, an unsupported setting."""


class SimulationError(MolflowError, RuntimeError):
    """A simulation went wrong (NaN, exploding energy, molecule grew past the cutoff margin)."""


class TrainingError(MolflowError, RuntimeError):
    """Training could not go on (non-finite losses that restoring the last good state did not cure)."""
