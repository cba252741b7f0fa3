"""Few-step equilibrium conformations with exact Boltzmann weights (``molflow sample-boltzmann``).

    >>> bs = molflow.BoltzmannSampler.load("bg.pt")
    >>> s = bs.sample(10_000, steps=4, seed=1, reweight=True)          # arrays in memory
    >>> bs.sample(10_000, steps=4, seed=1, reweight=True, out="conf.h5")  # the §9 file

A sample: base noise η ~ N(0, I) on the 3A - 3 centre-free coordinates (y_0 = Q_A η), a fresh
Brownian path ξ (the path coefficients of every step of the K-step grid in the log-SNR clock, and
the latents), K map steps, positions x = s·y_K (nm, centred). With ``reweight`` the map is re-run in
float64 for its exact Jacobian in the same coordinates (``torch.func``), and

    log w = -U(x)/kT + log|det ∂(Q_Aᵀ x)/∂η| - log N(η)

(U: the single-molecule NoCutoff energy from OpenMM) is an importance weight for the Boltzmann
distribution restricted to the molecule's own stereoisomer, exact where the map is injective for
that path (:mod:`molflow.boltzmann.reweight`). Every sample is kept and counted:

- chirality (:class:`~molflow.boltzmann.geometry.ChiralityChecker`): the E(3)-equivariant map and
  the isotropic base make the model density mirror-symmetric, so a sample whose every stereocentre
  is inverted is the mirror image of an equally likely allowed one: it is reflected back (weights
  change by the constant factor 2 for all allowed samples, which self-normalisation removes) and
  counted (``n_reflected``); mixed chirality gets weight zero (``chirality_ok`` False,
  ``n_mixed_chirality``); ``n_wrong_chirality`` counts both;
- invertibility: the fixed-point inverse (started ``inverse_radius`` away in the base) must return
  to η and the Jacobian must be finite and non-singular, else weight zero
  (``n_invertibility_failures`` = ``n_singular_jacobian`` + ``n_inverse_other_preimage`` (proven
  folds) + ``n_inverse_not_converged`` (inconclusive, excluded to be safe); per sample
  ``inverse_status`` 0-3, :func:`~molflow.boltzmann.reweight.invertibility_check`);
- a non-finite energy gets weight zero (``n_nonfinite_energy``).

Random numbers depend only on (seed, batch index), and are drawn in float64 whether or not the run
reweights, so ``reweight`` does not change which conformations are drawn (up to float32 rounding).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import InputError
from ..flowmap import sample_coefficients_torch
from ..seeding import random_seed
from ..systems import MolecularSystem, system_from_pdb_text
from ..checkpoint import load_checkpoint
from .anneal import AnnealSettings, MolecularEnergy, anneal
from .geometry import ChiralityChecker, centre, centre_free_basis
from .icflow import InternalFlow, InternalFlowConfig
from .model import BoltzmannConfig, BoltzmannMap
from .reweight import (INVERSE_NOT_CONVERGED, INVERSE_OTHER_PREIMAGE, INVERSE_OUTSIDE_DOMAIN, INVERSE_SINGULAR,
                       boltzmann_log_weights,
                       gaussian_log_density, invertibility_check, jacobian_and_value, kish_ess, logabsdet,
                       self_normalise)
from .training import FORMAT, build_map

FILE_FORMAT = "molflow-boltzmann-samples"
SUPPORTED_STEPS = (1, 2, 4, 10)


def read_samples(path: str | os.PathLike) -> dict[str, Any]:
    """A conf.h5 as a dict: its datasets as arrays and ``attrs`` (plain values)."""
    import h5py

    from ..trajectory import plain_attr

    if not Path(path).is_file():
        raise InputError(f"no such sample file: {path}")
    with h5py.File(path, "r", locking=False) as f:
        if f.attrs.get("format") != FILE_FORMAT:
            raise InputError(f"{path} is not a molflow Boltzmann sample file")
        out = {k: np.asarray(f[k]) for k in f}
        out["attrs"] = {k: plain_attr(v) for k, v in f.attrs.items()}
    return out


class BoltzmannSampler:
    """A trained Boltzmann map with its system: draws conformations and their weights."""

    def __init__(self, model: "BoltzmannMap | InternalFlow", system: MolecularSystem,
                 metadata: dict[str, Any] | None = None):
        self.model = model.eval()
        #: "internal" (the internal-coordinate sampler, :mod:`.icflow`) or "vp" (the Cartesian VP-SDE map)
        self.kind = "internal" if isinstance(model, InternalFlow) else "vp"
        self.system = system
        self.metadata = metadata or {}
        self.chirality = ChiralityChecker.for_system(system)
        self._q = centre_free_basis(system.n_atoms)

    @property
    def device(self) -> torch.device:
        return self.model.chol.device if self.kind == "internal" else self.model.scale.device

    @property
    def fingerprint(self) -> str:
        """A digest of the weights in use (recorded in sample files)."""
        from ..checkpoint import weights_fingerprint

        return weights_fingerprint(self.model)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", weights: str = "ema") -> "BoltzmannSampler":
        """Load a ``train-boltzmann`` checkpoint (``torch.load(weights_only=True)``)."""
        from ..devices import resolve_device

        ck = load_checkpoint(path, expected_format=FORMAT, kind="Boltzmann-sampler")
        s = ck["system_json"]
        mol = system_from_pdb_text(s["pdb"], s["forcefield"], s["temperature_K"], s["friction_per_ps"],
                                   s["timestep_fs"], s["name"])
        meta = {"path": str(path), "step": ck.get("step"), "fingerprint": s["fingerprint"],
                "training_wall_clock_s": ck.get("training_wall_clock_s"),
                "map_config": ck["map_config_json"], "train_config": ck.get("train_config_json")}
        if ck["map_config_json"].get("kind", "vp") == "internal":
            try:
                flow = InternalFlow(ck["layout_json"], InternalFlowConfig.from_dict(ck["map_config_json"]))
                flow.load_state_dict(ck["model"])
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise InputError(f"{path}: the internal-coordinate sampler does not fit its recorded layout ({exc})"
                                 ) from None
            return cls(flow, mol, meta)  # runs on the CPU: a step is a few small matrix products
        model = build_map(mol, float(ck["scale_nm"]), BoltzmannConfig.from_dict(ck["map_config_json"]))
        try:
            model.load_state_dict(ck[weights])
        except (KeyError, RuntimeError) as exc:
            raise InputError(f"{path}: model weights do not fit the recorded architecture ({exc})") from None
        return cls(model.to(resolve_device(device)), mol, meta)

    # ------------------------------------------------------------------ drawing
    def _draw(self, B: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base noise (B, A-1, 3) and the path: L (B, K, N, A, 3), latents (B, K, k, A, 3), float64."""
        A, c = self.system.n_atoms, self.model.config
        dev = gen.device
        eta = torch.randn(B, A - 1, 3, generator=gen, dtype=torch.float64, device=dev)
        tau = torch.full((B * K,), 1.0 / K, dtype=torch.float64, device=dev)
        L = centre(sample_coefficients_torch(tau, c.n_coefficients, (A, 3), gen)).reshape(B, K, c.n_coefficients, A, 3)
        eps = centre(torch.randn(B, K, c.n_latent, A, 3, generator=gen, dtype=torch.float64, device=dev))
        return eta, L, eps

    def _map_fn(self, model: BoltzmannMap, K: int):
        """Per-sample map η (d,) -> Q_Aᵀ y_K (d,) for a fixed path (L (K, N, A, 3), eps (K, k, A, 3))."""
        A = self.system.n_atoms
        dt = model.scale.dtype
        q = torch.as_tensor(self._q, dtype=dt, device=model.scale.device)
        grid = torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64)
        coeffs = model.grid_coefficients(grid)

        def fn(eta_flat, L, eps):
            y0 = (q @ eta_flat.reshape(A - 1, 3)).unsqueeze(0)
            y = model.run(y0, [(L[k:k + 1], eps[k:k + 1]) for k in range(K)], grid, coeffs)
            return (q.T @ y[0]).reshape(-1)

        return fn

    @torch.no_grad()
    def _positions(self, eta: torch.Tensor, L: torch.Tensor, eps: torch.Tensor, K: int) -> np.ndarray:
        m = self.model
        dt = m.scale.dtype
        q = torch.as_tensor(self._q, dtype=dt, device=self.device)
        y = torch.einsum("ai,bic->bac", q, eta.to(self.device, dt))
        grid = torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64)
        path = [(L[:, k].to(self.device, dt), eps[:, k].to(self.device, dt)) for k in range(K)]
        y = m.run(y, path, grid)
        return (y * m.scale).double().cpu().numpy()

    def _common_attrs(self, n: int, K: int, seed: int, reweight: bool, B: int, energy_platform: str) -> dict[str, Any]:
        """The sample file's provenance attributes shared by both kinds of sampler."""
        from ..devices import device_description

        return {
            "format": FILE_FORMAT, "kind": "boltzmann_samples", "molflow_version": __version__,
            "system": self.system.name, "fingerprint": self.system.fingerprint, "pdb": self.system.pdb_text,
            "forcefield": list(self.system.forcefield_files), "temperature_K": self.system.temperature_K,
            "friction_per_ps": self.system.friction_per_ps, "timestep_fs": self.system.timestep_fs,
            "n_samples": n, "steps": K, "seed": seed, "reweight": bool(reweight), "batch_size": B,
            "map_kind": self.kind, "model_path": str(self.metadata.get("path", "")),
            "model_fingerprint": self.fingerprint, "model_step": int(self.metadata.get("step") or 0),
            "training_wall_clock_s": float(self.metadata.get("training_wall_clock_s") or 0.0),
            "hardware": device_description(self.device), "platform": f"torch {self.device}",
            "energy_platform": energy_platform, "n_stereocentres": self.chirality.n_centres,
            "units": "positions nm (centred), potential_energy kJ/mol (single-molecule NoCutoff)",
        }

    def _sample_internal(self, n: int, K: int, seed: int, reweight: bool, out, batch_size: int | None,
                         energy_platform: str, progress: bool, anneal: AnnealSettings | None) -> dict[str, Any]:
        """:meth:`sample` for the internal-coordinate sampler: the density is analytic, so the weights
        cost one energy per sample; the map is invertible by construction (samples outside the Z-matrix
        domain get weight zero and are counted); chirality is not folded: the stereocentre torsions are
        stiff coordinates, so a sample of the wrong handedness is a model failure, kept with weight zero."""
        from tqdm.auto import tqdm

        from ..md.engine import EnergyEvaluator

        B = int(batch_size or 4096)
        kT = self.system.kT_kj_mol
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("positions", "log_det_jacobian", "log_base_density",
                                                              "in_domain")}
        bar = tqdm(total=n, disable=not progress, desc=f"sample-boltzmann K={K}", unit="conf", file=sys.stderr,
                   dynamic_ncols=True)
        t_start = time.perf_counter()
        for b, s0 in enumerate(range(0, n, B)):
            m = min(B, n - s0)
            rng = np.random.default_rng([seed, b])
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            d = self.model.sample(m, K, gen)
            for k in cols:
                cols[k].append(d[k].cpu().numpy())
            bar.update(m)
        bar.close()
        t_map = time.perf_counter() - t_start
        x = np.concatenate(cols["positions"])
        in_domain = np.concatenate(cols["in_domain"]).astype(bool)
        t0 = time.perf_counter()
        chir_ok = self.chirality.classify(x) == 1
        finite = np.isfinite(x).all(axis=(1, 2))
        U = np.full(n, np.nan)
        U[finite] = EnergyEvaluator(self.system, energy_platform)(x[finite])
        t_energy = time.perf_counter() - t0
        res: dict[str, Any] = {"positions": x.astype(np.float32), "potential_energy": U, "chirality_ok": chir_ok,
                               "reflected": np.zeros(n, dtype=bool)}
        attrs = {**self._common_attrs(n, K, seed, reweight, B, energy_platform),
                 "wall_clock_map_s": t_map, "wall_clock_reweight_s": 0.0, "wall_clock_energy_s": t_energy,
                 "n_reflected": 0, "n_mixed_chirality": int((~chir_ok).sum()),
                 "n_wrong_chirality": int((~chir_ok).sum()), "n_nonfinite_energy": int((~np.isfinite(U)).sum()),
                 "n_outside_domain": int((~in_domain).sum())}
        if reweight:
            lad, lbase = np.concatenate(cols["log_det_jacobian"]), np.concatenate(cols["log_base_density"])
            log_w, keep = boltzmann_log_weights(U / kT, lad, lbase, chir_ok, in_domain)
            res.update(log_det_jacobian=lad, log_base_density=lbase, invertible=in_domain,
                       inverse_status=np.where(in_domain, 0, INVERSE_OUTSIDE_DOMAIN).astype(np.int8))
            _weigh(self.system, res, attrs, x, log_w, keep, anneal, seed)
            attrs.update(n_invertibility_failures=int((~in_domain).sum()), n_singular_jacobian=0,
                         n_inverse_other_preimage=0, n_inverse_not_converged=0,
                         jacobian="analytic: coupling log-scales + Z-matrix volume (invertible by construction)")
        attrs["wall_clock_s"] = time.perf_counter() - t_start
        res["attrs"] = attrs
        if out is not None:
            write_samples(out, res)
        return res

    def sample(self, n: int, steps: int = 4, seed: int | None = None, reweight: bool = False,
               out: str | os.PathLike | None = None, overwrite: bool = False, batch_size: int | None = None,
               jacobian_chunk: int | None = None, inverse_radius: float = 0.1, inverse_iterations: int = 30,
               energy_platform: str = "Reference", progress: bool = False,
               anneal: AnnealSettings | None = None) -> dict[str, Any]:
        """Draw ``n`` conformations with ``steps`` map steps (1, 2, 4 or 10 as trained; for the VP map
        others are allowed but were not on the training grid unless they divide 64 or are below 32; the
        internal-coordinate sampler takes exactly its trained step counts, or 0 for its base alone).

        Returns a dict: ``positions`` (n, A, 3) nm (chirality folded), ``potential_energy`` (n,)
        kJ/mol, ``chirality_ok`` and ``reflected`` (n,), with ``reweight`` also ``log_weights``,
        ``weights`` (self-normalised, zero where excluded), ``log_det_jacobian``,
        ``log_base_density``, ``invertible``, ``inverse_status``, ``inverse_distance``,
        ``smallest_singular_value``;
        and ``attrs`` (counts, ESS, timings, settings). With ``out`` the same goes to HDF5.

        ``energy_platform``: OpenMM platform of the single-molecule energies. The default, Reference
        (double precision), is also the fastest for a molecule this small: about 28 µs per energy of
        alanine dipeptide on this project's 2-core CPU, against about 0.46 ms with the CPU platform,
        whose per-call overhead dominates (benchmarks/boltzmann.py, README).

        ``anneal`` (with ``reweight``): the exact annealed finish (:mod:`.anneal`): the map's samples
        go through targets with tempered bond and angle terms (or all terms, ``anneal.tempered``) with
        HMC moves under the real force field and AIS weights;
        the positions, energies and weights returned are the finished ones (``log_weights_map`` keeps
        the map's own), and ``attrs`` count the energy evaluations and time it took.
        """
        from tqdm.auto import tqdm

        from ..md.engine import EnergyEvaluator

        n, K = int(n), int(steps)
        if n < 1:
            raise InputError("--n must be >= 1")
        if K < (0 if self.kind == "internal" else 1):
            raise InputError("--steps must be >= 1 (0, the base alone, for the internal-coordinate sampler)")
        if out is not None and Path(out).exists() and not overwrite:
            raise InputError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")
        seed = random_seed() if seed is None else int(seed)
        if self.kind == "internal":
            return self._sample_internal(n, K, seed, reweight, out, batch_size, energy_platform, progress, anneal)
        on_gpu = self.device.type == "cuda"
        B = int(batch_size or (256 if reweight and on_gpu else 64 if reweight else 1024))
        chunk = int(jacobian_chunk or (64 if on_gpu else 4))
        A = self.system.n_atoms
        d = 3 * (A - 1)
        kT = self.system.kT_kj_mol
        model64 = copy.deepcopy(self.model).double().requires_grad_(False) if reweight else None
        fn = self._map_fn(model64, K) if reweight else None
        cols: dict[str, list[np.ndarray]] = {k: [] for k in (
            "positions", "log_det_jacobian", "log_base_density", "invertible", "inverse_status", "inverse_distance",
            "smallest_singular_value")}
        t_map = t_rew = 0.0
        bar = tqdm(total=n, disable=not progress, desc=f"sample-boltzmann K={K}", unit="conf", file=sys.stderr,
                   dynamic_ncols=True)
        t_start = time.perf_counter()
        for b, s0 in enumerate(range(0, n, B)):
            m = min(B, n - s0)
            rng = np.random.default_rng([seed, b])
            gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
            eta, L, eps = self._draw(m, K, gen)
            t0 = time.perf_counter()
            if not reweight:
                cols["positions"].append(self._positions(eta, L, eps, K))
                t_map += time.perf_counter() - t0
            else:
                e = eta.reshape(m, d)
                jac, v = jacobian_and_value(fn, e, L, eps, chunk=chunk)
                jac, v = jac.detach(), v.detach()
                lad, _ = logabsdet(jac)
                chk = invertibility_check(fn, e, v, jac, L, eps, radius=inverse_radius, generator=gen,
                                          n_iter=inverse_iterations)
                q = torch.as_tensor(self._q, dtype=torch.float64, device=v.device)
                y = torch.einsum("ai,bic->bac", q, v.reshape(m, A - 1, 3))
                cols["positions"].append((y * float(self.model.scale)).cpu().numpy())
                cols["log_det_jacobian"].append((lad + d * math.log(float(self.model.scale))).cpu().numpy())
                cols["log_base_density"].append(gaussian_log_density(e).cpu().numpy())
                cols["invertible"].append(chk["ok"].cpu().numpy())
                cols["inverse_status"].append(chk["status"].cpu().numpy())
                cols["inverse_distance"].append(chk["distance"].cpu().numpy())
                cols["smallest_singular_value"].append(chk["smallest_singular"].cpu().numpy())
                t_rew += time.perf_counter() - t0
            bar.update(m)
        bar.close()
        x = np.concatenate(cols["positions"])
        t0 = time.perf_counter()
        x, chir_ok, reflected = self.chirality.fold(x)
        energy = EnergyEvaluator(self.system, energy_platform)
        finite = np.isfinite(x).all(axis=(1, 2))
        U = np.full(n, np.nan)
        U[finite] = energy(x[finite])
        t_energy = time.perf_counter() - t0
        wall = time.perf_counter() - t_start
        res: dict[str, Any] = {"positions": x.astype(np.float32), "potential_energy": U, "chirality_ok": chir_ok,
                               "reflected": reflected}
        attrs: dict[str, Any] = {
            **self._common_attrs(n, K, seed, reweight, B, energy_platform),
            "eta": self.model.config.eta, "networks": self.model.config.networks,
            "wall_clock_s": wall, "wall_clock_map_s": t_map, "wall_clock_reweight_s": t_rew,
            "wall_clock_energy_s": t_energy, "n_reflected": int(reflected.sum()),
            "n_mixed_chirality": int((~chir_ok).sum()), "n_wrong_chirality": int(reflected.sum() + (~chir_ok).sum()),
            "n_nonfinite_energy": int((~np.isfinite(U)).sum()),
        }
        if reweight:
            for key in ("log_det_jacobian", "log_base_density", "invertible", "inverse_status", "inverse_distance",
                        "smallest_singular_value"):
                res[key] = np.concatenate(cols[key])
            inv = res["invertible"].astype(bool)
            log_w, keep = boltzmann_log_weights(U / kT, res["log_det_jacobian"], res["log_base_density"],
                                                chir_ok, inv)
            _weigh(self.system, res, attrs, x, log_w, keep, anneal, seed)
            st = res["inverse_status"]
            attrs.update(n_invertibility_failures=int((~inv).sum()),
                         n_singular_jacobian=int((st == INVERSE_SINGULAR).sum()),
                         n_inverse_other_preimage=int((st == INVERSE_OTHER_PREIMAGE).sum()),
                         n_inverse_not_converged=int((st == INVERSE_NOT_CONVERGED).sum()),
                         inverse_radius=float(inverse_radius), inverse_iterations=int(inverse_iterations),
                         jacobian="torch.func vmap(jacrev), float64")
        res["attrs"] = attrs
        if out is not None:
            write_samples(out, res)
        return res


