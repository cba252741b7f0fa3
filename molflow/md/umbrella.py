"""Umbrella sampling along a backbone phi, unbiased by MBAR (issue 17).

Plain MD crosses alanine dipeptide's phi barrier into alpha_L (phi > 0) about twice per 100 ns and
stays from ~0.1 to several ns, so no 100-ns run pins that basin's population (two 100-ns references
of the same protocol: 0.01% and 3.8%; umbrella sampling: 2.65 +- 0.47%, README). Harmonic restraints
on phi at evenly spaced centres, each window sampled with stock OpenMM (LangevinMiddleIntegrator, the
system's force field, temperature, friction and step), give every phi region its samples; MBAR
weights then make the pooled frames a sample of the unbiased Boltzmann law of every coordinate
(phi, psi, positions), usable as a reference or as a weighted training target
(:func:`molflow.training.landscape_ibi.refine_landscape` ``data_weights``).

:func:`sample_phi_windows` runs the windows in two chains of neighbouring centres (one from
``start_deg`` upwards, one downwards), each window starting from the last one's state;
:func:`reduced_bias` and :func:`mbar_weights` unbias them. :func:`system_at_backbone_dihedrals`
gives a system whose start structure sits at a chosen (phi, psi), e.g. to record MD that starts in
alpha_L (the shipped map's drive data, systems/alanine_dipeptide/make_pretrained.py).
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import sys

import numpy as np


@dataclasses.dataclass
class UmbrellaSettings:
    """``windows`` restraint centres every 360 / windows deg, spring ``k_kj_mol_rad2``; each window
    ``equilibrate_ps`` (twice that for a chain's first) then ``production_ps`` with a frame every
    ``frame_fs``; chains start near ``start_deg``; ``workers`` processes (1 or 2 chains at once)."""

    windows: int = 36
    k_kj_mol_rad2: float = 200.0
    production_ps: float = 400.0
    equilibrate_ps: float = 10.0
    frame_fs: float = 100.0
    start_deg: float = -80.0
    seed: int = 20261207
    workers: int = 2
    platform: str = "Reference"


def _chain(args) -> list[dict]:
    """Sample the windows ``centres`` (rad) of ``system_name``'s central phi in order, each starting
    from the last one's state: per window its centre, phi, psi (rad) and positions (nm, float32)."""
    system_name, centres, s, seed, verbose = args
    import openmm
    from openmm import unit

    from ..evaluation.dihedrals import phi_psi
    from ..systems import load_system

    mol = load_system(system_name)
    system = mol.create_system()
    phi_q, _ = mol.central_dihedrals()
    bias = openmm.CustomTorsionForce("0.5*k_umb*dt^2; dt = min(ad, 2*pi - ad); ad = abs(theta - theta0); "
                                     "pi = 3.141592653589793")
    bias.addGlobalParameter("k_umb", float(s.k_kj_mol_rad2))
    bias.addGlobalParameter("theta0", float(centres[0]))
    bias.addTorsion(*[int(i) for i in np.asarray(phi_q).ravel()[:4]], [])
    system.addForce(bias)
    integ = openmm.LangevinMiddleIntegrator(mol.temperature_K, mol.friction_per_ps, mol.timestep_fs / 1000.0)
    integ.setRandomNumberSeed(int(seed))
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(s.platform))
    ctx.setPositions(mol.positions_nm * unit.nanometer)
    ctx.setVelocitiesToTemperature(mol.temperature_K, int(seed))
    per_frame = int(round(s.frame_fs / mol.timestep_fs))
    n_frames = int(round(s.production_ps * 1000.0 / s.frame_fs))
    out = []
    for i, c in enumerate(centres):
        ctx.setParameter("theta0", float(c))
        integ.step(int(round((s.equilibrate_ps * (2 if i == 0 else 1)) * 1000.0 / mol.timestep_fs)))
        x = np.empty((n_frames, mol.n_atoms, 3))
        for f in range(n_frames):
            integ.step(per_frame)
            x[f] = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        phi, psi = phi_psi(x, mol)
        out.append({"centre_rad": float(c), "phi": np.asarray(phi).ravel(), "psi": np.asarray(psi).ravel(),
                    "positions": x.astype(np.float32)})
        if verbose:
            print(f"window {np.degrees(c):7.1f} deg: phi mean "
                  f"{np.degrees(np.angle(np.exp(1j * out[-1]['phi']).mean())):7.1f}", file=sys.stderr, flush=True)
    return out


