"""Physical constants and unit helpers (nm, ps, kJ/mol, K, amu)."""
from __future__ import annotations

BOLTZMANN_KJ_MOL_K = 0.0083144626181532  # k_B in kJ/mol/K


def kinetic_temperature(velocities, masses_amu):
    """Kinetic temperature (K) of (..., A, 3) velocities in nm/ps with (A,) masses in amu.

    Works on numpy arrays and torch tensors alike; all 3A degrees of freedom are counted (molflow
    removes no centre-of-mass motion).
    """
    n_atoms = velocities.shape[-2]
    return (masses_amu[..., :, None] * velocities**2).sum((-1, -2)) / (3 * n_atoms * BOLTZMANN_KJ_MOL_K)