def _weigh(system, res: dict[str, Any], attrs: dict[str, Any], x: np.ndarray, log_w: np.ndarray, keep: np.ndarray,
           anneal: AnnealSettings | None, seed: int) -> None:
    """Both samplers' last step with ``reweight``: the optional annealed finish (which replaces the
    positions, energies and weights, keeping the map's own as ``log_weights_map``), then the
    self-normalised weights and the ESS, written into ``res`` and ``attrs``. ``x``: the float64 positions
    (nm) the log-weights were computed at (``res`` holds them rounded to float32)."""
    n = len(log_w)
    if anneal is not None and anneal.n_temperatures > 0:
        t0 = time.perf_counter()
        res["log_weights_map"] = log_w
        attrs["ess_fraction_map"] = kish_ess(self_normalise(log_w, keep)) / n
        x, U, log_w, keep, info = _anneal_samples(system, x, res["potential_energy"], log_w, keep, anneal, seed)
        res.update(positions=x.astype(np.float32), potential_energy=U)
        attrs.update(anneal_json=json.dumps({**dataclasses.asdict(anneal), **info}),
                     wall_clock_anneal_s=time.perf_counter() - t0)
    w = self_normalise(log_w, keep)
    ess = kish_ess(w)
    res.update(log_weights=log_w, weights=w)
    attrs.update(ess=ess, ess_fraction=ess / n, n_weight_zero=int((~keep).sum()),
                 max_weight=float(w.max()) if w.size else 0.0)


