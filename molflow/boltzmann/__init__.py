"""Few-step Boltzmann sampler with exact Boltzmann reweighting (issue #5, DESIGN.md sections 6, 9).

An SSFM of the reverse-time VP diffusion SDE on centred all-atom positions turns Gaussian noise into
equilibrium conformations in 1-10 network evaluations (:mod:`.model`, trained on reference MD frames
by :mod:`.training`); for a fixed Brownian path the map is a map of the initial noise, whose exact
Jacobian gives importance weights for the force field's Boltzmann distribution (:mod:`.reweight`,
:mod:`.sampler`); chirality is handled explicitly (:mod:`.geometry`).
"""
from .model import BoltzmannConfig, BoltzmannMap, VPSchedule
from .sampler import BoltzmannSampler, read_samples
from .training import BoltzmannTrainConfig, train_boltzmann

__all__ = ["BoltzmannConfig", "BoltzmannMap", "BoltzmannSampler", "BoltzmannTrainConfig", "VPSchedule",
           "read_samples", "train_boltzmann"]
