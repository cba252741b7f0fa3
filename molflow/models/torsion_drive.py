"""A strain-free torsion step on top of the molecular map (issue 17).

Measured on the shipped alanine-dipeptide map (``benchmarks/one_jump_torsions.py``): the Cartesian
network moves the backbone torsions partly by straining the atoms that define them, and the physical
finish after each jump takes that strain back, undoing about half of the map's psi change. The
torsion drive gives the map a way to turn a backbone torsion that leaves every bond length and bond
angle exactly as it was: after the network's jump it turns the two halves of the molecule about each
backbone bond (N-CA for phi, CA-C for psi) against each other by a learned angle delta (rad). The two
halves turn in proportion to each other's moment of inertia about the bond, so the angular momentum
about it is unchanged and the molecule's centre of mass barely moves; their velocities turn with them.

delta comes from a small multilayer perceptron shared by all torsions, fed per torsion (and its
partner: psi for phi, phi for psi, of the same residue) with

- invariants: cos(theta), the jump length features (log tau/0.1 ps, tau, 1 - e^{-gamma tau}), whether
  it is a phi or a psi;
- pseudo-scalars (they change sign in a mirror): sin(theta); the generalised force of the turn,
  -dU/d delta from the force field's forces at the start (kJ/mol/rad, scaled by 0.1 rad / kT): a
  steep wall in the free energy is a large torque, which the drive can follow as a Brownian step
  in torsion space would (without it the drive learned the spread of the steps but not their
  drift: from the beta basin's edge phi < -2.5 rad MD moves phi up by 0.73 rad on average in 0.5 ps
  and never past -pi, the drive +0.2-0.4 rad with 9% past -pi); the network's own (wrapped) change of
  the torsion in this jump, which carries what the network knows of the forces (without it, a drive
  fed only the torsions spread them but barely pulled them back: free-running, a 2000-step drive put
  32% of the time in alpha_L, MD 0.2%); the torsion's angular velocity and the
  Brownian forcing of each path coefficient projected on the torsion's gradient g = d theta / d x,
  each divided by its thermal standard deviation; and a standard-normal latent zeta, the projection
  of the map's last latent vector on g (exactly N(0, 1) for any g), which lets the drive carry spread
  the coefficients do not pin.

delta(inv, p) = sqrt(tau / ps) (h(inv, p) - h(inv, -p)) is odd in the pseudo-scalars, so the drive is
E(3)-equivariant (a mirror image turns the other way) with no chirality reference. Its last layer
starts at zero: a drive added to a trained map leaves that map exactly as it was until training
moves it (``molflow train --init-from base.pt --config drive.yaml`` with ``torsion_drive: 32`` and
``train_only: torsion_drive`` in the YAML).

A **binned** drive (``torsion_drive_bins`` > 0) gives each torsion's turn an explicit law instead:
the MLP, fed every input above but the latents, gives the logits of ``bins`` equal bins over
[-w, w] rad (w = min(pi, 4.5 sqrt(tau / ps))), symmetrised so that a mirror image gets them in
reverse order; the turn is the quantile Phi(zeta) of that piecewise-uniform law, monotone in zeta,
and zeta comes from a latent vector of the drive's own (the network never sees it), whitened across
the torsions, so the turns are drawn exactly from the law whose log-likelihood training fits
(:meth:`TorsionDrive.log_prob`; ``molflow.training.drive_fit``). Measured on alanine dipeptide at
0.5 ps (issue 17): the implicit drive, fitted by the energy score, put 1.1% of its phi turns beyond
2 rad where MD has 0.26%, and free-running such turns carried the map from alpha_R past -pi about
once per 100 jumps; the binned law's tails follow MD's (0.34%).

With a **landscape** (``torsion_drive_landscape`` > 0 nodes) the bin logits also subtract a learned
potential of mean force (kT) of the torsion's end angle (the network's end angle plus the bin's
turn), one periodic table per torsion kind (phi, psi). It is the L residue's: the angle is multiplied
by the sign of the residue's CA centre (a pseudo-scalar, fed to the MLP too), so a mirror image sees
the mirrored landscape and the map stays E(3)-equivariant; a residue without CB sees a flat one. A
wall of the free-energy surface (phi past -pi) is then one learned fact instead of a cutoff the MLP
must place anew for every start (measured on alanine dipeptide: README, issue 17).

With a **pair landscape** (``torsion_drive_landscape_pair`` > 0 nodes per axis, needs a landscape) a
residue's psi turn is drawn *after* its phi turn and its logits also subtract a learned joint table
P(phi_end, psi_end) (kT, periodic bilinear, both angles in the L residue's frame as above) at the
residue's phi end angle (the network's plus the phi turn just drawn) and each psi bin's end angle. The
1-D landscapes set the phi and psi marginals; P sets how psi's law depends on where phi ends, which
the marginals cannot (measured on alanine dipeptide after the 1-D refinement: the phi and psi free
energies within 0.8 kJ/mol of MD but the joint one 1.8; README, issue 17). It starts at zero (the
drive unchanged) and is refined with the 1-D tables by :mod:`molflow.training.landscape_ibi`.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from torch import nn

from ..errors import InputError

#: invariant inputs per torsion (cos theta, 3 tau features, phi/psi one-hot)
_N_INV_OWN = 6
#: the torque feature is -dU/d delta / kT times this angle (rad): O(1) for backbone torsions
TORQUE_SCALE_RAD = 0.1
#: a binned drive's turns span +-(this) sqrt(tau / ps) rad, at most +-pi: wide enough for every recorded
#: backbone turn of alanine dipeptide from 20 fs to 0.5 ps (none fell outside in 67584 cached items x 2 draws)
BIN_HALF_WIDTH = 4.5
#: where zeta sits among a torsion's own pseudo-scalar features (sin, network's change, torque, omega, zeta, b...)
_ZETA = 4


def _neighbours(bonds: np.ndarray, n_atoms: int) -> list[list[int]]:
    """Bonded neighbours of every atom."""
    nbr: list[list[int]] = [[] for _ in range(n_atoms)]
    for i, j in np.asarray(bonds, dtype=int).reshape(-1, 2):
        nbr[i].append(j)
        nbr[j].append(i)
    return nbr


def rotating_side(bonds: np.ndarray, n_atoms: int, b: int, c: int) -> np.ndarray:
    """Boolean mask (A,) of the atoms on c's side of the bond b-c (c included, b not).

    Raises InputError when b-c lies in a ring (its two sides are then one piece)."""
    nbr = _neighbours(bonds, n_atoms)
    seen, queue = {c}, deque([c])
    while queue:
        i = queue.popleft()
        for j in nbr[i]:
            if i == c and j == b:
                continue
            if j == b:
                raise InputError(f"the torsion drive cannot turn bond {b}-{c}: it lies in a ring")
            if j not in seen:
                seen.add(j)
                queue.append(j)
    mask = np.zeros(n_atoms, dtype=bool)
    mask[list(seen)] = True
    return mask


def dihedral_and_gradient(x: torch.Tensor, quads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dihedral angles (B, Q) rad of atom quadruples (Q, 4) and their gradients (B, Q, 4, 3) rad/nm
    with respect to the four atoms (closed form, differentiable; same sign convention as
    :func:`molflow.training.objective._dihedral`)."""
    p0, p1, p2, p3 = (x[:, quads[:, k]] for k in range(4))
    F, G, H = p0 - p1, p1 - p2, p3 - p2
    A, Bv = torch.cross(F, G, dim=-1), torch.cross(H, G, dim=-1)
    A2 = (A * A).sum(-1, keepdim=True).clamp_min(1e-12)
    B2 = (Bv * Bv).sum(-1, keepdim=True).clamp_min(1e-12)
    Gn = G.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    theta = torch.atan2(-(torch.cross(A, Bv, dim=-1) * G).sum(-1) / Gn[..., 0], (A * Bv).sum(-1))
    fg = (F * G).sum(-1, keepdim=True) / (A2 * Gn)
    hg = (H * G).sum(-1, keepdim=True) / (B2 * Gn)
    g0 = -Gn / A2 * A
    g3 = Gn / B2 * Bv
    g1 = -g0 + fg * A - hg * Bv
    g2 = -g3 - fg * A + hg * Bv
    return theta, torch.stack([g0, g1, g2, g3], dim=2)


