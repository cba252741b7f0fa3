"""The molecular strong stochastic flow map z_{s+tau} = T(z_s, L_{s,s+tau}, eps, tau).

State z = (x, v) per atom (nm, nm/ps); L (B, N, A, 3): Legendre path coefficients of the Brownian
motion driving each velocity DOF (sqrt(ps)); eps (B, k, A, 3): the unresolved-path latent (k standard
Gaussian vectors per atom, rotating with the molecule); tau (B,) in ps.

Parametrisation (DESIGN.md section 3): the free-particle / Ornstein–Uhlenbeck part is exact and the
network learns the rest. For a free atom with friction gamma and noise sigma = sqrt(2 gamma kT/m),

    v_t = e^{-gamma tau} v + sigma ∫ f_v(u) dW_u,        f_v(u) = e^{-gamma (tau-u)}
    x_t = x + (1 - e^{-gamma tau})/gamma v + sigma ∫ f_x(u) dW_u,  f_x(u) = (1 - e^{-gamma (tau-u)})/gamma

and given the coefficients, each stochastic integral splits exactly into its projection onto the
Legendre polynomials, sum_n (2n+1)/tau (∫ f P_n) L^(n), plus an independent Gaussian remainder whose
2x2 (x, v) covariance is known; the remainder is drawn from the first two latent vectors. So at
tau -> 0 the map is the identity, for a free particle it is exact in law, and the network's
correction (scaled by tau, and by 1 - e^{-tau/tau_v} for velocities) carries forces and the spread the
coefficients cannot resolve.

``MapConfig.base`` picks the base the correction is added to: ``"ou"`` is the exact free-particle
map above; ``"identity"`` (the default, by measurement) is x_t = x, v_t = v, so the network carries
everything and the path coefficients and latents enter only as its inputs. Bonded atoms are anything
but free: at tau = 20-200 fs a hydrogen's free flight (v_th tau = 0.03-0.3 nm) is longer than the
bond it sits on, and the network must learn to undo it. Measured by
``OMP_NUM_THREADS=1 python benchmarks/base_compare.py --out benchmarks/results/base_compare_cpu.json``
(alanine dipeptide, 4 x 40 ps at 20 fs, N = 3, PaiNN F = 32, 2 layers, 600 optimiser steps; held-out
one-jump, mean mode, 64 items): aligned heavy-atom RMSD 0.0077 / 0.0169 / 0.0219 / 0.0372 nm
(identity) vs 0.0077 / 0.0212 / 0.0315 / 0.0628 nm (ou) at tau = 0.02 / 0.06 / 0.1 / 0.2 ps, and the
spread of bond lengths (std of length / start length; reference 0.024) 0.04 / 0.09 / 0.13 / 0.21 vs
0.07 / 0.25 / 0.43 / 0.96. Both are still far from the floor at this CPU size. Both bases
are the identity at tau = 0 (the correction is scaled by tau).

The network is an E(3)-equivariant backbone chosen by
``MapConfig.backbone``: :class:`~molflow.models.painn.PaiNN` (default, pure torch) or
:class:`~molflow.models.e3nn_backbone.E3nnBackbone` (needs the optional package e3nn).
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..sde import free_langevin_conditional
from .painn import PaiNN

ELEMENTS = ("H", "C", "N", "O", "S")
MAX_GRAPH_DISTANCE = 4  # bonded graph distance one-hot: 1, 2, 3, >= 4 bonds
TAU_V_PS = 0.01  # velocity-correction onset: ~ the fastest vibrations (C-H period 11 fs)
BACKBONES = ("painn", "e3nn")


@dataclasses.dataclass
class MapConfig:
    """Architecture of the molecular map (stored in checkpoints).

    ``backbone``: ``"painn"`` (default; :mod:`molflow.models.painn`, pure torch) or ``"e3nn"``
    (:mod:`molflow.models.e3nn_backbone`, tensor products with l <= 2 spherical harmonics; needs the
    optional package e3nn). PaiNN is the default by measurement (``benchmarks/backbone_compare.py``,
    results in ``benchmarks/results/backbone_compare_cpu.json``): alanine dipeptide, N = 3, 4 x 40 ps
    at 20 fs, 2 layers, equal parameter budget (PaiNN F = 32: 32,226 parameters; e3nn F = 32: 32,192),
    same data, seed and settings, one CPU thread (shared AMD EPYC, no GPU):

    - speed: e3nn is 4.6x slower per forward+backward of a 32-molecule batch (0.79 vs 0.17 s),
      3.4x slower per training step (0.59 vs 0.18 s) and 7.2x slower at inference
      (54 vs 386 molecule-jumps/s);
    - accuracy at equal steps (600): no gain from e3nn — held-out one-jump aligned heavy-atom RMSD
      in mean mode 0.0337 vs 0.0334 nm at tau = 0.1 ps and 0.184 vs 0.175 nm at 0.5 ps
      (+-0.0004 / 0.002 nm standard errors over 192 items; one training seed), and sample mode
      worse (0.052 vs 0.042 nm, 0.275 vs 0.217 nm);
    - accuracy at equal wall time (PaiNN's 105 s; e3nn gets 178 steps): e3nn 1.9x worse
      (0.064 vs 0.033 nm at 0.1 ps, 0.329 vs 0.175 nm at 0.5 ps).

    Both maps are far from the floor at this CPU size (PaiNN 0.033 nm vs floor/sqrt2 0.0012 nm at
    0.1 ps), so the comparison is of the under-trained regime; e3nn's angular (l = 2) features may
    still pay off with long GPU training — the benchmark's GPU command is in its docstring.
    """

    n_coefficients: int = 3
    n_latent: int = 4  # latent vectors per atom (>= 2: two feed the exact OU remainder)
    n_features: int = 64
    n_layers: int = 3
    n_rbf: int = 16
    cutoff_nm: float = 1.2
    backbone: str = "painn"  # "painn" | "e3nn" (see the class docstring for why painn is the default)
    base: str = "identity"  # "identity" | "ou" (module docstring: measured, identity is better)
    output_cap: float = 3.0  # soft cap on each atom's correction in thermal units (v_th tau for x,
    # v_th for v); 0: none (maps made before issue 16). An untrained network's outliers (norms of 20+)
    # are not physics; a free flight of 3 thermal lengths is already rare
    x_scale: str = "group"  # thermal length of the position correction: "group" (v_th of the atom's
    # bonded group, a heavy atom with its hydrogens: a hydrogen moves with its carbon, not in free flight)
    # or "atom" (its own v_th; maps made before issue 16)
    torsion_drive: int = 0  # > 0: hidden width of the strain-free backbone-torsion step after the jump
    # (molflow.models.torsion_drive; 0: none, the maps made before it)
    torsion_drive_bins: int = 0  # > 0: the drive draws each turn from a learned binned law with this many
    # bins and a latent vector of its own; 0: an implicit law (the turn a function of the map's last latent)
    torsion_drive_landscape: int = 0  # > 0 (binned drives): the law also weighs each bin by a learned
    # potential of mean force of its end angle, on a periodic grid of this many nodes; 0: none
    torsion_drive_landscape_pair: int = 0  # > 0 (with a landscape): psi's turn also weighs each bin by a
    # joint table of (phi end, psi end) per residue, this many nodes per axis, drawn after phi's turn
    output_gain: float = 0.0  # > 0: a learned gain on the correction, starting at this value (measured
    # in issue 16: it slows short training without making it safer than the cap; off by default)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MapConfig":
        """From a checkpoint's ``map_config_json``; checkpoints older than ``base`` used ``"ou"``."""
        return cls(**{"base": "ou", "output_cap": 0.0, "x_scale": "atom", **d})

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise InputError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.base not in ("identity", "ou"):
            raise InputError(f"unknown base {self.base!r}; choose 'identity' or 'ou'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def atom_features(system) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom invariant features and pairwise bonded-distance one-hots from the topology.

    Scalars (A, S): element one-hot (H, C, N, O, S, other), mass/16 amu, charge (e), LJ sigma (nm),
    LJ epsilon (kJ/mol), number of bonds/4 — all read from the force field, so a new peptide needs no
    hand-written features. Edges (A, A, 4): one-hot of the bonded graph distance 1, 2, 3, >= 4.
    """
    import openmm

    atoms = list(system.topology.atoms())
    A = len(atoms)
    nb = next(f for f in system.system.getForces() if isinstance(f, openmm.NonbondedForce))
    scal = np.zeros((A, len(ELEMENTS) + 1 + 5))
    neighbours = [[] for _ in range(A)]
    for a, b in system.bonds:
        neighbours[a].append(b)
        neighbours[b].append(a)
    for i, atom in enumerate(atoms):
        sym = atom.element.symbol if atom.element is not None else "X"
        scal[i, ELEMENTS.index(sym) if sym in ELEMENTS else len(ELEMENTS)] = 1.0
        q, sig, eps = nb.getParticleParameters(i)
        scal[i, len(ELEMENTS) + 1:] = [system.masses_amu[i] / 16.0, q._value, sig._value, eps._value,
                                       len(neighbours[i]) / 4.0]
    dist = np.full((A, A), MAX_GRAPH_DISTANCE, dtype=int)
    for i in range(A):  # breadth-first search from every atom
        seen, queue = {i: 0}, deque([i])
        while queue:
            j = queue.popleft()
            if seen[j] >= MAX_GRAPH_DISTANCE:
                continue
            for k in neighbours[j]:
                if k not in seen:
                    seen[k] = seen[j] + 1
                    queue.append(k)
        for j, dj in seen.items():
            dist[i, j] = min(dj, MAX_GRAPH_DISTANCE)
    edges = np.zeros((A, A, MAX_GRAPH_DISTANCE))
    for k in range(1, MAX_GRAPH_DISTANCE + 1):
        edges[..., k - 1] = dist == k
    np.fill_diagonal(edges[..., 0], 0)
    return scal, edges


class MolecularFlowMap(nn.Module):
    """The molecular map: base (identity or exact OU) + equivariant correction (module docstring)."""

    def __init__(self, scalars: np.ndarray, edges: np.ndarray, masses_amu: np.ndarray, kT_kj_mol: float,
                 gamma_per_ps: float, config: MapConfig, torsion_drive: nn.Module | None = None):
        super().__init__()
        if config.n_latent < 2:
            raise ValueError("n_latent must be >= 2 (two latent vectors feed the exact OU remainder)")
        self.config = config
        self.gamma = float(gamma_per_ps)
        self.kT = float(kT_kj_mol)
        dtype = torch.get_default_dtype()
        self.register_buffer("scalars", torch.as_tensor(scalars, dtype=dtype))
        self.register_buffer("edges", torch.as_tensor(edges, dtype=dtype).unsqueeze(0))
        self.register_buffer("masses", torch.as_tensor(masses_amu, dtype=dtype))
        v_th = np.sqrt(kT_kj_mol / np.asarray(masses_amu))
        self.register_buffer("v_th", torch.as_tensor(v_th, dtype=dtype))  # nm/ps
        m = np.asarray(masses_amu, dtype=float)
        if config.x_scale == "group":  # heavy atom + its hydrogens move together
            light = m < 3.5
            bonded = np.asarray(edges)[..., 0] > 0
            heavy_of = [i if not light[i] else (np.nonzero(bonded[i] & ~light)[0].tolist() or [i])[0] for i in range(len(m))]
            group = np.zeros(len(m))
            for i, h in enumerate(heavy_of):
                group[h] += m[i] if i != h else 0.0
            group = np.array([m[h] + group[h] for h in heavy_of])
            x_len = np.sqrt(kT_kj_mol / group)
        elif config.x_scale == "atom":
            x_len = v_th
        else:
            raise InputError(f"unknown x_scale {config.x_scale!r}; choose 'group' or 'atom'")
        self.register_buffer("x_len", torch.as_tensor(x_len, dtype=dtype), persistent=False)  # nm/ps
        self.register_buffer("sigma", torch.as_tensor(np.sqrt(2 * gamma_per_ps) * v_th, dtype=dtype))
        N, k = config.n_coefficients, config.n_latent
        if config.backbone == "e3nn":
            from .e3nn_backbone import E3nnBackbone as net_class  # optional dependency, imported on use
        else:
            net_class = PaiNN
        self.net = net_class(n_scalar_in=scalars.shape[1] + 3, n_vector_in=1 + N + k, n_edge=edges.shape[-1],
                             n_vector_out=2, n_features=config.n_features, n_layers=config.n_layers,
                             n_rbf=config.n_rbf, cutoff_nm=config.cutoff_nm)
        self._zero_readout()
        if config.torsion_drive and torsion_drive is None:
            raise InputError("torsion_drive > 0 needs the molecule's torsions: build the map with build_model")
        self.drive = torsion_drive if config.torsion_drive else None
        if config.output_gain:
            self.gain = nn.Parameter(torch.full((2,), float(config.output_gain), dtype=dtype))

    def _zero_readout(self) -> None:
        """Start with an exactly zero correction: the untrained map is its base (for ``identity``
        nothing moves, so no bond can break at any tau) and training grows the correction from
        there. Gradients still flow: the last layer's own gradient is non-zero at step 1."""
        last = self.net.out.gate[-1] if hasattr(self.net.out, "gate") else self.net.out
        with torch.no_grad():
            for name, param in last.named_parameters():
                param.zero_()

    @property
    def n_atoms(self) -> int:
        return self.scalars.shape[0]

    @property
    def needs_forces(self) -> bool:
        """Whether :meth:`forward` needs the force-field forces at x (a map with a torsion drive)."""
        return self.drive is not None

    def forward(self, x: torch.Tensor, v: torch.Tensor, L: torch.Tensor, eps: torch.Tensor,
                tau: torch.Tensor, forces: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One jump. x, v (B,A,3); L (B,N,A,3); eps (B,k,A,3); tau (B,) ps; ``forces`` (B,A,3)
        kJ/mol/nm at x, needed by a map with a torsion drive (:attr:`needs_forces`) -> (x_t, v_t)."""
        if self.drive is not None and forces is None:
            raise InputError("this map's torsion drive needs the force-field forces at the start positions")
        x_t, v_t, t_feat = self.network_jump(x, v, L, eps, tau)
        if self.drive is not None:  # strain-free torsion turns (molflow.models.torsion_drive)
            delta = self.drive.angles(x, v, L, eps, t_feat[:, 1], t_feat, self.masses, self.sigma, self.kT, x_t,
                                      forces.to(x.dtype))
            x_t, v_t = self.drive.turn(x_t, v_t, delta, self.masses)
        return x_t, v_t

    def network_jump(self, x: torch.Tensor, v: torch.Tensor, L: torch.Tensor, eps: torch.Tensor,
                     tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The jump without the torsion drive (arguments as :meth:`forward`; the network takes the
        first ``n_latent`` latent vectors) -> (x_t, v_t, the jump length features (B, 3): log(tau / 0.1
        ps), tau ps, 1 - e^{-gamma tau})."""
        dtype = x.dtype
        eps = eps[:, :self.config.n_latent]

        def per_b(t):  # (B,) -> (B,1,1)
            return t[:, None, None]

        x_base, v_base = (self._ou_base(x, v, L, eps, tau, per_b) if self.config.base == "ou" else (x, v))

        B, A = x.shape[:2]
        N = L.shape[1]
        tau_b = tau.to(dtype)
        L_scale = torch.sqrt(tau_b[:, None] / (2 * torch.arange(N, device=x.device, dtype=dtype) + 1)).clamp_min(1e-6)
        vectors = torch.cat([(v / self.v_th[None, :, None]).unsqueeze(2),
                             (L / L_scale[:, :, None, None]).transpose(1, 2),
                             eps.transpose(1, 2)], dim=2)  # (B,A,1+N+k,3)
        t_feat = torch.stack([torch.log(tau_b.clamp_min(1e-4) / 0.1), tau_b, 1 - torch.exp(-self.gamma * tau_b)], -1)
        scalars = torch.cat([self.scalars.expand(B, -1, -1), t_feat[:, None, :].expand(B, A, 3)], -1)
        out = self.net(x, scalars, vectors, self.edges)  # (B,A,2,3)
        vt = self.v_th[None, :, None]
        cap = self.config.output_cap
        if cap:  # soft cap: |out| <= cap thermal lengths, smooth and equivariant (scales by the norm)
            out = out / torch.sqrt(1 + (out * out).sum(-1, keepdim=True) / cap**2)
        if self.config.output_gain:
            out = out * self.gain.view(1, 1, 2, 1)
        x_t = x_base + per_b(tau_b) * self.x_len[None, :, None] * out[:, :, 0]
        v_t = v_base + per_b(-torch.expm1(-tau_b / TAU_V_PS)) * vt * out[:, :, 1]
        return x_t, v_t, t_feat

    def _ou_base(self, x, v, L, eps, tau, per_b):
        """The exact free-particle (OU) jump given the coefficients, its remainder drawn from eps[:, :2]."""
        dtype = x.dtype
        o = free_langevin_conditional(tau, self.gamma, self.config.n_coefficients)
        ou = {"c_xv": o["phi"], "c_vv": o["decay"], "a": o["cx"], "b": o["cv"], "r_xx": o["chol"][:, 0, 0],
              "r_vx": o["chol"][:, 1, 0], "r_vv": o["chol"][:, 1, 1]}
        ou = {k: val.to(dtype) for k, val in ou.items()}
        sig = self.sigma[None, :, None]  # (1,A,1)
        proj_x = torch.einsum("bn,bnac->bac", ou["a"], L) if L.shape[1] else torch.zeros_like(x)
        proj_v = torch.einsum("bn,bnac->bac", ou["b"], L) if L.shape[1] else torch.zeros_like(v)
        e0, e1 = eps[:, 0], eps[:, 1]
        x_base = x + per_b(ou["c_xv"]) * v + sig * (proj_x + per_b(ou["r_xx"]) * e0)
        v_base = per_b(ou["c_vv"]) * v + sig * (proj_v + per_b(ou["r_vx"]) * e0 + per_b(ou["r_vv"]) * e1)
        return x_base, v_base

    @property
    def n_latent_vectors(self) -> int:
        """Latent vectors per atom a jump takes: the network's, plus one of its own for a binned drive."""
        own = bool(self.drive is not None and self.config.torsion_drive_bins)
        return self.config.n_latent + int(own)

    def sample_latent(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fresh latents (batch, :attr:`n_latent_vectors`, A, 3)."""
        p = self.scalars
        return torch.randn(batch, self.n_latent_vectors, self.n_atoms, 3, generator=generator,
                           device=p.device, dtype=p.dtype)


def build_model(system, config: MapConfig) -> MolecularFlowMap:
    """The map for a :class:`~molflow.systems.MolecularSystem` (features read from its force field)."""
    scal, edges = atom_features(system)
    drive = None
    if config.torsion_drive:
        from .torsion_drive import build_torsion_drive

        drive = build_torsion_drive(system, config.n_coefficients, config.torsion_drive, config.torsion_drive_bins,
                                    config.torsion_drive_landscape, config.torsion_drive_landscape_pair)
    return MolecularFlowMap(scal, edges, system.masses_amu, system.kT_kj_mol, system.friction_per_ps, config, drive)
