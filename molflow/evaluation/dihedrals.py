"""Dihedral angles (radians, in (-pi, pi]) from positions, for any peptide's topology."""
from __future__ import annotations

import numpy as np


def dihedral_angles(positions_nm: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """Dihedral angles of atom quadruples.

    positions_nm: (..., A, 3); quads: (Q, 4) or (4,) atom indices. Returns (..., Q) or (...)
    radians, IUPAC sign convention (same as mdtraj.compute_dihedrals).
    """
    q = np.atleast_2d(np.asarray(quads, dtype=int))
    p = np.asarray(positions_nm, dtype=np.float64)
    b0 = p[..., q[:, 0], :] - p[..., q[:, 1], :]
    b1 = p[..., q[:, 2], :] - p[..., q[:, 1], :]
    b2 = p[..., q[:, 3], :] - p[..., q[:, 2], :]
    b1 = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1).sum(-1, keepdims=True) * b1  # components perpendicular to the axis b1
    w = b2 - (b2 * b1).sum(-1, keepdims=True) * b1
    out = np.arctan2((np.cross(b1, v) * w).sum(-1), (v * w).sum(-1))
    return out[..., 0] if np.ndim(quads) == 1 else out


def phi_psi(positions_nm: np.ndarray, system) -> tuple[np.ndarray, np.ndarray]:
    """(phi, psi) of the central residue of ``system`` (a MolecularSystem), radians."""
    phi_q, psi_q = system.central_dihedrals()
    return dihedral_angles(positions_nm, phi_q), dihedral_angles(positions_nm, psi_q)
