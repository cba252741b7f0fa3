"""The internal-coordinate Boltzmann sampler: a fitted base density and few-step coupling maps.

A conformation is written in the internal coordinates of a Z-matrix (:mod:`.internal`): bond
lengths, bond angles and torsions, with the torsions of atoms that rotate together stored as
offsets. The stiff coordinates — every bond and angle, the offsets, and the primary torsions that
stay near one value (peptide ω, the improper-like torsion that fixes each stereocentre) — are
nearly Gaussian given the slow ones; the broad primary torsions (backbone φ/ψ, methyl rotors) are
not. The density is therefore built in three exact pieces:

1. **broad torsions** τ_b: the central residue's (φ, ψ)-bond pair from a 2-D histogram, the
   others from 1-D histograms (``histogram_bins`` per turn, mixed with ``histogram_floor`` of the
   uniform law so that every angle is reachable), uniform within a bin: a piecewise-constant
   density, exact;
2. **stiff coordinates** G (bonds nm, angles rad, stiff torsions as deviations from their circular
   mean): G = μ(τ_b) + L ε, a Gaussian whose mean is linear in Fourier features of τ_b
   (least squares) and whose covariance LLᵀ is that of the residuals, fitted to the (weighted)
   training frames;
3. **K map steps** on ε given τ_b: ε = f_K ∘ … ∘ f_1(ε_0), ε_0 ~ N(0, I), each f an affine coupling
   (half of ε scaled and shifted by a network of the other half and of τ_b's features), so the
   inverse and the log-determinant are exact and cheap: invertible by construction, no fixed-point
   check needed. One independent stack is trained per supported step count (1, 2, 4, 10) by
   maximum likelihood on the training frames; ``steps=0`` is the base alone.

The density of a sample on the 3A − 3 centre-free Cartesian coordinates (orientation uniform) is
q_IC / Π r² Π sin θ (:meth:`.internal.ZMatrix.log_volume`), so

    log w = -U/kT + [Σ log-scales + log Π r² sin θ] - [log p(τ_b) + log N(ε_0) - log|det L|]

is an exact importance weight for the Boltzmann law, and — the stereocentre torsions being stiff —
for the molecule's own stereoisomer. Samples outside the Z-matrix's domain (an angle outside
(0, π), a bond ≤ 0, a stiff torsion deviating by more than π) would make the map non-injective
there: they get weight zero and are counted.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .internal import ZMatrix, random_rotations, wrap_angle

KIND = "internal"


def _from_dict(cls, d: dict[str, Any], what: str):
    """A settings dataclass from a dict, refusing keys it does not have (one line naming them)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise InputError(f"unknown {what} setting(s) {sorted(unknown)}")
    return cls(**d)


@dataclasses.dataclass
class InternalFlowConfig:
    """Settings of the internal-coordinate sampler (``--config`` keys; ``kind: vp`` selects the
    Cartesian VP-SDE map instead)."""

    kind: str = KIND
    histogram_bins: int = 36  # per 2π for the broad torsions
    histogram_floor: float = 0.01  # weight of the uniform law mixed into each histogram
    broad_threshold: float = 0.9  # mean resultant length below which a proper primary torsion is broad
    # (backbone φ/ψ torsions are broad always, improper-like ones never)
    fourier_order: int = 3  # of the broad torsions in the stiff block's mean and the networks' input
    hidden: int = 128  # width of each coupling network
    depth: int = 2  # hidden layers of each coupling network
    max_log_scale: float = 2.0  # bound on each coupling log-scale (tanh)
    step_counts: tuple[int, ...] = (1, 2, 4, 10)

    def __post_init__(self):
        self.step_counts = tuple(int(k) for k in self.step_counts)
        if self.kind != KIND:
            raise InputError(f"InternalFlowConfig is for kind {KIND!r}, not {self.kind!r}")
        if self.histogram_bins < 4 or not 0.0 < self.histogram_floor < 1.0:
            raise InputError("histogram_bins must be >= 4 and histogram_floor in (0, 1)")
        if not self.step_counts or min(self.step_counts) < 1:
            raise InputError("step_counts must be positive")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InternalFlowConfig":
        return _from_dict(cls, d, "internal-coordinate sampler")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["step_counts"] = list(self.step_counts)
        return d


