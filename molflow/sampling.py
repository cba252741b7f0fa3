"""Few-step sampling with a trained flow map.

    >>> fm = molflow.FlowMap.load("model.pt")
    >>> out = fm.sample(initial_states, n_jumps=100, tau_ps=1.0, replicas=64, seed=1)

Modes: ``sample`` (fresh latent every jump: rollouts exact in law where the model is) and ``mean``
(the latent averaged out over ``n_mean`` draws: the best pathwise estimate). Free-running rollouts
draw fresh path coefficients every jump from the exact law of the engine's discrete path
(tau/timestep steps); pass ``brownian`` (R, K, N, A, 3) to feed recorded coefficients instead.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .brownian import sample_coefficients
from .errors import InputError
from .models.molecular import MapConfig, MolecularFlowMap, atom_features
from .systems import MolecularSystem, load_system, system_from_pdb_text
from .training.checkpoint import load_checkpoint


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: torch sees no CUDA GPU here")
    return dev


def build_model(system: MolecularSystem, config: MapConfig) -> MolecularFlowMap:
    scal, edges = atom_features(system)
    return MolecularFlowMap(scal, edges, system.masses_amu, system.kT_kj_mol, system.friction_per_ps, config)


class FlowMap:
    """A trained molecular flow map with its system, ready to jump and sample."""

    def __init__(self, model: MolecularFlowMap, system: MolecularSystem, h0_ps: float,
                 metadata: dict[str, Any] | None = None):
        self.model = model.eval()
        self.system = system
        self.h0_ps = float(h0_ps)
        self.metadata = metadata or {}

    @property
    def device(self) -> torch.device:
        return self.model.v_th.device

    @property
    def n_coefficients(self) -> int:
        return self.model.config.n_coefficients

    @classmethod
    def load(cls, path: str | os.PathLike, system: str | MolecularSystem | None = None,
             device: str = "auto", weights: str = "ema") -> "FlowMap":
        """Load a checkpoint (safely). With ``system`` given, refuse a checkpoint made for another."""
        ck = load_checkpoint(path)
        s = ck["system_json"]
        mol = system_from_pdb_text(s["pdb"], s["forcefield"], s["temperature_K"], s["friction_per_ps"],
                                   s["timestep_fs"], s["name"])
        if system is not None:
            other = system if isinstance(system, MolecularSystem) else load_system(system)
            if other.fingerprint != s["fingerprint"]:
                raise InputError(f"{path} was trained for system {s['name']!r} (fingerprint {s['fingerprint']}), "
                                 f"not {other.name!r} (fingerprint {other.fingerprint}): atoms, bonds, force "
                                 "field or Langevin settings differ")
        model = build_model(mol, MapConfig(**ck["map_config_json"]))
        try:
            model.load_state_dict(ck[weights])
        except (KeyError, RuntimeError) as exc:
            raise InputError(f"{path}: model weights do not fit the recorded architecture ({exc})") from None
        dev = resolve_device(device)
        return cls(model.to(dev), mol, ck["h0_ps"], {"path": str(path), "step": ck.get("step"),
                                                      "fingerprint": s["fingerprint"],
                                                      "train_config": ck.get("train_config_json")})

    @torch.no_grad()
    def jump(self, x: torch.Tensor, v: torch.Tensor, L: torch.Tensor, tau_ps: float | torch.Tensor,
             mode: str = "sample", generator: torch.Generator | None = None, n_mean: int = 16):
        """One jump of ``tau_ps`` for a batch: x, v (B,A,3), L (B,N,A,3) -> (x_t, v_t)."""
        B = x.shape[0]
        tau = torch.as_tensor(tau_ps, dtype=x.dtype, device=x.device).expand(B).clone()
        if mode == "sample":
            return self.model(x, v, L, self.model.sample_latent(B, generator).to(x.dtype), tau)
        if mode == "mean":
            xs, vs = torch.zeros_like(x), torch.zeros_like(v)
            for _ in range(n_mean):
                xt, vt = self.model(x, v, L, self.model.sample_latent(B, generator).to(x.dtype), tau)
                xs += xt / n_mean
                vs += vt / n_mean
            return xs, vs
        raise InputError(f"mode must be 'sample' or 'mean', not {mode!r}")

    def sample(self, initial_states: tuple[np.ndarray, np.ndarray], n_jumps: int, tau_ps: float,
               replicas: int | None = None, seed: int | None = None, mode: str = "sample",
               brownian: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Roll out ``n_jumps`` jumps of ``tau_ps`` from ``initial_states`` = (x, v), each (S, A, 3).

        ``replicas`` rollouts start from the states spread evenly (default: one per state).
        Returns positions/velocities (R, K+1, A, 3) and brownian (R, K, N, A, 3) (sqrt(ps)).
        """
        x0, v0 = (np.asarray(a, dtype=np.float64) for a in initial_states)
        if x0.ndim == 2:
            x0, v0 = x0[None], v0[None]
        R = int(replicas or len(x0))
        pick = np.linspace(0, len(x0) - 1, R).round().astype(int)
        rng = np.random.default_rng(seed)
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        dt_ps = self.system.timestep_fs / 1000.0
        steps = tau_ps / dt_ps
        if abs(steps - round(steps)) > 1e-6:
            raise InputError(f"tau {tau_ps} ps is not a whole number of {dt_ps} ps timesteps")
        N, A = self.n_coefficients, self.system.n_atoms
        if brownian is not None and brownian.shape[:3] != (R, n_jumps, N):
            raise InputError(f"brownian must have shape ({R}, {n_jumps}, {N}, {A}, 3), not {brownian.shape}")
        dtype = torch.float32
        x = torch.as_tensor(x0[pick], dtype=dtype, device=self.device)
        v = torch.as_tensor(v0[pick], dtype=dtype, device=self.device)
        xs, vs, Ls = [x.cpu().numpy()], [v.cpu().numpy()], []
        for k in range(n_jumps):
            if brownian is None:
                L = np.moveaxis(sample_coefficients(rng, N, tau_ps, (R, A, 3), n_steps=int(round(steps)),
                                                    dt_ps=dt_ps), 0, 1)
            else:
                L = brownian[:, k]
            Ls.append(L.astype(np.float32))
            x, v = self.jump(x, v, torch.as_tensor(L, dtype=dtype, device=self.device), tau_ps, mode, gen)
            xs.append(x.cpu().numpy())
            vs.append(v.cpu().numpy())
        return {"positions": np.stack(xs, 1), "velocities": np.stack(vs, 1),
                "brownian": np.stack(Ls, 1) if Ls else np.zeros((R, 0, N, A, 3), np.float32)}