def _anneal_samples(system, x: np.ndarray, U: np.ndarray, log_w: np.ndarray, keep: np.ndarray,
                    settings: AnnealSettings, seed: int):
    """The annealed finish of weighted samples (positions (n, A, 3) nm, energies kJ/mol, log weights
    for exp(-U/kT), keep mask) -> the same four after it, and the run's acceptance/ESS/cost."""
    me = MolecularEnergy(system, "Reference", settings.tempered)
    n = len(x)
    ok = keep & np.isfinite(U)
    log_q = np.where(ok, -(log_w + U / me.kT), 0.0)  # the map's log density where it is known
    flat = np.where(ok[:, None, None], x, system.positions_nm[None]).reshape(n, -1)
    r = anneal(flat, log_q, me, settings, inv_mass=me.inv_mass, rng=np.random.default_rng([seed, 19]), keep=ok)
    y = r.x.reshape(n, -1, 3)
    y = centre(y)  # back to centred positions (the moves translate freely)
    U_new = r.energies[0] * me.kT
    new_keep = ok & np.isfinite(r.log_weights)
    info = {"anneal_acceptance": r.acceptance.tolist(), "anneal_ess_fraction": r.ess_fraction.tolist(),
            "anneal_energy_evaluations_per_sample": r.n_evaluations}
    return np.where(ok[:, None, None], y, x), np.where(ok, U_new, U), r.log_weights, new_keep, info


def write_samples(path: str | os.PathLike, res: dict[str, Any]) -> Path:
    """Write a sample dict (:meth:`BoltzmannSampler.sample`) as conf.h5 (DESIGN.md section 9)."""
    import json

    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for key, val in res.items():
            if key == "attrs":
                continue
            arr = np.asarray(val)
            f.create_dataset(key, data=arr.astype(np.float32) if key == "positions" else arr)
        for key, val in res["attrs"].items():
            f.attrs[key] = json.dumps(val) if isinstance(val, (list, dict, tuple)) else val
    os.replace(tmp, path)
    return path
