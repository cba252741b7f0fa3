"""An E(3)-equivariant tensor-product backbone built on e3nn (optional dependency), NequIP-style.

Same interface as :class:`~molflow.models.painn.PaiNN` — per-atom scalars and input vectors plus
positions in, ``n_vector_out`` vectors per atom out — so :class:`~molflow.models.MolecularFlowMap`
can use either (``MapConfig.backbone``). Dense over atoms like PaiNN: a molecule of A atoms is a
complete graph with a smooth distance cutoff.

Node features are ``F x 0e + F x 1o`` (F scalars and F polar vectors). A message from atom j to i is
the tensor product of j's features with the spherical harmonics Y^(0..lmax)(r_ij/|r_ij|) — with
lmax = 2 the paths 0e⊗0e→0e, 0e⊗1o→1o, 1o⊗0e→1o, 1o⊗1o→0e, 1o⊗2e→1o — each path weighted per
channel by an MLP of the radial basis and the bonded-distance one-hot (``uvu`` weights). The summed
messages pass an equivariant linear map and a gated nonlinearity (scalars: SiLU; vectors: sigmoid
gates from extra scalars) and are added to the features (residual). Only true (parity-respecting)
irreps appear, so the network is equivariant under rotations AND reflections; it sees relative
positions only (translation invariant) and shares weights over atoms (permutation equivariant).

e3nn >= 0.5 uses the Cartesian (x, y, z) basis for ``1o``, so vectors go in and out unpermuted.
"""
from __future__ import annotations

import torch
from torch import nn

from .painn import RadialBasis


def _import_e3nn():
    try:
        from e3nn import nn as e3nn_nn
        from e3nn import o3
    except ImportError as exc:  # optional dependency
        raise ImportError("MapConfig(backbone='e3nn') needs the optional package e3nn: pip install e3nn "
                          "(or use the default backbone='painn', which needs only torch)") from exc
    return o3, e3nn_nn


class E3nnLayer(nn.Module):
    """One interaction block: pre-linear, tensor-product messages, linear, gate, residual."""

    def __init__(self, F: int, lmax: int, n_radial_in: int, n_radial_hidden: int):
        super().__init__()
        o3, e3nn_nn = _import_e3nn()
        self.irreps_hidden = o3.Irreps(f"{F}x0e + {F}x1o")
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        self.pre = o3.Linear(self.irreps_hidden, self.irreps_hidden)
        keep = {o3.Irrep("0e"), o3.Irrep("1o")}
        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(self.irreps_hidden):
            for j, (_, ir_sh) in enumerate(self.irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in keep:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_mid = o3.Irreps(mid)
        irreps_mid, perm, _ = irreps_mid.sort()
        instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]
        self.tp = o3.TensorProduct(self.irreps_hidden, self.irreps_sh, irreps_mid, instructions,
                                   shared_weights=False, internal_weights=False)
        self.radial = nn.Sequential(nn.Linear(n_radial_in, n_radial_hidden), nn.SiLU(),
                                    nn.Linear(n_radial_hidden, self.tp.weight_numel))
        self.gate = e3nn_nn.Gate(f"{F}x0e", [torch.nn.functional.silu], f"{F}x0e", [torch.sigmoid], f"{F}x1o")
        self.post = o3.Linear(irreps_mid, self.gate.irreps_in)

    def forward(self, h, sh, radial_in, mask):
        # h (B,A,D); sh (B,A,A,Dsh); radial_in (B,A,A,R); mask (B,A,A). Messages j -> i: index [b,i,j].
        B, A, D = h.shape
        hj = self.pre(h).unsqueeze(1).expand(B, A, A, D)
        w = self.radial(radial_in) * mask.unsqueeze(-1)  # no self-messages (the TP is linear in w)
        msg = self.tp(hj, sh, w).sum(2) / (A - 1) ** 0.5
        return h + self.gate(self.post(msg))


class E3nnBackbone(nn.Module):
    """Backbone: atom scalars + input vectors + positions -> output vectors per atom (e3nn).

    Parameters as for :class:`~molflow.models.painn.PaiNN`, plus ``lmax`` of the edge spherical
    harmonics and the hidden width of the radial MLPs (default ``n_features``).
    """

    def __init__(self, n_scalar_in: int, n_vector_in: int, n_edge: int, n_vector_out: int,
                 n_features: int = 64, n_layers: int = 3, n_rbf: int = 16, cutoff_nm: float = 1.2,
                 lmax: int = 2, n_radial_hidden: int | None = None):
        super().__init__()
        o3, _ = _import_e3nn()
        F = n_features
        self.lmax = lmax
        self.embed_s = nn.Sequential(nn.Linear(n_scalar_in, F), nn.SiLU(), nn.Linear(F, F))
        self.embed_v = nn.Linear(n_vector_in, F, bias=False)  # mixes vectors channel-wise: equivariant
        self.rbf = RadialBasis(n_rbf, cutoff_nm)
        self.layers = nn.ModuleList([E3nnLayer(F, lmax, n_rbf + n_edge, n_radial_hidden or F)
                                     for _ in range(n_layers)])
        self.out = o3.Linear(o3.Irreps(f"{F}x0e + {F}x1o"), o3.Irreps(f"{n_vector_out}x1o"))
        self.n_vector_out = n_vector_out

    def forward(self, x: torch.Tensor, scalars: torch.Tensor, vectors: torch.Tensor,
                edge: torch.Tensor) -> torch.Tensor:
        """x (B,A,3) nm; scalars (B,A,S); vectors (B,A,Vin,3); edge (B or 1,A,A,E) -> (B,A,Vout,3)."""
        o3, _ = _import_e3nn()
        B, A, _ = x.shape
        r = x.unsqueeze(1) - x.unsqueeze(2)  # r[b,i,j] = x_j - x_i
        d = torch.sqrt((r**2).sum(-1) + 1e-12)
        eye = torch.eye(A, dtype=torch.bool, device=x.device)
        mask = (~eye).to(x.dtype).expand(B, A, A)
        unit = r / d.unsqueeze(-1)  # the diagonal (r = 0) is masked out of every message
        sh = o3.spherical_harmonics(list(range(self.lmax + 1)), unit, normalize=False,
                                    normalization="component")
        radial_in = torch.cat([self.rbf(d), edge.expand(B, -1, -1, -1)], -1)
        s = self.embed_s(scalars)
        V = self.embed_v(vectors.transpose(-1, -2)).transpose(-1, -2)  # (B,A,F,3)
        h = torch.cat([s, V.reshape(B, A, -1)], -1)  # e3nn layout: F scalars, then F vectors (mul-major)
        for layer in self.layers:
            h = layer(h, sh, radial_in, mask)
        return self.out(h).reshape(B, A, self.n_vector_out, 3)
