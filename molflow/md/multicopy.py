"""Many non-interacting copies of one molecule in ONE OpenMM System (DESIGN.md section 4).

A 22-atom system is bound by per-step overhead, so on a GPU hundreds of replicas share one
Context. Copies sit on a cubic grid of sites spaced so that no two copies ever come within the
non-periodic cutoff of each other; nonbonded forces use that cutoff with plain truncated Coulomb
(reaction-field dielectric 1). While every intramolecular distance stays below the cutoff, each
copy's forces equal the single-molecule NoCutoff forces and its energy differs by a constant.

Copies drift (there is no centre-of-mass motion remover: it would couple them). At frame
boundaries a copy whose centroid strays more than ``RECENTRE_NM`` from its site (in any axis) is
moved back by a whole number of nm; the file stores positions in each copy's own frame:
``x_file = x_context + offset`` with ``offset`` an integer-nm vector per copy, so the recorded
trajectory is continuous and exactly translatable back.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import SimulationError

RECENTRE_NM = 0.5  # per-axis deviation of a copy's centroid from its site that triggers a move
DRIFT_ALLOWANCE_NM = 2.0  # centroid-to-site distance the spacing allows for (checked every frame)


@dataclasses.dataclass
class CopyLayout:
    """Where the copies of one Context sit. All lengths in nm."""

    n_copies: int
    n_atoms: int
    cutoff_nm: float
    spacing_nm: float
    sites_nm: np.ndarray  # (C, 3), integer nm
    offsets_nm: np.ndarray  # (C, 3), integer nm: x_file = x_context + offset

    @property
    def max_radius_nm(self) -> float:
        """Largest atom-to-centroid distance a copy may reach (intramolecular distances <= 2r)."""
        return 0.5 * self.cutoff_nm

    def to_file_frame(self, x_context: np.ndarray) -> np.ndarray:
        """(C*A, 3) context positions -> (C, A, 3) positions in each copy's own frame."""
        return x_context.reshape(self.n_copies, self.n_atoms, 3) + self.offsets_nm[:, None, :]

    def to_context_frame(self, x_file: np.ndarray) -> np.ndarray:
        """(C, A, 3) file-frame positions -> (C*A, 3) context positions."""
        return (x_file - self.offsets_nm[:, None, :]).reshape(-1, 3)

    def check_and_recentre(self, x_context: np.ndarray) -> bool:
        """Guard the cutoff margin; move drifting copies home. Returns True if positions changed.

        Raises SimulationError if positions are non-finite or a copy grew past the margin.
        ``x_context`` is modified in place when copies are moved.
        """
        x = x_context.reshape(self.n_copies, self.n_atoms, 3)
        if not np.all(np.isfinite(x)):
            bad = np.unique(np.nonzero(~np.isfinite(x))[0])
            raise SimulationError(f"non-finite positions in copy/copies {bad.tolist()} (the run blew up)")
        centroid = x.mean(axis=1)
        radius = np.linalg.norm(x - centroid[:, None, :], axis=-1).max(axis=1)
        if np.any(radius > self.max_radius_nm):
            c = int(np.argmax(radius))
            raise SimulationError(
                f"copy {c} grew to radius {radius[c]:.2f} nm, past the cutoff margin "
                f"({self.max_radius_nm:.2f} nm = cutoff/2): the molecule unfolded or exploded; "
                "use a larger cutoff_nm"
            )
        dev = centroid - self.sites_nm
        if np.any(np.linalg.norm(dev, axis=1) > DRIFT_ALLOWANCE_NM):
            raise SimulationError("a copy drifted past the allowance between two frames; use shorter frames")
        shift = np.where(np.abs(dev) > RECENTRE_NM, np.round(dev), 0.0)
        if not np.any(shift):
            return False
        x -= shift[:, None, :]
        self.offsets_nm += shift
        return True


def default_cutoff_nm(positions_nm: np.ndarray) -> float:
    """Cutoff for a molecule: at least 1.5 nm and twice (its radius + 0.5 nm)."""
    radius = np.linalg.norm(positions_nm - positions_nm.mean(0), axis=1).max()
    return float(max(1.5, np.ceil(2.0 * (radius + 0.5) * 10) / 10))


def make_layout(n_copies: int, positions_nm: np.ndarray, cutoff_nm: float) -> CopyLayout:
    """Grid layout for ``n_copies`` copies of a molecule with reference ``positions_nm``."""
    n_atoms = positions_nm.shape[0]
    spacing = float(np.ceil(2 * cutoff_nm + 2 * DRIFT_ALLOWANCE_NM))
    side = int(np.ceil(n_copies ** (1 / 3) - 1e-9))
    grid = np.stack(np.meshgrid(*(np.arange(side),) * 3, indexing="ij"), -1).reshape(-1, 3)[:n_copies]
    sites = (grid - (side - 1) // 2) * spacing
    centroid = np.round(positions_nm.mean(0))
    return CopyLayout(n_copies=n_copies, n_atoms=n_atoms, cutoff_nm=cutoff_nm, spacing_nm=spacing,
                      sites_nm=sites.astype(float), offsets_nm=(centroid - sites).astype(float))


def replicate_topology(topology, n_copies: int):
    """An OpenMM Topology with ``n_copies`` copies of ``topology`` (one chain each)."""
    from openmm import app

    out = app.Topology()
    atoms = list(topology.atoms())
    for _ in range(n_copies):
        chain = out.addChain()
        mapping = {}
        for res in topology.residues():
            new_res = out.addResidue(res.name, chain, res.id, res.insertionCode)
            for atom in res.atoms():
                mapping[atom.index] = out.addAtom(atom.name, atom.element, new_res, atom.id)
        for bond in topology.bonds():
            out.addBond(mapping[bond[0].index], mapping[bond[1].index], bond.type, bond.order)
    assert out.getNumAtoms() == n_copies * len(atoms)
    return out


def multicopy_system(molecule, n_copies: int, cutoff_nm: float):
    """The OpenMM System of ``n_copies`` non-interacting copies of ``molecule`` (a MolecularSystem)."""
    if n_copies == 1:
        # One copy needs no cutoff: use the exact reference system.
        return molecule.create_system("nocutoff")
    return molecule.create_system("cutoff", cutoff_nm, replicate_topology(molecule.topology, n_copies))