def _features(tb: torch.Tensor, order: int, pair: bool) -> torch.Tensor:
    """Fourier features (N, F) of broad torsions (N, nb): sin/cos(kτ) for k ≤ order, and, when the first
    two form the (φ, ψ) pair, their products for k, l ≤ 2. No constant column."""
    cols = []
    for c in range(tb.shape[1]):
        for k in range(1, order + 1):
            cols += [torch.sin(k * tb[:, c]), torch.cos(k * tb[:, c])]
    if pair:
        p, q = tb[:, 0], tb[:, 1]
        for k in (1, 2):
            for l in (1, 2):
                for fa in (torch.sin, torch.cos):
                    for fb in (torch.sin, torch.cos):
                        cols.append(fa(k * p) * fb(l * q))
    return torch.stack(cols, 1) if cols else tb.new_zeros(tb.shape[0], 0)


def rotatable_bonds(n_atoms: int, bonds: np.ndarray) -> set[frozenset]:
    """Bonds (as frozensets) about which a molecule turns freely: both ends bonded to something else, at
    least one end with four neighbours (an sp3 centre: so peptide and other conjugated bonds are not),
    and not in a ring."""
    nb: list[set[int]] = [set() for _ in range(int(n_atoms))]
    for a, b in np.asarray(bonds, dtype=int):
        nb[a].add(int(b))
        nb[b].add(int(a))
    out = set()
    for a, b in np.asarray(bonds, dtype=int):
        a, b = int(a), int(b)
        if len(nb[a]) < 2 or len(nb[b]) < 2 or max(len(nb[a]), len(nb[b])) < 4:
            continue
        seen, stack = {a}, [q for q in nb[a] if q != b]  # is b reachable from a without this bond?
        while stack:
            q = stack.pop()
            if q not in seen:
                seen.add(q)
                stack.extend(nb[q] - seen)
        if b not in seen:
            out.add(frozenset((a, b)))
    return out


