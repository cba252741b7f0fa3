"""The few-step Boltzmann sampler (#5): exact weights, Jacobians, chirality, CLI and evaluator.

Statistical checks derive their tolerance from the run: a self-normalised importance-sampling
estimate f̂ = Σ w_i f_i (Σ w = 1) has the delta-method standard error SE = sqrt(Σ w_i² (f_i - f̂)²);
with finite-variance weights (the toy maps below are built so: η = 0.1 keeps the path-conditional
spread above half the target's, and the wrong mixtures are wider than the true one) f̂ is
asymptotically normal, so |f̂ - f| < 4 SE fails by chance with probability ~6e-5 per check (seeds
are fixed, so a pass is reproducible).
"""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

import molflow
from molflow.boltzmann.geometry import ChiralityChecker, centre_free_basis, stereocentres
from molflow.boltzmann.model import BoltzmannConfig, VPSchedule
from molflow.boltzmann.reweight import (INVERSE_OTHER_PREIMAGE, boltzmann_log_weights, gaussian_log_density, invertibility_check,
                                        jacobian_and_value, kish_ess, logabsdet, self_normalise)
from molflow.boltzmann.toy import double_well_2d, draw_path, toy_map
from molflow.cli import EXIT_INPUT, main

TINY = {"kind": "vp", "n_features": 8, "n_layers": 1, "n_rbf": 4, "batch_size": 8}


# ------------------------------------------------------------------------------ the SDE's steps
def test_step_coefficients_are_the_exact_frozen_denoiser_step():
    """Φ, κ equal the DDIM(η) closed form; projection + remainder carry exactly the noise variance
    σ_b²(1 - e^{-2η²Λh}); a zero-length step is the identity."""
    s = VPSchedule()
    ta = torch.tensor([0.0, 0.3, 0.9, 0.5], dtype=torch.float64)
    tb = torch.tensor([1.0, 0.55, 0.9 + 1 / 64, 0.5], dtype=torch.float64)
    h = tb - ta
    k = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    for eta in (1.0, 0.1, 0.0):
        c = s.step_coefficients(ta, tb, 3, eta)
        var = s.sigma(tb) ** 2 * -torch.expm1(-2 * eta**2 * s.Lambda * h)
        assert torch.allclose((c["c"] ** 2 * h[:, None] / k).sum(1) + c["r"] ** 2, var, rtol=1e-9, atol=1e-15)
        keep = torch.sqrt(s.sigma(tb) ** 2 - var)  # DDIM: y_b = α_b D + sqrt(σ_b² - c²) ε̂ + c z
        assert torch.allclose(c["phi"], keep / s.sigma(ta), rtol=1e-9)
        assert torch.allclose(c["kappa"], s.alpha(tb) - keep * s.alpha(ta) / s.sigma(ta), rtol=1e-9, atol=1e-15)
        assert c["phi"][3] == 1.0 and c["kappa"][3] == 0.0 and c["r"][3] == 0.0


# ------------------------------------------------------------------------------ weights on a toy
def _weighted(fn, target, M, K, eta, seed):
    g = torch.Generator().manual_seed(seed)
    z, L, e = draw_path(M, K, 3, target.dim, g)
    jac, x = jacobian_and_value(fn, z, L, e)
    lad, _ = logabsdet(jac)
    lw, keep = boltzmann_log_weights(target.energy(x).numpy(), lad.numpy(), gaussian_log_density(z).numpy())
    return x.numpy(), self_normalise(lw, keep)


