"""The annealed (AIS + HMC) finish of the Boltzmann sampler (molflow/boltzmann/anneal.py, issue 19).

Toy: ``stiff_toy(24, 20)`` (a bimodal coordinate, 3 soft ones and 20 stiff ones of std 0.02, the
shape of a molecule's torsion and bonds) against an exactly sampled proposal whose stiff
coordinates are 1.5x too wide and whose mode weights are tilted — a map with strained bonds.
Tolerances: the weighted estimates' delta-method SE (test_boltzmann.py's docstring: |error| < 4 SE
fails by chance with probability ~6e-5 per check); AIS is unbiased for the normalising-constant
ratio, here 1 (both densities normalised), so mean(w) is within 4 of its standard errors of 1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from molflow.boltzmann.anneal import AnnealSettings, anneal
from molflow.boltzmann.toy import GaussianMixture, stiff_toy

D, S = 24, 20


def _setup():
    target = stiff_toy(D, S)
    stiff = np.zeros(D, bool)
    stiff[D - S:] = True

    def energy(x):  # U = -log pi (normalised), V = the stiff coordinates' quadratic energy
        t = torch.as_tensor(x).requires_grad_(True)
        u = target.energy(t)
        (g,) = torch.autograd.grad(u.sum(), t)
        v = 0.5 * ((x[:, stiff] / 0.02) ** 2).sum(-1)
        gv = np.zeros_like(x)
        gv[:, stiff] = x[:, stiff] / 0.02 ** 2
        return u.detach().numpy(), g.numpy(), v, gv

    s = target.s.numpy().copy()
    s[:, stiff] *= 1.5
    proposal = GaussianMixture(target.w.numpy() * np.array([1.3, 0.7]), target.mu.numpy(), s)
    return target, proposal, energy, target.s.numpy().min(0) ** 2


@pytest.mark.parametrize("seed", [1, 2])
def test_annealed_weights_are_exact_and_ess_rises_with_the_temperatures(seed):
    target, proposal, energy, inv_mass = _setup()
    exact = target.moments()
    x = proposal.sample(2000, np.random.default_rng(seed))
    log_q = proposal.log_density(torch.as_tensor(x)).numpy()
    ess = []
    for J in (0, 8, 32):  # 0: plain importance sampling (beta_start is then unused)
        r = anneal(x, log_q, energy, AnnealSettings(J, 0.44, 1, 5, 0.3), inv_mass=inv_mass,
                   rng=np.random.default_rng(seed))
        w_raw = np.exp(r.log_weights)
        assert abs(w_raw.mean() - 1.0) < 4 * w_raw.std() / np.sqrt(len(w_raw)), (J, w_raw.mean())
        w = w_raw / w_raw.sum()
        for name, f in (("mean_x1", r.x[:, 0]), ("second_moment_x1", r.x[:, 0] ** 2),
                        ("p_x1_positive", (r.x[:, 0] > 0) * 1.0)):
            est = float((w * f).sum())
            se = float(np.sqrt((w * w * (f - est) ** 2).sum()))
            assert abs(est - exact[name]) < 4 * se, (J, name, est, exact[name], se)
        ess.append(r.ess_fraction[-1])
        if J:
            assert r.n_evaluations == 1 + 5 * J and len(r.acceptance) == J and (r.acceptance > 0.8).all()
    # measured 0.03 / 0.40 / 0.75 (seed 1) and 0.04 / 0.44 / 0.75 (seed 2)
    assert ess[0] < 0.1 and ess[1] > 3 * ess[0] and ess[2] > ess[1] and ess[2] > 0.5, ess


def test_no_temperatures_is_plain_importance_sampling():
    target, proposal, energy, inv_mass = _setup()
    x = proposal.sample(100, np.random.default_rng(0))
    log_q = proposal.log_density(torch.as_tensor(x)).numpy()
    r = anneal(x, log_q, energy, AnnealSettings(0), inv_mass=inv_mass)
    np.testing.assert_allclose(r.log_weights, -energy(x)[0] - log_q, rtol=1e-12)
    np.testing.assert_array_equal(r.x, x)
    keep = np.arange(100) % 2 == 0
    assert np.isneginf(anneal(x, log_q, energy, AnnealSettings(4, 0.5), inv_mass=inv_mass, keep=keep).log_weights[~keep]).all()


def test_molecular_energy_is_the_force_field_in_kT_with_consistent_hmc_units(ala2):
    """On alanine dipeptide: gradients are finite differences of U/kT and of the bonded V/kT (Reference
    platform, double precision); an HMC move of 10 leapfrog steps of 0.5 fs from the minimised
    structure nearly conserves the energy (acceptance > 0.7) and moves each atom by about its thermal
    velocity times 5 fs (RMS within a factor 2: Maxwell momenta, so a wrong kT or mass scaling would
    be off by sqrt(kT) ~ 1.6 or sqrt(m) ~ 3.5)."""
    from molflow.boltzmann.anneal import MolecularEnergy, hmc_move

    me = MolecularEnergy(ala2)
    x = ala2.positions_nm.reshape(1, -1).astype(np.float64)
    u, gu, v, gv = me(x)
    for k in (5, 17, 40):
        d = np.zeros_like(x)
        d[0, k] = 1e-6
        (up, _, vp, _), (um, _, vm, _) = me(x + d), me(x - d)
        assert (up - um)[0] / 2e-6 == pytest.approx(gu[0, k], rel=1e-4, abs=1e-3)
        assert (vp - vm)[0] / 2e-6 == pytest.approx(gv[0, k], rel=1e-4, abs=1e-3)
    xs = np.repeat(x, 64, 0)
    e = me(xs)
    y, _, acc = hmc_move(xs, e, me, 1.0, 0.0005, 10, me.inv_mass, np.random.default_rng(0))
    assert acc.mean() > 0.7  # measured 0.89 (the PDB structure is strained; leapfrog's energy error ~ h^2)
    moved = np.sqrt(((y - xs).reshape(64, -1, 3) ** 2).sum(-1).mean(0))  # RMS per atom, nm
    expected = np.sqrt(3 * me.inv_mass.reshape(-1, 3)[:, 0]) * 0.005  # sqrt(3 kT/m) * 5 fs
    ratio = moved / expected
    assert 0.5 < np.median(ratio) < 2.0, ratio


def test_sampler_with_the_annealed_finish(tmp_path):
    """The sampler's finish keeps the map's weights (log_weights_map), counts its cost, returns centred
    positions with their force-field energies, and the CLI refuses --anneal without --reweight."""
    import h5py

    from molflow.cli import main
    from molflow.md.engine import EnergyEvaluator
    from molflow.systems import load_system

    run = tmp_path / "run.h5"
    import molflow

    molflow.simulate("alanine_dipeptide", run, replicas=1, time_ps=2.0, frame_fs=100.0, n_coefficients=0,
                     seed=3, progress=False).close()
    bg = tmp_path / "bg.pt"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("kind: vp\nn_features: 8\nn_layers: 1\nn_rbf: 4\nbatch_size: 8\n")
    assert main(["--quiet", "train-boltzmann", "alanine_dipeptide", "--data", str(run), "--out", str(bg),
                 "--steps", "4", "--seed", "1", "--config", str(cfg)]) == 0
    out = tmp_path / "conf.h5"
    assert main(["--quiet", "sample-boltzmann", str(bg), "--n", "4", "--steps", "1", "--out", str(out), "--reweight",
                 "--seed", "2", "--anneal", "2", "--anneal-leapfrog", "3"]) == 0
    with h5py.File(out, "r") as f:
        x, U, a = f["positions"][:], f["potential_energy"][:], dict(f.attrs)
        assert "log_weights_map" in f and "anneal_json" in a and a["wall_clock_anneal_s"] >= 0
    import json

    info = json.loads(a["anneal_json"])
    assert info["anneal_energy_evaluations_per_sample"] == 1 + 2 * 3 and len(info["anneal_acceptance"]) == 2
    np.testing.assert_allclose(x.mean(1), 0.0, atol=1e-5)
    ok = np.isfinite(U) & (np.abs(U) < 1e6)
    np.testing.assert_allclose(U[ok], EnergyEvaluator(load_system("alanine_dipeptide"), "Reference")(x[ok].astype(np.float64)),
                               rtol=1e-3, atol=0.05)
    assert main(["--quiet", "sample-boltzmann", str(bg), "--n", "4", "--out", str(tmp_path / "c.h5"),
                 "--anneal", "2"]) != 0