class Coupling(nn.Module):
    """One affine coupling step on ε (D,) given context features: the entries outside ``mask`` are
    scaled by exp(s) and shifted by t, both functions of the masked entries and the context."""

    def __init__(self, mask: torch.Tensor, n_context: int, hidden: int, depth: int, max_log_scale: float):
        super().__init__()
        D = mask.numel()
        self.register_buffer("mask", mask.to(torch.float64))
        layers: list[nn.Module] = []
        width = D + n_context
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, 2 * D)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.max_log_scale = float(max_log_scale)

    def _st(self, e_masked: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(torch.cat([e_masked, ctx], -1)).chunk(2, -1)
        free = 1.0 - self.mask
        s = self.max_log_scale * torch.tanh(s / self.max_log_scale) * free
        return s, t * free

    def forward(self, e: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ε_in -> (ε_out, log|det ∂ε_out/∂ε_in|)."""
        s, t = self._st(e * self.mask, ctx)
        return e * torch.exp(s) + t, s.sum(-1)

    def inverse(self, e: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ε_out -> (ε_in, log|det ∂ε_out/∂ε_in|) (the same log-determinant as the forward step)."""
        s, t = self._st(e * self.mask, ctx)
        return (e - t) * torch.exp(-s), s.sum(-1)


class InternalFlow(nn.Module):
    """Base density and coupling stacks for one molecule (see the module docstring).

    Build it with :meth:`fit` (from training frames) or from a checkpoint's ``layout`` and state
    dict. All tensors are float64.
    """

    def __init__(self, layout: dict[str, Any], config: InternalFlowConfig):
        super().__init__()
        self.config = config
        self.layout = layout
        self.zmatrix = ZMatrix(tuple(layout["order"]), tuple(tuple(r) for r in layout["refs"]),
                               tuple(layout["offset_of"]))
        A = self.zmatrix.n_atoms
        self.pair = bool(layout["pair"])
        self.broad = list(layout["broad"])  # torsion-block indices; the (φ, ψ) pair first when ``pair``
        self.stiff_torsions = list(layout["stiff_torsions"])
        nb, bins = len(self.broad), config.histogram_bins
        self.n_stiff = (A - 1) + (A - 2) + len(self.stiff_torsions)
        n_single = nb - (2 if self.pair else 0)
        n_feat = _features(torch.zeros(1, nb, dtype=torch.float64), config.fourier_order, self.pair).shape[1]
        D = self.n_stiff
        dt = torch.float64
        self.register_buffer("stiff_mean_torsion", torch.zeros(len(self.stiff_torsions), dtype=dt))
        self.register_buffer("hist2", torch.full((bins, bins) if self.pair else (0, 0), 1.0 / bins**2, dtype=dt))
        self.register_buffer("hist1", torch.full((n_single, bins), 1.0 / bins, dtype=dt))
        self.register_buffer("coef", torch.zeros(n_feat + 1, D, dtype=dt))
        self.register_buffer("chol", torch.eye(D, dtype=dt))
        seed = int(layout.get("mask_seed", 0))
        gen = torch.Generator().manual_seed(seed)
        self.stacks = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):  # masks and initial weights depend on the seed alone
            torch.manual_seed(seed)
            for K in config.step_counts:
                steps = []
                for k in range(K):
                    perm = torch.randperm(D, generator=gen)
                    mask = torch.zeros(D)
                    mask[perm[: D // 2]] = 1.0
                    steps.append(Coupling(mask, n_feat, config.hidden, config.depth, config.max_log_scale))
                self.stacks[str(K)] = nn.ModuleList(steps)
        self.double()

    # ------------------------------------------------------------------ fitting the base
    @classmethod
    def fit(cls, system, frames_nm: np.ndarray, weights: np.ndarray | None = None,
            config: InternalFlowConfig | None = None, mask_seed: int = 0) -> "InternalFlow":
        """Z-matrix, torsion classes, histograms and the conditional Gaussian from frames (M, A, 3) nm
        with optional weights (M,) (e.g. MBAR weights of umbrella windows); the coupling steps start as
        the identity."""
        config = config or InternalFlowConfig()
        zm = ZMatrix.for_system(system)
        x = torch.as_tensor(np.asarray(frames_nm), dtype=torch.float64)
        w = torch.ones(len(x), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if len(w) != len(x) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise InputError("frame weights must be finite, non-negative, one per frame, not all zero")
        w = w / w.sum()
        r, th, tau = zm.to_internal(x)
        prim = [int(t) for t in zm.primary_torsions]
        R = (w[:, None] * torch.exp(1j * tau[:, prim])).sum(0).abs()
        bonds = np.asarray(system.bonds)
        bonded = {frozenset(map(int, b)) for b in bonds}
        rotatable = rotatable_bonds(system.n_atoms, bonds)

        def is_broad(t: int, Rv: float) -> bool:
            i, j, k, l = zm.torsion_atoms(t)
            if frozenset((k, l)) not in bonded:  # an improper-like torsion (a stereocentre's): stiff
                return False
            # rotatable bonds are broad whatever the data visited (their wells must stay reachable)
            return Rv < config.broad_threshold or frozenset((j, k)) in rotatable

        broad = [t for t, Rv in zip(prim, R.tolist()) if is_broad(t, Rv)]
        # the central residue's (φ, ψ) bonds, when both carry a broad torsion: one 2-D histogram
        pair = False
        try:
            phi_idx, psi_idx = system.central_dihedrals()
            want = [{int(phi_idx[1]), int(phi_idx[2])}, {int(psi_idx[1]), int(psi_idx[2])}]
            about = [[t for t in broad if set(zm.torsion_atoms(t)[1:3]) == b] for b in want]
            if all(len(a) == 1 for a in about):
                pair = True
                broad = [about[0][0], about[1][0]] + [t for t in broad if t not in (about[0][0], about[1][0])]
        except (ValueError, IndexError, AttributeError):  # no backbone: 1-D histograms only
            pass
        stiff = [t for t in range(tau.shape[1]) if t not in broad]
        layout = {"order": list(zm.order), "refs": [list(r_) for r_ in zm.refs], "offset_of": list(zm.offset_of),
                  "broad": broad, "pair": pair, "stiff_torsions": stiff, "mask_seed": int(mask_seed)}
        flow = cls(layout, config)
        mean_t = torch.angle((w[:, None] * torch.exp(1j * tau[:, stiff])).sum(0)) if stiff else tau.new_zeros(0)
        flow.stiff_mean_torsion.copy_(mean_t)
        bins, floor = config.histogram_bins, config.histogram_floor
        tb = tau[:, broad]
        ww = w.numpy()
        if pair:
            H, _, _ = np.histogram2d(tb[:, 0].numpy(), tb[:, 1].numpy(), bins=bins, range=[[-np.pi, np.pi]] * 2,
                                     weights=ww)
            flow.hist2.copy_(torch.as_tensor((1 - floor) * H / H.sum() + floor / bins**2))
        for c in range(flow.hist1.shape[0]):
            H, _ = np.histogram(tb[:, c + (2 if pair else 0)].numpy(), bins=bins, range=[-np.pi, np.pi], weights=ww)
            flow.hist1[c].copy_(torch.as_tensor((1 - floor) * H / H.sum() + floor / bins))
        G = flow._stiff_block(r, th, tau)
        F = flow._design(tb)
        # weighted least squares with a ridge of 1/n_eff on the Fourier terms, and the residual covariance
        # shrunk towards its diagonal by D/n_eff (n_eff: Kish's effective number of frames) — negligible
        # for long runs, and what keeps a fit to a few dozen frames well posed
        n_eff = float(1.0 / (w * w).sum())
        ridge = torch.eye(F.shape[1], dtype=F.dtype) / n_eff
        ridge[0, 0] = 0.0
        Fw = F * w[:, None]
        coef = torch.linalg.solve(Fw.T @ F + ridge, Fw.T @ G)
        res = G - F @ coef
        cov = (w[:, None] * res).T @ res
        lam = min(1.0, G.shape[1] / n_eff)
        cov = (1.0 - lam) * cov + lam * torch.diag(cov.diagonal())
        if not bool((cov.diagonal() > 0).all()):
            raise InputError("a stiff coordinate does not vary over the training frames: more (or longer) MD needed")
        try:
            chol = torch.linalg.cholesky(cov)
        except RuntimeError:
            raise InputError("the stiff coordinates' covariance is singular: too few distinct training frames") from None
        flow.coef.copy_(coef)
        flow.chol.copy_(chol)
        return flow

    # ------------------------------------------------------------------ pieces
    def _stiff_block(self, r: torch.Tensor, th: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        dev = wrap_angle(tau[:, self.stiff_torsions] - self.stiff_mean_torsion)
        return torch.cat([r, th, dev], 1)

    def _context(self, tb: torch.Tensor) -> torch.Tensor:
        return _features(tb, self.config.fourier_order, self.pair)

    def _design(self, tb: torch.Tensor) -> torch.Tensor:
        ctx = self._context(tb)
        return torch.cat([torch.ones(len(tb), 1, dtype=tb.dtype), ctx], 1)

    @property
    def bin_width(self) -> float:
        return 2.0 * math.pi / self.config.histogram_bins

    def _bin(self, t: torch.Tensor) -> torch.Tensor:
        return ((t + math.pi) / self.bin_width).floor().long().clamp(0, self.config.histogram_bins - 1)

    def log_prob_broad(self, tb: torch.Tensor) -> torch.Tensor:
        """log density (rad⁻ⁿ) of the broad torsions (N, nb) under the histograms."""
        bw = self.bin_width
        out = tb.new_zeros(len(tb))
        c0 = 0
        if self.pair:
            out = out + torch.log(self.hist2[self._bin(tb[:, 0]), self._bin(tb[:, 1])] / bw**2)
            c0 = 2
        for c in range(self.hist1.shape[0]):
            out = out + torch.log(self.hist1[c, self._bin(tb[:, c0 + c])] / bw)
        return out

    def sample_broad(self, n: int, gen: torch.Generator) -> torch.Tensor:
        bins, bw = self.config.histogram_bins, self.bin_width
        cols = []
        if self.pair:
            flat = torch.multinomial(self.hist2.reshape(-1), n, replacement=True, generator=gen)
            for idx in (flat // bins, flat % bins):
                cols.append(-math.pi + (idx + torch.rand(n, generator=gen, dtype=torch.float64)) * bw)
        for c in range(self.hist1.shape[0]):
            idx = torch.multinomial(self.hist1[c], n, replacement=True, generator=gen)
            cols.append(-math.pi + (idx + torch.rand(n, generator=gen, dtype=torch.float64)) * bw)
        return torch.stack(cols, 1) if cols else torch.zeros(n, 0, dtype=torch.float64)

    def _stack(self, steps: int) -> nn.ModuleList:
        if steps == 0:
            return nn.ModuleList()
        if str(steps) not in self.stacks:
            raise InputError(f"this sampler was trained for {list(self.config.step_counts)} map steps "
                             f"(or 0: the base alone), not {steps}")
        return self.stacks[str(steps)]

    def log_prob_epsilon(self, e: torch.Tensor, ctx: torch.Tensor, steps: int) -> torch.Tensor:
        """log q(ε | τ_b) for whitened stiff coordinates ε (N, D) under the ``steps``-step stack."""
        logdet = e.new_zeros(len(e))
        for f in reversed(self._stack(steps)):
            e, ld = f.inverse(e, ctx)
            logdet = logdet + ld
        return -0.5 * (e * e).sum(-1) - 0.5 * e.shape[-1] * math.log(2 * math.pi) - logdet

    def whiten(self, r: torch.Tensor, th: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Internal coordinates -> (broad torsions τ_b (N, nb), whitened stiff block ε (N, D))."""
        tb = tau[:, self.broad]
        G = self._stiff_block(r, th, tau)
        e = torch.linalg.solve_triangular(self.chol, (G - self._design(tb) @ self.coef).T, upper=False).T
        return tb, e

    @property
    def log_det_chol(self) -> torch.Tensor:
        return torch.log(torch.diagonal(self.chol)).sum()

    def log_prob_internal(self, x_nm: torch.Tensor, steps: int) -> torch.Tensor:
        """log density of conformations (N, A, 3) nm over their internal coordinates (training's NLL)."""
        r, th, tau = self.zmatrix.to_internal(x_nm)
        tb, e = self.whiten(r, th, tau)
        return self.log_prob_broad(tb) + self.log_prob_epsilon(e, self._context(tb), steps) - self.log_det_chol

    # ------------------------------------------------------------------ sampling
    def draw(self, n: int, steps: int, gen: torch.Generator, rotate: bool = True) -> dict[str, torch.Tensor]:
        """:meth:`sample` with gradients to the coupling networks (the reverse-KL loss uses it)."""
        with torch.no_grad():
            tb = self.sample_broad(n, gen)
            ctx = self._context(tb)
            e0 = torch.randn(n, self.n_stiff, generator=gen, dtype=torch.float64)
            log_base = self.log_prob_broad(tb) - 0.5 * (e0 * e0).sum(-1) \
                - 0.5 * self.n_stiff * math.log(2 * math.pi) - self.log_det_chol
        e, logdet = e0, torch.zeros(n, dtype=torch.float64)
        for f in self._stack(steps):
            e, ld = f(e, ctx)
            logdet = logdet + ld
        G = self._design(tb) @ self.coef + e @ self.chol.T
        A = self.zmatrix.n_atoms
        r, th = G[:, : A - 1], G[:, A - 1: 2 * A - 3]
        dev = G[:, 2 * A - 3:]
        ok = ((r > 0).all(1) & (th > 0).all(1) & (th < math.pi).all(1) & (dev.abs() < math.pi).all(1)).detach()
        tau = torch.cat([dev + self.stiff_mean_torsion, tb], 1)[:, self._torsion_order]
        rot = random_rotations(n, gen) if rotate else None
        x = self.zmatrix.to_cartesian(r, th, tau, rot)
        vol = torch.where(ok, self.zmatrix.log_volume(r.abs(), th.clamp(1e-12, math.pi - 1e-12)), 0.0)
        return {"positions": x, "log_base_density": log_base, "log_det_jacobian": logdet + vol, "in_domain": ok}

    @property
    def _torsion_order(self) -> list[int]:
        """Column order taking [stiff torsions, broad torsions] to torsion-block order."""
        src = list(self.stiff_torsions) + list(self.broad)
        return [src.index(t) for t in range(len(src))]

    @torch.no_grad()
    def sample(self, n: int, steps: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``n`` conformations with ``steps`` map steps: ``positions`` (n, A, 3) nm (centred, uniformly
        oriented), ``log_base_density`` (log p(τ_b) + log N(ε_0) - log|det L|), ``log_det_jacobian``
        (Σ log-scales + log Π r² sin θ) and ``in_domain`` (bool; outside it the positions are still the
        geometric construction from the drawn values, and the volume term is 0)."""
        return self.draw(n, steps, gen)


# ---------------------------------------------------------------------- training
@dataclasses.dataclass
class InternalTrainConfig:
    """Optimisation settings of the coupling steps.

    ``objective``: ``"reverse"`` (default) minimises E_q[U/kT + log q] over the map's own samples
    (the reverse Kullback-Leibler divergence to the Boltzmann law up to a constant, i.e. −E_q[log w]:
    it needs the force field's energies and forces, ``energy_batch_size`` samples per stack and step);
    ``"forward"`` maximises the likelihood of the training frames (no energies);
    ``"both"`` adds the two. The broad torsions stay on their histograms either way, so the reverse
    divergence cannot drop a basin.
    """

    steps: int = 4000
    objective: str = "reverse"
    energy_batch_size: int = 256
    batch_size: int = 512
    lr: float = 1e-3
    lr_floor: float = 0.05  # final learning-rate factor of the cosine schedule
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    validation_fraction: float = 0.1
    skip_fraction: float = 0.1  # of each MD replica's first frames, left out
    checkpoint_every: int = 500

    def __post_init__(self):
        if self.objective not in ("reverse", "forward", "both"):
            raise InputError(f"objective must be reverse, forward or both, not {self.objective!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InternalTrainConfig":
        return _from_dict(cls, d, "internal-coordinate training")


class InternalTrainer:
    """The fitted base, the coupling stacks, their optimiser and the data in whitened coordinates.

    Every stack is trained on the same minibatch (frames drawn with probability ∝ weight) by its own
    negative log-likelihood; the stacks share nothing, so summing their losses trains each alone.
    """

    def __init__(self, flow: InternalFlow, frames_nm: np.ndarray, weights: np.ndarray, config: InternalTrainConfig,
                 seed: int, system=None):
        self.flow, self.config, self.seed = flow, config, int(seed)
        self.energy = None
        if config.objective != "forward":
            if system is None:
                raise ValueError("the reverse objective needs the system (its force field)")
            from .anneal import MolecularEnergy

            self.energy = MolecularEnergy(system, "Reference", "all")
        self.gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(frames_nm), dtype=torch.float64)
            r, th, tau = flow.zmatrix.to_internal(x)
            self.tb, self.e = flow.whiten(r, th, tau)
            self.ctx = flow._context(self.tb)
        w = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        n = len(w)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1))
        n_val = int(round(config.validation_fraction * n)) if n >= 20 else 0
        self.val_idx, self.train_idx = perm[:n_val], perm[n_val:]
        self.w_train = w[self.train_idx] / w[self.train_idx].sum()
        self.w_val = w[self.val_idx] / w[self.val_idx].sum() if n_val else None
        self.opt = torch.optim.AdamW(flow.stacks.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step_count = 0
        #: the step count the learning-rate schedule was planned for: a run extended with --resume and
        #: more --steps goes on at the schedule's final rate instead of re-planning it
        self.schedule_steps = int(config.steps)
        self.history: list[dict[str, float]] = []

    def lr_factor(self) -> float:
        from ..flowmap import warmup_cosine

        return warmup_cosine(self.step_count, self.schedule_steps, self.config.lr_floor)

    def _nll(self, idx: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for K in self.flow.config.step_counts:
            lp = self.flow.log_prob_epsilon(self.e[idx], self.ctx[idx], K)
            out[str(K)] = -(lp.mean() if weights is None else (weights * lp).sum())
        return out

    def _reverse(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per stack, a surrogate whose gradient is that of E_q[U/kT - log|det|] (forces from OpenMM
        carried back through the map), and the monitored -E[log w] and batch ESS/N."""
        out, mon = {}, {}
        n = self.config.energy_batch_size
        for K in self.flow.config.step_counts:
            d = self.flow.draw(n, K, self.gen, rotate=False)
            x = d["positions"]
            flat = x.detach().reshape(n, -1).numpy()
            u, g, _, _ = self.energy(flat)
            u, g = torch.as_tensor(u), torch.as_tensor(g).reshape(x.shape)
            ok = d["in_domain"] & torch.isfinite(u) & torch.isfinite(g).all(-1).all(-1)
            if ok.sum() < max(2, n // 2):
                raise FloatingPointError(f"{int((~ok).sum())} of {n} samples of the {K}-step map are outside the "
                                         "Z-matrix domain or have a non-finite energy: stopping")
            g = torch.where(ok[:, None, None], g, 0.0)
            surrogate = ((x * g).sum((1, 2)) - d["log_det_jacobian"])[ok].mean()
            log_w = (-u + d["log_det_jacobian"].detach() - d["log_base_density"])[ok]
            wn = torch.softmax(log_w, 0)
            out[str(K)] = surrogate
            mon[f"kl_{K}"] = float(-log_w.mean())
            mon[f"ess_{K}"] = float(1.0 / (wn * wn).sum() / n)
        return out, mon

    def train_step(self) -> dict[str, float]:
        lr = self.config.lr * self.lr_factor()
        for g in self.opt.param_groups:
            g["lr"] = lr
        total, row = 0.0, {"lr": lr}
        if self.config.objective in ("forward", "both"):
            pick = torch.multinomial(self.w_train, self.config.batch_size, replacement=True, generator=self.gen)
            losses = self._nll(self.train_idx[pick])
            total = total + sum(losses.values())
            row.update({f"nll_{k}": float(v.detach()) for k, v in losses.items()})
        if self.config.objective in ("reverse", "both"):
            losses, mon = self._reverse()
            total = total + sum(losses.values())
            row.update(mon)
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at step {self.step_count}: stopping (the last "
                                     "checkpoint is intact)")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.flow.stacks.parameters(), self.config.grad_clip)
        self.opt.step()
        self.step_count += 1
        return row

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        """Weighted negative log-likelihood of the held-out frames' stiff block per step count (0: base)."""
        if self.w_val is None:
            return {}
        out = {"val_nll_0": float(-(self.w_val * self.flow.log_prob_epsilon(self.e[self.val_idx],
                                                                            self.ctx[self.val_idx], 0)).sum())}
        out.update({f"val_nll_{k}": float(v) for k, v in self._nll(self.val_idx, self.w_val).items()})
        return out

    def state(self) -> dict[str, Any]:
        return {"model": self.flow.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step_count,
                "rng": self.gen.get_state(), "history_json": self.history, "schedule_steps": self.schedule_steps}

    def load_state(self, ck: dict[str, Any]) -> None:
        self.flow.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step_count = int(ck["step"])
        self.schedule_steps = int(ck.get("schedule_steps", self.schedule_steps))
        self.gen.set_state(ck["rng"])
        self.history = list(ck.get("history_json") or [])