def test_weighted_estimates_are_exact_for_wrong_maps_and_ess_falls():
    """2-D double-well mixture (exact moments): the 16-step SDE map (η = 0.1, fresh Brownian path
    per sample) built on the true denoiser and on deliberately wrong ones — unweighted estimates are
    off by many standard errors, weighted ones agree with the exact values within 4 SE at two sample
    sizes (SE shrinking like 1/sqrt(M)), and the ESS falls as the map gets worse."""
    target = double_well_2d()
    exact = target.moments()
    K, eta = 16, 0.1
    ess = []
    for delta in (0.0, 0.6, 1.2):
        fn = toy_map(target.perturbed(delta), K, eta)
        ses = []
        for M, seed in ((2000, 1), (8000, 2)):
            x, w = _weighted(fn, target, M, K, eta, seed)
            obs = {"mean_x1": x[:, 0], "second_moment_x1": x[:, 0] ** 2, "p_x1_positive": (x[:, 0] > 0) * 1.0}
            for name, f in obs.items():
                est = float((w * f).sum())
                se = float(np.sqrt((w * w * (f - est) ** 2).sum()))
                assert abs(est - exact[name]) < 4 * se, (delta, M, name, est, exact[name], se)
                ses.append(se)
            if M == 8000:
                ess.append(kish_ess(w) / M)
                if delta > 0:  # the map is wrong: without weights the estimate is far off
                    f = x[:, 0] ** 2
                    assert abs(f.mean() - exact["second_moment_x1"]) > 10 * f.std() / math.sqrt(M)
        assert np.mean(ses[3:]) < 0.75 * np.mean(ses[:3])  # 4x the samples: SE about halves
    assert ess[0] > ess[1] > ess[2] and ess[0] > 0.3, ess


