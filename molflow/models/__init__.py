"""Neural networks (pure torch; they know nothing of OpenMM): the equivariant backbone and the
molecular flow map built on it."""
from .molecular import MapConfig, MolecularFlowMap, atom_features
from .painn import PaiNN

__all__ = ["MapConfig", "MolecularFlowMap", "PaiNN", "atom_features"]
