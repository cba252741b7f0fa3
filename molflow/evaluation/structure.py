"""Structural distances (numpy): raw and optimally superposed RMSD, wrapped angle differences."""
from __future__ import annotations

import numpy as np


def rmsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Raw RMSD (nm) between (..., A, 3) conformations, no superposition (rigid drift counts)."""
    return np.sqrt(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).sum(-1).mean(-1))


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMSD (nm) after optimal superposition of ``a`` onto ``b`` (rotation only, no reflection)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a - a.mean(-2, keepdims=True)
    b = b - b.mean(-2, keepdims=True)
    h = np.swapaxes(a, -1, -2) @ b  # (..., 3, 3) covariance
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, -1] *= d[..., None]  # forbid reflections
    rotated = a @ (u @ vt)
    return np.sqrt(((rotated - b) ** 2).sum(-1).mean(-1))


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b wrapped into (-pi, pi] (radians)."""
    return np.angle(np.exp(1j * (np.asarray(a) - np.asarray(b))))
