"""An E(3)-equivariant message-passing backbone in the style of PaiNN (Schütt et al., 2021).

Pure torch, dense over atoms: a molecule of A atoms is a complete graph with a smooth distance
cutoff, which for peptides of tens of atoms is faster than sparse scatter operations. Features per
atom are scalars ``s`` (B, A, F) and vectors ``V`` (B, A, F, 3). Only linear maps of vectors,
products of vectors with scalars and dot products appear (no cross products), so the network is
equivariant under rotations AND reflections, invariant to translations (it sees relative positions
only) and equivariant to permutations of atoms (weights are shared).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class RadialBasis(nn.Module):
    """Sine radial basis sin(n pi d / rc)/d times a cosine cutoff (smooth at rc)."""

    def __init__(self, n_rbf: int, cutoff_nm: float):
        super().__init__()
        self.cutoff = cutoff_nm
        self.register_buffer("freq", torch.arange(1, n_rbf + 1, dtype=torch.get_default_dtype()) * math.pi / cutoff_nm)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        d = d.unsqueeze(-1)
        f_cut = 0.5 * (torch.cos(d * math.pi / self.cutoff) + 1.0) * (d < self.cutoff)
        return torch.sin(self.freq * d) / d.clamp_min(1e-6) * f_cut


class PaiNNLayer(nn.Module):
    """One message + update block."""

    def __init__(self, n_features: int, n_rbf: int, n_edge: int):
        super().__init__()
        F = n_features
        self.phi = nn.Sequential(nn.Linear(F, F), nn.SiLU(), nn.Linear(F, 3 * F))
        self.w = nn.Linear(n_rbf + n_edge, 3 * F)
        self.U = nn.Linear(F, F, bias=False)
        self.Wv = nn.Linear(F, F, bias=False)
        self.upd = nn.Sequential(nn.Linear(2 * F, F), nn.SiLU(), nn.Linear(F, 3 * F))
        self.norm = nn.LayerNorm(F)

    def forward(self, s, V, unit, edge, mask):
        # s (B,A,F); V (B,A,F,3); unit (B,A,A,3) r_ij/|r_ij|; edge (B,A,A,E); mask (B,A,A)
        F = s.shape[-1]
        x = self.phi(s).unsqueeze(1) * self.w(edge) * mask.unsqueeze(-1)  # (B,i,j,3F), j = sender
        ds, dvv, dvr = torch.split(x, F, dim=-1)
        s = s + ds.sum(2)
        V = V + torch.einsum("bijf,bjfc->bifc", dvv, V) + torch.einsum("bijf,bijc->bifc", dvr, unit)
        # update
        UV = self.U(V.transpose(-1, -2)).transpose(-1, -2)
        WV = self.Wv(V.transpose(-1, -2)).transpose(-1, -2)
        norm = torch.sqrt((WV**2).sum(-1) + 1e-8)
        a = self.upd(torch.cat([self.norm(s), norm], -1))
        avv, asv, ass = torch.split(a, F, dim=-1)
        V = V + avv.unsqueeze(-1) * UV
        s = s + ass + asv * (UV * WV).sum(-1)
        return s, V


class GatedVectorOut(nn.Module):
    """Equivariant read-out: ``n_out`` vectors per atom as scalar-gated mixes of vector features."""

    def __init__(self, n_features: int, n_out: int):
        super().__init__()
        self.mix = nn.Linear(n_features, n_out, bias=False)
        self.gate = nn.Sequential(nn.Linear(2 * n_features, n_features), nn.SiLU(), nn.Linear(n_features, n_out))
        self.V2 = nn.Linear(n_features, n_features, bias=False)

    def forward(self, s, V):
        V2 = self.V2(V.transpose(-1, -2)).transpose(-1, -2)
        norm = torch.sqrt((V2**2).sum(-1) + 1e-8)
        g = self.gate(torch.cat([s, norm], -1))  # (B,A,n_out)
        out = self.mix(V.transpose(-1, -2)).transpose(-1, -2)  # (B,A,n_out,3)
        return g.unsqueeze(-1) * out


class PaiNN(nn.Module):
    """Backbone: atom scalars + input vectors + positions -> output vectors per atom.

    Parameters: ``n_scalar_in`` per-atom invariant inputs, ``n_vector_in`` per-atom input vectors,
    ``n_edge`` pairwise invariant inputs (e.g. bonded graph distance one-hot), ``n_vector_out``.
    """

    def __init__(self, n_scalar_in: int, n_vector_in: int, n_edge: int, n_vector_out: int,
                 n_features: int = 64, n_layers: int = 3, n_rbf: int = 16, cutoff_nm: float = 1.2):
        super().__init__()
        self.embed_s = nn.Sequential(nn.Linear(n_scalar_in, n_features), nn.SiLU(), nn.Linear(n_features, n_features))
        self.embed_v = nn.Linear(n_vector_in, n_features, bias=False)
        self.rbf = RadialBasis(n_rbf, cutoff_nm)
        self.layers = nn.ModuleList([PaiNNLayer(n_features, n_rbf, n_edge) for _ in range(n_layers)])
        self.out = GatedVectorOut(n_features, n_vector_out)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor, vectors: torch.Tensor,
                edge: torch.Tensor) -> torch.Tensor:
        """x (B,A,3) nm; scalars (B,A,S); vectors (B,A,Vin,3); edge (B or 1,A,A,E) -> (B,A,Vout,3)."""
        B, A, _ = x.shape
        r = x.unsqueeze(1) - x.unsqueeze(2)  # r[b,i,j] = x_j - x_i
        d = torch.sqrt((r**2).sum(-1) + 1e-12)
        eye = torch.eye(A, dtype=torch.bool, device=x.device)
        mask = (~eye).to(x.dtype).expand(B, A, A)
        unit = r / d.unsqueeze(-1) * mask.unsqueeze(-1)
        e = torch.cat([self.rbf(d), edge.expand(B, -1, -1, -1)], -1)
        s = self.embed_s(scalars)
        V = self.embed_v(vectors.transpose(-1, -2)).transpose(-1, -2)
        for layer in self.layers:
            s, V = layer(s, V, unit, e, mask)
        return self.out(s, V)