def sample_phi_windows(system_name: str = "alanine_dipeptide", settings: UmbrellaSettings | None = None,
                       verbose: bool = True) -> dict[str, np.ndarray]:
    """Run the umbrella windows (module docstring). Returns pooled arrays: ``centres`` (K,) rad,
    ``window`` (n,) index, ``phi``, ``psi`` (n,) rad, ``positions`` (n, A, 3) nm float32, ``k`` (the
    spring, kJ/mol/rad^2), and ``weight`` (n,), the MBAR weights (normalised) at the system's kT."""
    from ..systems import load_system

    s = settings or UmbrellaSettings()
    if s.windows < 2 or s.k_kj_mol_rad2 <= 0 or s.production_ps <= 0:
        from ..errors import InputError

        raise InputError("umbrella sampling needs at least 2 windows, a positive spring and production time")
    step = 2 * np.pi / s.windows
    centres = (np.arange(s.windows) * step + np.pi) % (2 * np.pi) - np.pi
    start = int(np.argmin(np.abs(centres - np.radians(s.start_deg))))
    half = s.windows // 2
    up = [centres[(start + i) % s.windows] for i in range(half)]
    down = [centres[(start - 1 - i) % s.windows] for i in range(s.windows - half)]
    jobs = [(system_name, up, s, s.seed, verbose), (system_name, down, s, s.seed + 1, verbose)]
    if s.workers > 1:
        with mp.get_context("spawn").Pool(2) as pool:
            chains = pool.map(_chain, jobs)
    else:
        chains = [_chain(j) for j in jobs]
    windows = sorted([w for c in chains for w in c], key=lambda w: w["centre_rad"])
    out = {"centres": np.array([w["centre_rad"] for w in windows]),
           "window": np.repeat(np.arange(len(windows)), [len(w["phi"]) for w in windows]),
           "phi": np.concatenate([w["phi"] for w in windows]), "psi": np.concatenate([w["psi"] for w in windows]),
           "positions": np.concatenate([w["positions"] for w in windows]), "k": np.array(s.k_kj_mol_rad2)}
    kT = load_system(system_name).kT_kj_mol
    n_k = np.bincount(out["window"], minlength=len(windows)).astype(float)
    out["weight"] = mbar_weights(reduced_bias(out["phi"], out["centres"], s.k_kj_mol_rad2, kT), n_k)
    return out


def reduced_bias(phi: np.ndarray, centres: np.ndarray, k: float, kT: float) -> np.ndarray:
    """u_kn (K, n): each window's bias energy in kT at every frame's phi (rad), spring k
    (kJ/mol/rad^2), kT (kJ/mol); the angle distance is the shorter way round."""
    d = np.abs(np.asarray(phi)[None, :] - np.asarray(centres)[:, None]) % (2 * np.pi)
    d = np.minimum(d, 2 * np.pi - d)
    return 0.5 * k * d * d / kT


def mbar_weights(u: np.ndarray, n_k: np.ndarray) -> np.ndarray:
    """Normalised unbiased weights (n,) of the pooled frames of K biased windows: u (K, n) reduced bias
    energies, n_k (K,) frames per window. The window free energies f_k minimise MBAR's convex objective
    sum_n log sum_k N_k exp(f_k - u_kn) - sum_k N_k f_k (f_0 = 0; L-BFGS with its exact gradient), and
    every frame weighs 1 / sum_k N_k exp(f_k - u_kn)."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    log_n = np.log(n_k)

    def objective(f_rest):
        f = np.concatenate([[0.0], f_rest])
        a = log_n[:, None] + f[:, None] - u
        lse = logsumexp(a, axis=0)
        grad = np.exp(a - lse[None, :]).sum(1) - n_k
        return lse.sum() - float(n_k @ f), grad[1:]

    res = minimize(objective, np.zeros(len(n_k) - 1), jac=True, method="L-BFGS-B",
                   options={"maxiter": 5000, "gtol": 1e-8 * float(n_k.sum())})
    f = np.concatenate([[0.0], res.x])
    log_w = -logsumexp(log_n[:, None] + f[:, None] - u, axis=0)
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def system_at_backbone_dihedrals(system, phi_rad: float, psi_rad: float):
    """``system`` (a :class:`molflow.systems.System`, one residue with a backbone phi and psi) with its
    start structure turned strain-free about its backbone bonds to (``phi_rad``, ``psi_rad``): the
    rigid-body turn of the torsion drive (molflow.models.torsion_drive), every bond length and angle
    kept. The force field and fingerprint are unchanged (only the start differs), so
    ``molflow.simulate(system_at_backbone_dihedrals(mol, 1.0, 0.6), ...)`` records MD started in
    alpha_L."""
    import dataclasses

    import torch

    from ..errors import InputError
    from ..models.torsion_drive import build_torsion_drive, dihedral_and_gradient

    drive = build_torsion_drive(system, 3, 8).double()
    if drive.quads.shape[0] != 2:
        raise InputError(f"{system.name}: need exactly one backbone phi and psi, found {drive.quads.shape[0]} torsions")
    x = torch.as_tensor(system.positions_nm[None], dtype=torch.float64)
    delta = torch.tensor([[phi_rad, psi_rad]], dtype=torch.float64) - dihedral_and_gradient(x, drive.quads)[0]
    x, _ = drive.turn(x, torch.zeros_like(x), delta, torch.as_tensor(system.masses_amu, dtype=torch.float64))
    return dataclasses.replace(system, positions_nm=x[0].numpy())
