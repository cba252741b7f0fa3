"""Few-step Boltzmann sampler with exact Boltzmann reweighting (issues #5 and 19, DESIGN.md sections 6, 9).

The default sampler (:mod:`.icflow`, ``kind: internal``) works in the internal coordinates of a
Z-matrix (:mod:`.internal`): torsion histograms for the broad torsions, a fitted Gaussian for the stiff
coordinates given them, and 1-10 affine coupling steps trained against the force field; every piece has
an exact density, so the weights are exact and cost one energy evaluation per sample. The Cartesian
alternative (``kind: vp``): an SSFM of the reverse-time VP diffusion SDE on centred all-atom positions
(:mod:`.model`, trained by :mod:`.training`) whose exact Jacobian gives the weights (:mod:`.reweight`);
chirality is handled explicitly (:mod:`.geometry`). Both sample through :class:`BoltzmannSampler`
(:mod:`.sampler`); an exact annealed finish is in :mod:`.anneal`.
"""
from .icflow import InternalFlow, InternalFlowConfig, InternalTrainConfig
from .model import BoltzmannConfig, BoltzmannMap, VPSchedule
from .sampler import BoltzmannSampler, read_samples
from .training import BoltzmannTrainConfig, train_boltzmann

__all__ = ["BoltzmannConfig", "BoltzmannMap", "BoltzmannSampler", "BoltzmannTrainConfig", "InternalFlow",
           "InternalFlowConfig", "InternalTrainConfig", "VPSchedule", "read_samples", "train_boltzmann"]