def test_invertibility_check_finds_a_fold():
    """A map folded onto itself (z1 -> z1², preimages ±z1) fails the fixed-point inverse where a
    start 0.5 away can reach the other preimage (|z1| < 0.5), and only there; an injective map
    (z + 0.5 tanh z) never fails."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 2, generator=g, dtype=torch.float64)

    def fold(v):
        return torch.stack([v[0] ** 2, v[1]])

    def bijection(v):
        return v + 0.5 * torch.tanh(v)

    out = {}
    for name, fn in (("fold", fold), ("bijection", bijection)):
        jac, x = jacobian_and_value(fn, z)
        out[name] = invertibility_check(fn, z, x, jac, radius=0.5, generator=torch.Generator().manual_seed(1))
    assert bool(out["bijection"]["ok"].all())
    bad = ~out["fold"]["ok"]
    assert bool((z[bad, 0].abs() < 0.5).all())  # no false alarm away from the fold
    near = z[:, 0].abs() < 0.25
    assert int(bad[near].sum()) > 0.5 * int(near.sum()) > 0  # most starts that straddle the fold are caught
    found = out["fold"]["status"][bad] == INVERSE_OTHER_PREIMAGE  # ... as proven folds: the other preimage -z1
    assert float(found.double().mean()) > 0.5


# ------------------------------------------------------------------------------ the molecular map
@pytest.fixture(scope="module")
def tiny_map(ala2):
    from molflow.boltzmann.training import build_map

    torch.manual_seed(0)
    cfg = BoltzmannConfig(n_features=8, n_layers=1, n_rbf=4, eta=0.3)  # η large: the path matters
    return build_map(ala2, 0.17, cfg).double().eval().requires_grad_(False)


def _molecule_fn(model, K):
    A = model.n_atoms
    q = torch.as_tensor(centre_free_basis(A))
    grid = torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64)
    coeffs = model.grid_coefficients(grid)

    def fn(eta, L, eps):
        y = model.run((q @ eta.reshape(A - 1, 3)).unsqueeze(0), [(L[k:k + 1], eps[k:k + 1]) for k in range(K)],
                      grid, coeffs)
        return (q.T @ y[0]).reshape(-1)

    return fn


def _molecule_path(model, B, K, seed):
    g = torch.Generator().manual_seed(seed)
    A, c = model.n_atoms, model.config
    eta = torch.randn(B, 3 * (A - 1), generator=g, dtype=torch.float64)
    L = torch.randn(B, K, c.n_coefficients, A, 3, generator=g, dtype=torch.float64) * 0.3
    eps = torch.randn(B, K, c.n_latent, A, 3, generator=g, dtype=torch.float64)
    return eta, L, eps


def test_jacobian_logdet_matches_finite_differences(tiny_map):
    """torch.func's Jacobian of the 2-step map (63 x 63, centre-free coordinates, float64) equals
    central differences (step 1e-5: truncation ~1e-10 relative, rounding ~1e-11/1e-5), and so do
    their log-determinants."""
    K = 2
    fn = _molecule_fn(tiny_map, K)
    eta, L, eps = _molecule_path(tiny_map, 2, K, 3)
    jac, _ = jacobian_and_value(fn, eta, L, eps)
    lad, smin = logabsdet(jac)
    h = 1e-5
    for b in range(2):
        cols = []
        with torch.no_grad():
            for i in range(eta.shape[1]):
                d = torch.zeros_like(eta[b])
                d[i] = h
                cols.append((fn(eta[b] + d, L[b], eps[b]) - fn(eta[b] - d, L[b], eps[b])) / (2 * h))
        fd = torch.stack(cols, 1)
        assert torch.allclose(jac[b], fd, rtol=1e-5, atol=1e-7 * float(fd.abs().max()))
        assert abs(float(torch.linalg.slogdet(fd)[1]) - float(lad[b])) < 1e-4
    assert bool((smin > 0).all())


def test_map_is_mirror_equivariant(tiny_map):
    """Reflecting the base noise and the path reflects the output and keeps log|det J|: the model
    density is mirror-symmetric, which is what makes reflecting mirror images back exact (§9)."""
    K = 2
    fn = _molecule_fn(tiny_map, K)
    eta, L, eps = _molecule_path(tiny_map, 2, K, 5)
    m = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)  # a mirror plane
    eta_m = (eta.reshape(2, -1, 3) * m).reshape(2, -1)
    j1, x1 = jacobian_and_value(fn, eta, L, eps)
    j2, x2 = jacobian_and_value(fn, eta_m, L * m, eps * m)
    assert torch.allclose((x1.reshape(2, -1, 3) * m).reshape(2, -1), x2, atol=1e-10)
    assert torch.allclose(logabsdet(j1)[0], logabsdet(j2)[0], atol=1e-8)


# ------------------------------------------------------------------------------ chirality
def test_stereocentres_from_topology(ala2):
    tri = molflow.load_system("trialanine")
    assert [c for c, _ in stereocentres(ala2.elements, ala2.bonds)] == [8]  # the CA
    assert [c for c, _ in stereocentres(tri.elements, tri.bonds)] == [8, 18, 28]


def test_mirror_image_is_reflected_back_and_mixed_gets_weight_zero():
    tri = molflow.load_system("trialanine")
    chk = ChiralityChecker.for_system(tri)
    x = tri.positions_nm
    mirror = x * np.array([1.0, -1.0, 1.0])
    mixed = x.copy()
    ha, cb = 19, 20  # residue 2's HA and CB: swapping two substituents inverts that centre only
    assert tri.elements[ha] == "H" and tri.elements[cb] == "C"
    mixed[[ha, cb]] = mixed[[cb, ha]]
    batch = np.stack([x, mirror, mixed])
    assert chk.classify(batch).tolist() == [1, -1, 0]
    folded, ok, reflected = chk.fold(batch)
    assert ok.tolist() == [True, True, False] and reflected.tolist() == [False, True, False]
    assert chk.classify(folded[1]) == 1
    d = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731 (an isometry keeps distances)
    assert np.allclose(d(folded[1]), d(x))
    lw, keep = boltzmann_log_weights(np.zeros(3), np.zeros(3), np.zeros(3), ok)
    w = self_normalise(lw, keep)
    assert w.tolist() == [0.5, 0.5, 0.0] and not np.isfinite(lw[2])


# ------------------------------------------------------------------------------ CLI, Python, evaluator
@pytest.fixture(scope="module")
def trained(small_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("bg")
    cfg = d / "tiny.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in TINY.items()))
    out = d / "bg.pt"
    assert main(["--quiet", "train-boltzmann", "alanine_dipeptide", "--data", str(small_run), "--out", str(out),
                 "--steps", "4", "--seed", "1", "--config", str(cfg)]) == 0
    return out


def test_cli_sample_and_evaluate(trained, small_run, tmp_path, capsys):
    conf = tmp_path / "conf.h5"
    assert main(["sample-boltzmann", str(trained), "--n", "6", "--steps", "2", "--out", str(conf), "--reweight",
                 "--seed", "3"]) == 0
    assert "ESS" in capsys.readouterr().out
    with h5py.File(conf, "r") as f:
        assert f["positions"].shape == (6, 22, 3) and f["positions"].dtype == np.float32
        for key in ("potential_energy", "log_weights", "weights", "chirality_ok"):
            assert f[key].shape == (6,)
        a = dict(f.attrs)
        w = f["weights"][:].astype(np.float64)
        lw = f["log_weights"][:].astype(np.float64)
        assert np.all(w[~f["chirality_ok"][:]] == 0)
        x = f["positions"][:]
    # the weights are exactly the self-normalised exp(log_weights), zero where the log-weight is -inf
    # (excluded); float32 storage: relative 1e-6
    kept = np.isfinite(lw)
    expect = np.zeros(6)
    if kept.any():
        expect[kept] = np.exp(lw[kept] - lw[kept].max())
        expect /= expect.sum()
    np.testing.assert_allclose(w, expect, rtol=1e-6, atol=1e-12)
    assert a["n_weight_zero"] == int((~kept).sum())
    for key in ("ess", "ess_fraction", "n_invertibility_failures", "n_wrong_chirality", "temperature_K",
                "wall_clock_s", "hardware", "pdb"):
        assert key in a
    assert a["kind"] == "boltzmann_samples" and a["seed"] == 3 and a["steps"] == 2
    assert np.allclose(x.mean(1), 0.0, atol=1e-5)  # centred
    report = tmp_path / "report"
    assert main(["--quiet", "evaluate", "--reference", str(small_run), "--samples", str(conf),
                 "--report", str(report)]) == 0
    m = json.loads((report / "metrics.json").read_text())
    assert m["kind"] == "iid_samples"
    # JS against the judge replicas J (small_run: 3 replicas, H = replica 0, J = replicas 1, 2), as scipy
    # computes it on the same 64 x 64 grid (scipy returns the square root)
    from scipy.spatial.distance import jensenshannon

    from molflow.evaluation import phi_psi

    ala = molflow.load_system("alanine_dipeptide")
    with molflow.Trajectory(small_run) as t:
        ref_angles = phi_psi(np.asarray(t.positions[1:], dtype=np.float64), ala)
    edges = np.linspace(-np.pi, np.pi, 65)
    hist = lambda ang: np.histogram2d(ang[0].ravel(), ang[1].ravel(), bins=[edges, edges])[0].ravel()  # noqa: E731
    assert m["reference_split"]["judge"]["n_replicas"] == 2
    assert m["stationary"]["js_phi_psi"] == pytest.approx(
        jensenshannon(hist(ref_angles), hist(phi_psi(x.astype(np.float64), ala))) ** 2, abs=1e-10)
    assert set(m["stationary_weighted"]) >= {"js_phi_psi", "fes_rmse_kj_mol", "basin_populations", "energy_w1_kj_mol"}
    assert m["kinetics"]["value"] is None and m["kinetics"]["reason"]
    assert m["pathwise"]["value"] is None and "ess_fraction" in m["weights"]
    assert "stationary" in m["noise_floor"] and (report / "weights.png").stat().st_size > 5000
    assert "ESS" in (report / "report.md").read_text()


def test_python_api_is_reproducible(trained):
    bs = molflow.BoltzmannSampler.load(trained, device="cpu")
    a = bs.sample(5, steps=1, seed=9)
    b = bs.sample(5, steps=1, seed=9, reweight=True)
    assert a["positions"].shape == (5, 22, 3) and "weights" not in a
    assert np.abs(a["positions"] - b["positions"]).max() < 1e-4  # reweighting draws the same conformations
    assert b["log_det_jacobian"].shape == (5,) and b["attrs"]["n_samples"] == 5


@pytest.mark.parametrize("args,message", [
    (["sample-boltzmann", "{bg}", "--n", "4", "--steps", "3", "--out", "{tmp}/c.h5"], "--steps must be one of"),
    (["sample-boltzmann", "{tmp}/missing.pt", "--n", "4", "--out", "{tmp}/c.h5"], "no such checkpoint"),
    (["sample-boltzmann", "{bg}", "--n", "4", "--out", "{tmp}/exists.h5"], "exists"),
    (["train-boltzmann", "trialanine", "--data", "{run}", "--out", "{tmp}/x.pt"], "fingerprint"),
])
def test_bad_input_one_line_error(trained, small_run, tmp_path, capsys, args, message):
    (tmp_path / "exists.h5").write_text("x")
    code = main(["--quiet", *[a.format(tmp=tmp_path, bg=trained, run=small_run) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("cmd", ["train-boltzmann", "sample-boltzmann"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0 and "usage: molflow" in capsys.readouterr().out
