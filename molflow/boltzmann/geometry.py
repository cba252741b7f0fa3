"""Geometry of the Boltzmann sampler: the centre-free subspace and chirality (numpy and torch).

**Centre-free subspace** (DESIGN.md section 9, "Boltzmann geometry"). Positions x (A, 3) are
centred (their plain, unweighted centroid removed), so they live in the 3A - 3 dimensional subspace
{x : Σ_i x_i = 0}. Densities (the Gaussian base, the sampler's, the Boltzmann one) are taken with
respect to Lebesgue measure on that subspace, in the orthonormal coordinates

    η = Q_Aᵀ x   ((A-1, 3)),      x = Q_A η,

where Q_A (A, A-1) has orthonormal columns orthogonal to the all-ones vector (a Helmert basis).
The basis acts on the atom axis only, so it commutes with rotations and reflections: an isotropic
Gaussian on η is an isotropic Gaussian on centred positions.

**Chirality.** The force field's energy is mirror-symmetric, the molecule is not. A stereocentre
is a heavy atom with four bonded neighbours whose four branches are pairwise distinct
(compared as rooted trees of elements, :func:`stereocentres`; alanine dipeptide: the CA). Its
handedness in a structure is the sign of the signed volume of three of its substituents (taken in
a canonical order of their branches) about it; a sample is compared with the reference structure
(the system's PDB): every centre as in the reference -> kept; every centre inverted -> the mirror
image of an allowed structure, reflected back (x -> -x); some but not all inverted -> another
stereoisomer (mixed chirality), which is outside the target's support and gets weight zero.
"""
from __future__ import annotations

import numpy as np

#: depth (bonds) of the rooted-tree comparison of a candidate stereocentre's branches
BRANCH_DEPTH = 8


def centre_free_basis(n_atoms: int) -> np.ndarray:
    """Q_A (A, A-1): orthonormal columns spanning {v in R^A : Σ v = 0} (Helmert basis, float64)."""
    a = int(n_atoms)
    if a < 2:
        raise ValueError("the centre-free subspace needs at least 2 atoms")
    q = np.zeros((a, a - 1))
    for k in range(1, a):
        q[:k, k - 1] = 1.0
        q[k, k - 1] = -float(k)
        q[:, k - 1] /= np.sqrt(k * (k + 1.0))
    return q


def centre(x):
    """Remove the (unweighted) centroid over the atom axis (-2) of (..., A, 3); numpy or torch."""
    return x - x.mean(-2, keepdims=True) if isinstance(x, np.ndarray) else x - x.mean(-2, keepdim=True)


def _branch_signature(neighbours: list[list[int]], elements: list[str], atom: int, parent: int, depth: int):
    """A canonical rooted-tree signature of the branch that starts at ``atom`` coming from ``parent``."""
    if depth == 0:
        return (elements[atom],)
    kids = sorted(_branch_signature(neighbours, elements, n, atom, depth - 1) for n in neighbours[atom] if n != parent)
    return (elements[atom], tuple(kids))


def stereocentres(elements: list[str], bonds: np.ndarray, depth: int = BRANCH_DEPTH) -> list[tuple[int, tuple[int, int, int]]]:
    """Stereocentres from the topology: ``[(centre, (a, b, c)), ...]``.

    A centre is a heavy atom with exactly four bonded neighbours whose branches (rooted trees of
    elements up to ``depth`` bonds away from the centre) are pairwise different. ``(a, b, c)`` are
    three of its neighbours in the canonical order of their branch signatures (the same order in
    every structure of this topology), used by :func:`signed_volumes`.
    """
    a = len(elements)
    neighbours: list[list[int]] = [[] for _ in range(a)]
    for i, j in np.asarray(bonds, dtype=int).reshape(-1, 2):
        neighbours[i].append(int(j))
        neighbours[j].append(int(i))
    out = []
    for i in range(a):
        if elements[i] == "H" or len(neighbours[i]) != 4:
            continue
        sigs = [(_branch_signature(neighbours, elements, n, i, depth), n) for n in neighbours[i]]
        if len({s for s, _ in sigs}) < 4:
            continue
        order = [n for _, n in sorted(sigs)]
        out.append((i, (order[0], order[1], order[2])))
    return out


def signed_volumes(positions: np.ndarray, centres: list[tuple[int, tuple[int, int, int]]]) -> np.ndarray:
    """Signed volumes ((x_a - x_c) × (x_b - x_c)) · (x_d - x_c) (nm³) per centre: (..., n_centres)."""
    x = np.asarray(positions, dtype=np.float64)
    if not centres:
        return np.zeros(x.shape[:-2] + (0,))
    c = np.array([k for k, _ in centres])
    nb = np.array([s for _, s in centres])  # (n, 3)
    ra = x[..., nb[:, 0], :] - x[..., c, :]
    rb = x[..., nb[:, 1], :] - x[..., c, :]
    rd = x[..., nb[:, 2], :] - x[..., c, :]
    return (np.cross(ra, rb) * rd).sum(-1)


class ChiralityChecker:
    """Classifies structures against a reference: same handedness, mirror image, or mixed.

    ``reference_positions`` (A, 3) nm fixes the wanted sign of every stereocentre (the molecule's
    own stereoisomer, e.g. L-alanine in the shipped PDB).
    """

    def __init__(self, elements: list[str], bonds: np.ndarray, reference_positions: np.ndarray):
        self.centres = stereocentres(elements, bonds)
        self.reference_sign = np.sign(signed_volumes(reference_positions, self.centres))
        if np.any(self.reference_sign == 0):
            raise ValueError("the reference structure has a planar stereocentre; cannot define its chirality")

    @classmethod
    def for_system(cls, system) -> "ChiralityChecker":
        return cls(system.elements, system.bonds, system.positions_nm)

    @property
    def n_centres(self) -> int:
        return len(self.centres)

    def classify(self, positions: np.ndarray) -> np.ndarray:
        """(..., A, 3) -> int array (...): +1 every centre as the reference (or no centre), -1 every
        centre inverted (the mirror image), 0 mixed (some inverted, or a non-finite structure)."""
        x = np.asarray(positions, dtype=np.float64)
        if not self.centres:
            return np.where(np.isfinite(x).all((-1, -2)), 1, 0)
        s = np.sign(signed_volumes(x, self.centres)) * self.reference_sign
        same = (s > 0).all(-1)
        inverted = (s < 0).all(-1)
        return np.where(same, 1, np.where(inverted, -1, 0))

    def fold(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reflect mirror images back: returns (positions', ok (bool), reflected (bool)).

        Every-centre-inverted structures become x -> c - (x - c) (point inversion through their
        centroid c, an improper isometry: it inverts every centre and keeps the energy); mixed ones
        are returned unchanged with ``ok`` False.
        """
        x = np.array(positions, dtype=np.float64, copy=True)
        cls_ = self.classify(x)
        reflected = cls_ == -1
        if reflected.any():
            c = x[reflected].mean(-2, keepdims=True)
            x[reflected] = 2.0 * c - x[reflected]
        return x, cls_ != 0, reflected