def _rotate(p: torch.Tensor, origin: torch.Tensor, axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues rotation of points p (B, A, 3) about unit ``axis`` (B, 3) through ``origin`` (B, 3)
    by ``angle`` (B, A) rad (per atom: 0 leaves an atom where it is)."""
    r = p - origin[:, None]
    k = axis[:, None].expand_as(r)
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    r = r * c + torch.cross(k, r, dim=-1) * s + k * (k * r).sum(-1, keepdim=True) * (1 - c)
    return r + origin[:, None]


class TorsionDrive(nn.Module):
    """The learned strain-free torsion step (module docstring)."""

    def __init__(self, quads: np.ndarray, kinds: np.ndarray, partners: np.ndarray, sides: np.ndarray,
                 n_coefficients: int, hidden: int, bins: int = 0, landscape: int = 0,
                 centres: np.ndarray | None = None, landscape_pair: int = 0):
        super().__init__()
        if bins < 0 or bins == 1:
            raise InputError(f"torsion_drive_bins must be 0 (an implicit law) or at least 2, not {bins}")
        if landscape and (not bins or landscape < 4):
            raise InputError("torsion_drive_landscape needs a binned drive (torsion_drive_bins > 0) and at least 4 nodes")
        if landscape_pair and (not landscape or landscape_pair < 4):
            raise InputError("torsion_drive_landscape_pair needs a landscape (torsion_drive_landscape > 0) "
                             "and at least 4 nodes per axis")
        self.bins = int(bins)
        self.n_landscape = int(landscape)
        self.n_pair = int(landscape_pair)
        Q = len(quads)
        if Q == 0:
            raise InputError("the torsion drive needs backbone phi/psi torsions; this molecule has none")
        self.register_buffer("quads", torch.as_tensor(np.asarray(quads), dtype=torch.long), persistent=False)
        self.register_buffer("partners", torch.as_tensor(np.asarray(partners), dtype=torch.long), persistent=False)
        dtype = torch.get_default_dtype()
        self.register_buffer("kinds", torch.as_tensor(np.asarray(kinds), dtype=dtype), persistent=False)  # (Q, 2)
        self.register_buffer("sides", torch.as_tensor(np.asarray(sides), dtype=dtype), persistent=False)  # (Q, A)
        self.n_coefficients = int(n_coefficients)
        n_pseudo_own = 5 + self.n_coefficients  # sin, the network's change, torque, omega, zeta, b_0..b_{N-1}
        if self.n_landscape:  # + the residue's chirality (the landscape is the L residue's, mirrored for D)
            n_pseudo_own += 1
            c = np.asarray(centres if centres is not None else -np.ones((Q, 4)), dtype=np.int64).reshape(Q, 4)
            self.register_buffer("centres", torch.as_tensor(c), persistent=False)  # (N, CA, C, CB) per torsion
            # a learned potential of mean force (kT) of each torsion kind's end angle, on a periodic grid
            self.landscape = nn.Parameter(torch.zeros(2, self.n_landscape, dtype=torch.get_default_dtype()))
        if self.n_pair:  # the residue's joint (phi end, psi end) table (kT), applied to psi's turn
            self.landscape_pair = nn.Parameter(torch.zeros(self.n_pair, self.n_pair, dtype=torch.get_default_dtype()))
        n_in = 2 * (_N_INV_OWN + n_pseudo_own)
        self.n_pseudo_own = n_pseudo_own
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, self.bins or 1))
        with torch.no_grad():  # an implicit drive starts as the identity (a drive added to a trained map
            # changes nothing); a binned one as the uniform law over its bins
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    def angles(self, x: torch.Tensor, v: torch.Tensor, L: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor,
               t_feat: torch.Tensor, masses: torch.Tensor, sigma: torch.Tensor, kT: float,
               x_jump: torch.Tensor, forces: torch.Tensor) -> torch.Tensor:
        """delta (B, Q) rad for start states x, v (B, A, 3), coefficients L (B, N, A, 3), latents eps
        (B, k, A, 3), tau (B,) ps, jump features t_feat (B, 3), the network's jumped positions x_jump
        (B, A, 3), the force-field forces at x (B, A, 3) kJ/mol/nm; sigma (A,) the velocity noise
        amplitude (nm/ps^1.5), kT kJ/mol."""
        inv, pseudo = self.features(x, v, L, eps, tau, t_feat, masses, sigma, kT, x_jump, forces)
        return self.delta(inv, pseudo, tau)

    def delta(self, inv: torch.Tensor, pseudo: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """delta (..., Q) rad from the features of :meth:`features` (..., Q, n) and tau (...) ps: odd in
        the pseudo-scalars, so a mirror image turns the other way. A binned drive turns by the
        quantile Phi(zeta) of its law (:meth:`log_prob`), monotone in its latent zeta."""
        if not self.bins:
            h = self.mlp(torch.cat([inv, pseudo], -1)) - self.mlp(torch.cat([inv, -pseudo], -1))
            return h[..., 0] * torch.sqrt(tau.clamp_min(0))[..., None]
        u = torch.special.ndtr(pseudo[..., _ZETA])
        logits = self._logits(inv, pseudo, tau)
        d = self._quantile(logits, u, tau)
        if self.n_pair:  # psi's law given where phi ends: phi's turns above are final (no pair term on phi)
            d = self._quantile(logits - self._pair_term(inv, pseudo, tau, d[..., self.partners]), u, tau)
        return d

    def _quantile(self, logits: torch.Tensor, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The turn (..., Q) rad at probability level u (..., Q) of the piecewise-uniform law with bin
        ``logits`` (..., Q, bins) over [-w, w]."""
        prob = torch.softmax(logits, -1)
        cdf = torch.cumsum(prob, -1)
        j = torch.searchsorted(cdf.detach(), u.detach()[..., None].contiguous()).clamp(max=self.bins - 1)
        pj = prob.gather(-1, j)
        frac = ((u[..., None] - (cdf.gather(-1, j) - pj)) / pj.clamp_min(1e-12)).clamp(0, 1)
        return (((j + frac) / self.bins) * 2 - 1)[..., 0] * self.half_width(tau)[..., None]

    @staticmethod
    def half_width(tau: torch.Tensor) -> torch.Tensor:
        """A binned drive's turns lie in [-w, w] rad, w = min(pi, BIN_HALF_WIDTH * sqrt(tau / ps))."""
        return (BIN_HALF_WIDTH * torch.sqrt(tau.clamp_min(1e-8))).clamp(max=torch.pi)

    def _logits(self, inv: torch.Tensor, pseudo: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Bin logits (..., Q, bins) of a binned drive, from every input but the latents zeta (its own
        and its partner's): a mirror image (pseudo-scalars negated) gets the bins in reverse order.
        With a landscape, minus the learned potential of mean force (kT) at each bin's end angle (a
        pair landscape's term, which needs the partner's turn, is :meth:`_pair_term`)."""
        keep = torch.ones(pseudo.shape[-1], dtype=pseudo.dtype, device=pseudo.device)
        keep[_ZETA] = 0
        keep[self.n_pseudo_own + _ZETA] = 0
        p = pseudo * keep
        logits = self.mlp(torch.cat([inv, p], -1)) + self.mlp(torch.cat([inv, -p], -1)).flip(-1)
        if not self.n_landscape:
            return logits
        return logits - self._pmf(self._bin_end_angles(inv, pseudo, tau)[2])

    def _bin_end_angles(self, inv: torch.Tensor, pseudo: torch.Tensor, tau: torch.Tensor):
        """(the network's end angle (..., Q): start angle + its change, the residue's chirality
        (..., Q), each bin's end angle in the L residue's frame (..., Q, bins)); all rad, mirror-odd
        before the chirality factor."""
        theta_net = torch.atan2(pseudo[..., 0], inv[..., 0]) + pseudo[..., 1]
        chi = pseudo[..., self.n_pseudo_own - 1]
        mid = (torch.arange(self.bins, device=pseudo.device, dtype=pseudo.dtype) + 0.5) / self.bins * 2 - 1
        return theta_net, chi, chi[..., None] * (theta_net[..., None] + mid * self.half_width(tau)[..., None, None])

    def _pair_term(self, inv: torch.Tensor, pseudo: torch.Tensor, tau: torch.Tensor,
                   partner_delta: torch.Tensor) -> torch.Tensor:
        """What a pair landscape subtracts from the bin logits (..., Q, bins), given the partners'
        turns ``partner_delta`` (..., Q) rad: on a psi torsion's bins the joint table at (its phi's end
        angle, the bin's end angle); nothing on phi's."""
        theta_net, chi, end = self._bin_end_angles(inv, pseudo, tau)
        partner_end = chi * (theta_net[..., self.partners] + partner_delta)  # phi's end, for a psi row
        return self.kinds[:, 1, None].to(end.dtype) * self._pair_pmf(partner_end[..., None].expand_as(end), end)

    def _pair_pmf(self, phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """The pair landscape (kT) at end angles phi, psi (same shape, rad, the L residue's frame):
        periodic bilinear interpolation on its grid (node i at -pi + 2 pi i / n)."""
        n = self.n_pair
        table = self.landscape_pair.to(phi.dtype)

        def split(a):
            pos = torch.remainder(a + torch.pi, 2 * torch.pi) / (2 * torch.pi) * n
            i0 = pos.floor().long().clamp(0, n - 1)
            return i0, (i0 + 1) % n, pos - pos.floor()

        a0, a1, fa = split(phi)
        b0, b1, fb = split(psi)
        return ((table[a0, b0] * (1 - fb) + table[a0, b1] * fb) * (1 - fa)
                + (table[a1, b0] * (1 - fb) + table[a1, b1] * fb) * fa)

    def _pmf(self, angle: torch.Tensor) -> torch.Tensor:
        """The landscape (kT) of each torsion's kind at angles (..., Q, m) rad (periodic linear
        interpolation on its grid); an achiral residue (chi = 0) sees a constant."""
        n = self.n_landscape
        pos = torch.remainder(angle + torch.pi, 2 * torch.pi) / (2 * torch.pi) * n
        i0 = pos.floor().long().clamp(0, n - 1)
        frac = pos - pos.floor()
        table = (self.kinds @ self.landscape).to(angle.dtype).reshape(-1)  # (Q n): phi's or psi's row per torsion
        row = (torch.arange(self.kinds.shape[0], device=angle.device) * n)[:, None]  # (Q, 1)
        return table[row + i0] * (1 - frac) + table[row + (i0 + 1) % n] * frac

    def log_prob(self, inv: torch.Tensor, pseudo: torch.Tensor, tau: torch.Tensor,
                 delta: torch.Tensor) -> torch.Tensor:
        """Log density (..., Q) (per rad) of a binned drive's turn ``delta`` (..., Q) rad given the
        features; a turn beyond the bins' range counts as the outermost bin."""
        if not self.bins:
            raise InputError("log_prob needs a binned torsion drive (torsion_drive_bins > 0)")
        w = self.half_width(tau)[..., None]
        j = torch.floor((delta / w + 1) / 2 * self.bins).clamp(0, self.bins - 1).long()
        logits = self._logits(inv, pseudo, tau)
        if self.n_pair:
            logits = logits - self._pair_term(inv, pseudo, tau, delta[..., self.partners])
        lp = torch.log_softmax(logits, -1).gather(-1, j[..., None])[..., 0]
        return lp + math.log(self.bins) - torch.log(2 * w)

    def features(self, x: torch.Tensor, v: torch.Tensor, L: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor,
                 t_feat: torch.Tensor, masses: torch.Tensor, sigma: torch.Tensor, kT: float,
                 x_jump: torch.Tensor, forces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The drive's inputs per torsion, each with its partner's: (invariants (B, Q, 12), pseudo-scalars
        (B, Q, 2 (5 + N))) (arguments as :meth:`angles`; module docstring). They depend on the frozen
        map only through x_jump and eps, so a drive can be fitted on them alone
        (:mod:`molflow.training.drive_fit`)."""
        q = self.quads
        theta, g = dihedral_and_gradient(x, q)  # (B,Q), (B,Q,4,3)
        moved = torch.remainder(dihedral_and_gradient(x_jump, q)[0] - theta + torch.pi, 2 * torch.pi) - torch.pi
        m_inv = (1.0 / masses)[q]  # (Q, 4)
        sig = sigma[q]  # (Q, 4)

        def project(vec, weight):  # sum over the 4 atoms of g . (weight * vec) -> (B, Q); vec (B, A, 3)
            return (g * (weight[None, :, :, None] * vec[:, q])).sum((-1, -2))

        g2 = (g * g).sum(-1)  # (B, Q, 4)
        omega = project(v, torch.ones_like(m_inv)) / torch.sqrt((g2 * kT * m_inv).sum(-1)).clamp_min(1e-12)
        gs = torch.sqrt((g2 * sig * sig).sum(-1)).clamp_min(1e-12)  # (B, Q)
        N = self.n_coefficients
        l_sd = torch.sqrt(tau[:, None] / (2 * torch.arange(N, device=x.device, dtype=x.dtype) + 1)).clamp_min(1e-6)
        b = [project(L[:, n], sig) / (gs * l_sd[:, n, None]) for n in range(N)]
        zeta = project(eps[:, -1], torch.ones_like(m_inv)) / torch.sqrt(g2.sum(-1)).clamp_min(1e-12)
        B, Q = theta.shape
        if self.bins:  # decorrelated: the torsions' latents are independent N(0, 1) (a binned law's source)
            zeta = self._whiten(zeta, g, x.shape[1])
        inv_own = torch.cat([torch.cos(theta)[..., None], t_feat[:, None, :].expand(B, Q, 3),
                             self.kinds[None].expand(B, Q, 2)], -1)
        torque = self.torques(x, forces, masses) * (TORQUE_SCALE_RAD / kT)
        extra = [self._chirality(x)] if self.n_landscape else []
        pseudo_own = torch.stack([torch.sin(theta), moved, torque, omega, zeta, *b, *extra], -1)
        p = self.partners
        return torch.cat([inv_own, inv_own[:, p]], -1), torch.cat([pseudo_own, pseudo_own[:, p]], -1)

    def _chirality(self, x: torch.Tensor) -> torch.Tensor:
        """Sign (B, Q) of each torsion's residue's CA centre, (N - CA) . ((C - CA) x (CB - CA)): a
        pseudo-scalar, +1 for an L residue as built by OpenMM's templates; 0 without a CB (glycine)."""
        c = self.centres
        has = (c[:, 3] >= 0).to(x.dtype)
        n, ca, cc, cb = (x[:, c[:, k].clamp_min(0)] for k in range(4))
        t = ((n - ca) * torch.cross(cc - ca, cb - ca, dim=-1)).sum(-1)
        return torch.sign(t) * has

    def _whiten(self, zeta: torch.Tensor, g: torch.Tensor, n_atoms: int) -> torch.Tensor:
        """Make the torsions' latents (B, Q) independent: zeta_q = g_q . e / |g_q| for one standard
        normal vector e has the correlation C = G G^T of the unit gradients G (B, Q, 3A); with C = K K^T
        (Cholesky), K^-1 zeta is standard normal with identity covariance. C is unchanged by rotations
        and mirrors, so the whitened latents still flip sign in a mirror."""
        B, Q = zeta.shape
        full = torch.zeros(B, Q, n_atoms, 3, dtype=g.dtype, device=g.device)
        for q in range(Q):
            full[:, q].index_add_(1, self.quads[q], g[:, q])
        unit = full.reshape(B, Q, -1)
        unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        C = unit @ unit.transpose(1, 2)
        eye = torch.eye(Q, dtype=C.dtype, device=C.device)
        K, info = torch.linalg.cholesky_ex(C + 1e-9 * eye)
        # a degenerate geometry (collinear atoms: zero gradient) or a non-finite state gives no factor:
        # keep those latents unwhitened rather than fail the whole batch (the sampler's guard judges them)
        K = torch.where((info != 0)[:, None, None], eye, K)
        return torch.linalg.solve_triangular(K, zeta[..., None], upper=False)[..., 0]

    def _turn_field(self, x: torch.Tensor, j: int, masses: torch.Tensor):
        """(origin (B, 3), unit axis (B, 3), per-atom turn share (B, A)) of torsion j at x: a turn by
        delta rotates atom i about the axis through the bond by share_i * delta (c's side turns by
        delta I_b / (I_b + I_c), b's side by the rest the other way: no angular momentum about it)."""
        b, c = self.quads[j, 1], self.quads[j, 2]
        origin = x[:, b]
        axis = x[:, c] - origin
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        r = x - origin[:, None]
        perp2 = (r * r).sum(-1) - (r * axis[:, None]).sum(-1) ** 2  # (B, A)
        side = self.sides[j][None]  # (1, A): 1 on c's side
        i_c = (masses * side * perp2).sum(-1)
        i_b = (masses * (1 - side) * perp2).sum(-1)
        share_c = (i_b / (i_b + i_c).clamp_min(1e-12))[:, None]
        return origin, axis, side * share_c - (1 - side) * (1 - share_c)

    def torques(self, x: torch.Tensor, forces: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
        """Generalised force -dU/d delta (B, Q) kJ/mol/rad of each torsion's turn at x, from the
        forces (B, A, 3) kJ/mol/nm: sum_i f_i . share_i (axis x (x_i - origin)). Bond lengths and
        angles do not change in a turn, so only torsion and non-bonded terms contribute."""
        out = []
        for j in range(self.quads.shape[0]):
            origin, axis, share = self._turn_field(x, j, masses)
            u = torch.cross(axis[:, None].expand_as(x), x - origin[:, None], dim=-1) * share[..., None]
            out.append((forces * u).sum((-1, -2)))
        return torch.stack(out, -1)

    def turn(self, x: torch.Tensor, v: torch.Tensor, delta: torch.Tensor,
             masses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn each torsion j of (x, v) (B, A, 3) by delta[:, j] rad, one after the other, splitting
        the turn between the bond's two sides by their moments of inertia about it."""
        for j in range(self.quads.shape[0]):
            origin, axis, share = self._turn_field(x, j, masses)
            angle = delta[:, j, None] * share
            x = _rotate(x, origin, axis, angle)
            v = _rotate(v, torch.zeros_like(origin), axis, angle)
        return x, v


def _centres(system, quads: np.ndarray, n_phi: int) -> np.ndarray:
    """(N, CA, C, CB) atom indices (Q, 4) of each torsion's residue (CB: CA's heaviest neighbour
    other than N and C, -1 if it has none heavier than hydrogen)."""
    nbr = _neighbours(system.bonds, system.n_atoms)
    out = []
    for k, q in enumerate(quads):
        n, ca, c = (q[1], q[2], q[3]) if k < n_phi else (q[0], q[1], q[2])
        others = [a for a in nbr[ca] if a not in (n, c) and system.masses_amu[a] > 2.0]
        cb = max(others, key=lambda a: system.masses_amu[a]) if others else -1
        out.append([n, ca, c, cb])
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


def build_torsion_drive(system, n_coefficients: int, hidden: int, bins: int = 0,
                        landscape: int = 0, landscape_pair: int = 0) -> TorsionDrive:
    """The drive for a :class:`~molflow.systems.MolecularSystem`: its backbone phi and psi."""
    d = system.dihedral_indices()
    phi, psi = np.asarray(d["phi"]).reshape(-1, 4), np.asarray(d["psi"]).reshape(-1, 4)
    n = len(phi)
    quads = np.concatenate([phi, psi])
    kinds = np.concatenate([np.tile([1.0, 0.0], (n, 1)), np.tile([0.0, 1.0], (n, 1))]).reshape(-1, 2)
    partners = np.concatenate([np.arange(n) + n, np.arange(n)]).astype(int)
    sides = np.stack([rotating_side(system.bonds, system.n_atoms, int(q[1]), int(q[2])) for q in quads]) \
        if len(quads) else np.zeros((0, system.n_atoms), dtype=bool)
    return TorsionDrive(quads, kinds, partners, sides.astype(float), n_coefficients, hidden, bins, landscape,
                        _centres(system, quads, n) if landscape else None, landscape_pair)
