"""Internal coordinates (a Z-matrix built from the bond graph) with the exact volume element.

A conformation of A atoms, centred, is ``A - 1`` bond lengths r (nm), ``A - 2`` bond angles θ (rad)
and ``A - 3`` torsions τ (rad), plus its orientation. :class:`ZMatrix` places atom ``i`` from three
already-placed atoms ``j`` (bonded to i), ``k`` and ``l`` (NeRF construction): |x_i - x_j| = r_i,
angle(i, j, k) = θ_i, dihedral(i, j, k, l) = τ_i. The first atom is the root, the second is placed by a
bond only, the third by a bond and an angle.

**Torsion offsets.** Atoms that share the same (j, k) — the three hydrogens of a methyl, a carbonyl
O beside the next residue's N — rotate together: the first of them (the *primary*) keeps its torsion
τ, the others are stored as offsets τ_i - τ_primary (wrapped to [-π, π)), which are nearly rigid
(±2π/3 at sp3 centres, π at sp2 ones). That leaves one free torsion per rotatable bond, a change of
variables with unit Jacobian.

**Volume element.** With the orientation uniform (Haar) and the centroid removed,

    d(x centred) = C · Π_{i ≥ 1} r_i² · Π_{i ≥ 2} sin θ_i · dr dθ dτ dR,

so a density q over internal coordinates (orientation uniform) is, on the 3A - 3 centre-free
Cartesian coordinates, q / (C Π r² Π sin θ): :meth:`ZMatrix.log_volume` returns log(Π r² Π sin θ);
the constant C cancels in self-normalised weights.

Everything here is plain torch (float64 recommended), differentiable and batched over leading axes.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

TWO_PI = 2.0 * math.pi


def wrap_angle(a: torch.Tensor) -> torch.Tensor:
    """Angles (rad) wrapped to [-π, π)."""
    return torch.remainder(a + math.pi, TWO_PI) - math.pi


def _dihedral(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
    """Dihedral angle (rad, (-π, π]) of p0-p1-p2-p3 over the leading axes (IUPAC sign)."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / torch.linalg.norm(b1, dim=-1, keepdim=True)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    x = (v * w).sum(-1)
    y = (torch.cross(b1n, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x)


def _angle(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Angle (rad) at p1 of p0-p1-p2."""
    a, b = p0 - p1, p2 - p1
    cos = (a * b).sum(-1) / (torch.linalg.norm(a, dim=-1) * torch.linalg.norm(b, dim=-1))
    return torch.acos(cos.clamp(-1.0, 1.0))


@dataclass(frozen=True)
class ZMatrix:
    """A Z-matrix for one molecule (see the module docstring).

    ``order``: the placement order (A,), ``order[0]`` the root. Row ``m`` of ``refs`` (A, 3) holds
    (j, k, l) for atom ``order[m]`` (-1 where unused: m < 3). ``offset_of[m]`` is the placement index of
    the primary whose torsion atom ``order[m]``'s is stored relative to, or -1 (a primary torsion).
    Internal coordinates are ordered by placement: bonds for m = 1..A-1, angles m = 2..A-1,
    torsions m = 3..A-1.
    """

    order: tuple[int, ...]
    refs: tuple[tuple[int, int, int], ...]
    offset_of: tuple[int, ...]

    @property
    def n_atoms(self) -> int:
        return len(self.order)

    @property
    def n_internal(self) -> int:
        """3A - 6: bonds + angles + torsions."""
        return 3 * self.n_atoms - 6

    @property
    def primary_torsions(self) -> np.ndarray:
        """Indices (into the torsion block, 0..A-4) of the primary (free) torsions."""
        return np.array([m - 3 for m in range(3, self.n_atoms) if self.offset_of[m] < 0], dtype=int)

    def torsion_atoms(self, t: int) -> tuple[int, int, int, int]:
        """The four atoms (i, j, k, l) of torsion ``t`` (torsion-block index)."""
        m = t + 3
        return (self.order[m],) + tuple(self.refs[m])

    @classmethod
    def from_bonds(cls, n_atoms: int, bonds: np.ndarray, heavy: np.ndarray | None = None) -> "ZMatrix":
        """Breadth-first Z-matrix from the bond graph, rooted at the heavy atom of least eccentricity
        (heavy atoms queued before hydrogens, so hydrogens are never references when avoidable).
        Raises ``ValueError`` for a disconnected graph or fewer than 4 atoms."""
        A = int(n_atoms)
        if A < 4:
            raise ValueError("a Z-matrix with torsions needs at least 4 atoms")
        nb: list[list[int]] = [[] for _ in range(A)]
        for a, b in np.asarray(bonds, dtype=int):
            nb[a].append(int(b))
            nb[b].append(int(a))
        heavy_set = set(range(A)) if heavy is None else {int(h) for h in heavy}
        for lst in nb:
            lst.sort(key=lambda q: (q not in heavy_set, -len(nb[q]), q))

        def bfs(root: int) -> tuple[list[int], dict[int, int]]:
            seen, parent, out, queue = {root}, {root: -1}, [], deque([root])
            while queue:
                a = queue.popleft()
                out.append(a)
                for q in nb[a]:
                    if q not in seen:
                        seen.add(q)
                        parent[q] = a
                        queue.append(q)
            return out, parent

        candidates = sorted(heavy_set) or list(range(A))
        best = None
        for r in candidates:
            out, parent = bfs(r)
            if len(out) != A:
                raise ValueError("the bond graph is not connected: one molecule per Z-matrix")
            depth = {r: 0}
            for a in out[1:]:
                depth[a] = depth[parent[a]] + 1
            ecc = max(depth.values())
            if best is None or ecc < best[0]:
                best = (ecc, r, out, parent)
        _, root, order, parent = best
        pos = {a: m for m, a in enumerate(order)}

        def placed_neighbour(a: int, before: int, exclude: set[int]) -> int:
            for q in nb[a]:
                if pos[q] < before and q not in exclude:
                    return q
            return -1

        refs: list[tuple[int, int, int]] = [(-1, -1, -1)]
        for m in range(1, A):
            i = order[m]
            j = parent[i]
            k = parent[j] if parent[j] >= 0 else placed_neighbour(j, m, {i})
            if m == 1:
                refs.append((j, -1, -1))
                continue
            if k < 0:
                k = order[1] if j != order[1] else order[0]
            if m == 2:
                refs.append((j, k, -1))
                continue
            l = parent[k] if parent[k] >= 0 and parent[k] not in (i, j) else -1
            if l < 0:
                l = placed_neighbour(k, m, {i, j})
            if l < 0:
                l = placed_neighbour(j, m, {i, k})
            if l < 0:
                raise ValueError(f"no third reference atom for atom {i}")
            refs.append((j, k, l))
        first: dict[tuple[int, int], int] = {}
        offset_of = [-1] * A
        for m in range(3, A):
            key = refs[m][:2]
            if key in first:  # a sibling: same three references as its primary, so the offset is rigid
                offset_of[m] = first[key]
                refs[m] = refs[first[key]]
            else:
                first[key] = m
        return cls(tuple(order), tuple(refs), tuple(offset_of))

    @classmethod
    def for_system(cls, system) -> "ZMatrix":
        return cls.from_bonds(system.n_atoms, system.bonds, system.heavy_atoms)

    # ------------------------------------------------------------------ coordinates
    def to_internal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., A, 3) positions (nm) -> bonds (..., A-1) nm, angles (..., A-2) rad, torsions (..., A-3)
        rad (offsets wrapped to [-π, π), primaries in (-π, π])."""
        o = list(self.order)
        ref = np.array(self.refs[1:])
        xi = x[..., o[1:], :]
        r = torch.linalg.norm(xi - x[..., ref[:, 0], :], dim=-1)
        th = _angle(x[..., o[2:], :], x[..., ref[1:, 0], :], x[..., ref[1:, 1], :])
        tau = _dihedral(x[..., o[3:], :], x[..., ref[2:, 0], :], x[..., ref[2:, 1], :], x[..., ref[2:, 2], :])
        cols = []
        for m in range(3, self.n_atoms):
            p = self.offset_of[m]
            cols.append(tau[..., m - 3] if p < 0 else wrap_angle(tau[..., m - 3] - tau[..., p - 3]))
        return r, th, torch.stack(cols, -1)

    def to_cartesian(self, r: torch.Tensor, th: torch.Tensor, tau: torch.Tensor,
                     rotation: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`to_internal`: positions (..., A, 3) nm, centred (unweighted centroid), in the
        canonical frame (root at the origin, atom 2 on +x, atom 3 in the xy plane) rotated by
        ``rotation`` (..., 3, 3) when given."""
        A = self.n_atoms
        abs_tau = []
        for m in range(3, A):
            p = self.offset_of[m]
            abs_tau.append(tau[..., m - 3] if p < 0 else tau[..., m - 3] + abs_tau[p - 3])
        shape = r.shape[:-1]
        zeros = torch.zeros(shape, dtype=r.dtype, device=r.device)
        pos: dict[int, torch.Tensor] = {}
        o = self.order
        pos[o[0]] = torch.stack([zeros, zeros, zeros], -1)
        pos[o[1]] = torch.stack([r[..., 0], zeros, zeros], -1)
        j, k, _ = self.refs[2]
        # atom 3: bond to j, angle (i, j, k) in the xy plane, on the +y side
        u = pos[k] - pos[j]
        u = u / torch.linalg.norm(u, dim=-1, keepdim=True)
        ez = torch.stack([zeros, zeros, zeros + 1.0], -1)
        perp = torch.cross(ez, u, dim=-1)
        t2 = th[..., 0:1]
        pos[o[2]] = pos[j] + r[..., 1:2] * (torch.cos(t2) * u + torch.sin(t2) * perp)
        for m in range(3, A):
            j, k, l = self.refs[m]
            pj, pk, pl = pos[j], pos[k], pos[l]
            bc = pj - pk
            bc = bc / torch.linalg.norm(bc, dim=-1, keepdim=True)
            n = torch.cross(pk - pl, bc, dim=-1)
            n = n / torch.linalg.norm(n, dim=-1, keepdim=True)
            mm = torch.cross(n, bc, dim=-1)
            t, p = th[..., m - 2:m - 1], abs_tau[m - 3].unsqueeze(-1)
            d = torch.cat([-torch.cos(t), torch.sin(t) * torch.cos(p), torch.sin(t) * torch.sin(p)], -1)
            pos[o[m]] = pj + r[..., m - 1:m] * (d[..., 0:1] * bc + d[..., 1:2] * mm + d[..., 2:3] * n)
        x = torch.stack([pos[a] for a in range(A)], -2)
        x = x - x.mean(-2, keepdim=True)
        if rotation is not None:
            x = x @ rotation.transpose(-1, -2)
        return x

    @staticmethod
    def log_volume(r: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        """log(Π r_i² Π sin θ_i): the Cartesian volume element per unit internal volume (up to a constant)."""
        return 2.0 * torch.log(r).sum(-1) + torch.log(torch.sin(th)).sum(-1)


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """(n, 3, 3) rotation matrices, uniform (Haar) on SO(3), from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1).reshape(n, 3, 3)
