"""Judging trajectories: dihedrals, distributions, figures (files in, numbers and pictures out)."""
from .dihedrals import dihedral_angles, phi_psi

__all__ = ["dihedral_angles", "phi_psi"]
