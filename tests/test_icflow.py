"""The internal-coordinate Boltzmann sampler (issue 19): Z-matrix, exact densities, exact weights, CLI.

Statistical check: a self-normalised importance-sampling estimate f̂ = Σ w_i f_i (Σ w = 1) has the
delta-method standard error SE = sqrt(Σ w_i² (f_i - f̂)²); two independent estimates of the same
Boltzmann mean differ by less than 4 sqrt(SE_1² + SE_2²) except with probability ~6e-5 (normal
tails; the seeds are fixed, so a pass is reproducible).
"""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

import molflow
from molflow.boltzmann.icflow import Coupling, InternalFlow, InternalFlowConfig
from molflow.boltzmann.internal import ZMatrix, random_rotations
from molflow.boltzmann.geometry import centre_free_basis
from molflow.cli import EXIT_INPUT, main
from molflow.md.engine import EnergyEvaluator
from molflow.systems import load_system


@pytest.fixture(scope="module")
def ala():
    return load_system("alanine_dipeptide")


@pytest.fixture(scope="module")
def md_frames(tmp_path_factory, ala):
    """2 x 100 ps of MD at 100-fs frames (2000 frames, β and αR both visited with this seed): enough for
    the base's fit (about 20 s on 2 cores)."""
    path = tmp_path_factory.mktemp("ic") / "md.h5"
    molflow.simulate("alanine_dipeptide", path, replicas=2, time_ps=100.0, frame_fs=100.0, n_coefficients=0,
                     equilibrate_ps=2.0, seed=11, progress=False, platform="CPU", workers=1).close()
    with molflow.Trajectory(path) as t:
        x = np.asarray(t.positions[:], dtype=np.float64).reshape(-1, 22, 3)
    return path, x - x.mean(1, keepdims=True)


def _distances(x):
    return torch.linalg.norm(x[..., :, None, :] - x[..., None, :, :], dim=-1)  # (cdist rounds at 1e-8)


@pytest.mark.parametrize("name", ["alanine_dipeptide", "trialanine"])
def test_zmatrix_round_trip_keeps_every_distance(name):
    s = load_system(name)
    zm = ZMatrix.for_system(s)
    assert sorted(zm.order) == list(range(s.n_atoms)) and zm.n_internal == 3 * s.n_atoms - 6
    x = torch.as_tensor(s.positions_nm, dtype=torch.float64)
    x = torch.stack([x, x + 0.003 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0),
                                                dtype=torch.float64)])
    r, th, tau = zm.to_internal(x)
    y = zm.to_cartesian(r, th, tau, random_rotations(2, torch.Generator().manual_seed(1)))
    assert torch.allclose(_distances(x), _distances(y), atol=1e-12)
    np.testing.assert_allclose(y.mean(1).numpy(), 0.0, atol=1e-14)
    # every atom is placed from bonded predecessors: j is a bond partner of i
    bonds = {tuple(sorted(b)) for b in s.bonds.tolist()}
    for m in range(1, s.n_atoms):
        assert tuple(sorted((zm.order[m], zm.refs[m][0]))) in bonds


def test_log_volume_is_the_cartesian_jacobian_up_to_a_constant(ala):
    """log|det ∂(Q_Aᵀ x)/∂(r, θ, τ, rotation)| - log(Π r² Π sin θ) is the same at every conformation
    (autograd Jacobian, float64): the volume element the weights use is exact."""
    zm = ZMatrix.for_system(ala)
    q = torch.as_tensor(centre_free_basis(ala.n_atoms))
    A = ala.n_atoms

    def f(v):
        r, th, tau, w = v[:A - 1], v[A - 1:2 * A - 3], v[2 * A - 3:3 * A - 6], v[3 * A - 6:]
        k = torch.zeros(3, 3, dtype=v.dtype)
        k[0, 1], k[0, 2], k[1, 2] = -w[2], w[1], -w[0]
        return (q.T @ zm.to_cartesian(r, th, tau, torch.linalg.matrix_exp(k - k.T))).reshape(-1)

    x0 = torch.as_tensor(ala.positions_nm, dtype=torch.float64)
    gaps = []
    for seed in range(3):
        x = x0 + 0.01 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        r, th, tau = zm.to_internal(x)
        v = torch.cat([r, th, tau, torch.zeros(3, dtype=torch.float64)])
        jac = torch.autograd.functional.jacobian(f, v)
        gaps.append(float(torch.linalg.slogdet(jac)[1] - zm.log_volume(r, th)))
    assert max(gaps) - min(gaps) < 1e-8


def test_coupling_inverse_and_log_determinant_are_exact():
    torch.manual_seed(0)
    D, C = 7, 3
    mask = torch.tensor([1, 0, 1, 0, 0, 1, 0.0])
    f = Coupling(mask, C, 16, 2, 2.0).double()
    for p in f.parameters():  # away from the identity it starts at
        torch.nn.init.normal_(p, std=0.3)
    e, ctx = torch.randn(4, D, dtype=torch.float64), torch.randn(4, C, dtype=torch.float64)
    out, ld = f(e, ctx)
    back, ld2 = f.inverse(out, ctx)
    assert torch.allclose(back, e, atol=1e-12) and torch.allclose(ld, ld2)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda z: f(z[None], ctx[i:i + 1])[0][0], e[i])
        assert abs(float(torch.linalg.slogdet(jac)[1]) - float(ld[i].detach())) < 1e-10


@pytest.fixture(scope="module")
def flow(ala, md_frames):
    fl = InternalFlow.fit(ala, md_frames[1], config=InternalFlowConfig(step_counts=(1, 2, 4), hidden=16))
    with torch.no_grad():  # a map away from the identity: the density bookkeeping must hold for any weights
        for p in fl.stacks.parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return fl


def test_fit_finds_the_broad_torsions_and_keeps_chirality_stiff(flow, ala):
    """φ/ψ pair first (2-D histogram), methyl rotors broad, the CA improper-like torsion stiff."""
    assert flow.pair
    phi, psi = ala.central_dihedrals()
    bonds = [set(flow.zmatrix.torsion_atoms(t)[1:3]) for t in flow.broad[:2]]
    assert bonds == [{int(phi[1]), int(phi[2])}, {int(psi[1]), int(psi[2])}]
    assert len(flow.broad) == 5  # φ, ψ and the three methyl rotors
    torch.testing.assert_close(flow.hist2.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("steps", [0, 1, 4])
def test_sample_density_matches_the_inverse_path(flow, steps):
    """The log-density a sample carries (base - log-det) equals the one recomputed from its positions
    alone, through the Z-matrix, the whitening and the inverse coupling steps: the weights are exact."""
    d = flow.sample(64, steps, torch.Generator().manual_seed(steps))
    assert bool(d["in_domain"].all())
    log_q = d["log_base_density"] - d["log_det_jacobian"]
    x = d["positions"]
    r, th, _ = flow.zmatrix.to_internal(x)
    again = flow.log_prob_internal(x, steps) - flow.zmatrix.log_volume(r, th)
    torch.testing.assert_close(log_q, again, atol=1e-8, rtol=0)


def test_sample_refuses_untrained_step_counts(flow):
    with pytest.raises(molflow.errors.InputError, match="trained for"):
        flow.sample(2, 3, torch.Generator().manual_seed(0))


def test_weighted_estimates_agree_for_a_right_and_a_wrong_base(ala, md_frames):
    """Exact weights make any proposal consistent: the mean N-CA bond length and the potential energy
    from the fitted base and from one 1.3x too wide in every stiff direction agree within 4 combined
    standard errors (module docstring; at least 100 effective samples each, so the delta-method errors
    are themselves reliable), and the wrong base's ESS is lower."""
    kT = ala.kT_kj_mol
    energy = EnergyEvaluator(ala, "Reference")
    est = []
    for widen in (1.0, 1.3):
        fl = InternalFlow.fit(ala, md_frames[1], config=InternalFlowConfig(step_counts=(1,), hidden=8))
        fl.chol.mul_(widen)
        d = fl.sample(20000, 0, torch.Generator().manual_seed(5))
        x = d["positions"].numpy()
        U = energy(x)
        lw = -U / kT + d["log_det_jacobian"].numpy() - d["log_base_density"].numpy()
        w = np.exp(lw - lw.max())
        w /= w.sum()
        f = np.stack([np.linalg.norm(x[:, 6] - x[:, 8], axis=-1), U], 1)
        mean = w @ f
        se = np.sqrt((w[:, None] ** 2 * (f - mean) ** 2).sum(0))
        est.append((mean, se, 1.0 / (w ** 2).sum() / len(w)))
    (m1, s1, ess1), (m2, s2, ess2) = est
    assert np.all(np.abs(m1 - m2) < 4 * np.sqrt(s1 ** 2 + s2 ** 2)), (m1, m2, s1, s2)
    assert ess2 < ess1 and ess1 * 20000 > 100  # (0.027 and 0.0075 when written: 200 ps of data is little)


# ------------------------------------------------------------------------------ training and the CLI
@pytest.fixture(scope="module")
def trained(md_frames, tmp_path_factory):
    d = tmp_path_factory.mktemp("icbg")
    cfg = d / "small.yaml"
    cfg.write_text("hidden: 16\nenergy_batch_size: 16\nbatch_size: 32\ncheckpoint_every: 3\n")
    out = d / "bg.pt"
    assert main(["--quiet", "train-boltzmann", "alanine_dipeptide", "--data", str(md_frames[0]), "--out", str(out),
                 "--steps", "6", "--seed", "2", "--config", str(cfg)]) == 0
    return out, cfg


def test_resume_after_a_crash_is_bit_exact(trained, md_frames, tmp_path, monkeypatch):
    """A 6-step run that dies after step 4 (its last checkpoint: step 3), resumed with --resume, ends
    with the same weights as the 6 steps in one go (the reverse objective draws from the saved
    generator and takes OpenMM Reference energies: deterministic)."""
    from molflow.boltzmann import icflow

    out, cfg = trained
    part = tmp_path / "part.pt"
    args = ["--quiet", "train-boltzmann", "alanine_dipeptide", "--data", str(md_frames[0]), "--out", str(part),
            "--seed", "2", "--config", str(cfg), "--steps", "6"]
    real = icflow.InternalTrainer.train_step

    def dying(self):
        if self.step_count == 4:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(icflow.InternalTrainer, "train_step", dying)
    assert main(args) == 130  # interrupted: the CLI says so and keeps the last checkpoint
    assert torch.load(part, weights_only=True)["step"] == 3
    monkeypatch.setattr(icflow.InternalTrainer, "train_step", real)
    assert main(args + ["--resume"]) == 0
    a = torch.load(out, weights_only=True)
    b = torch.load(part, weights_only=True)
    assert b["step"] == 6 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_more_steps_keeps_the_schedule(trained, md_frames, tmp_path):
    """A finished 3-step run extended to 5 with --resume goes on at its schedule's final learning rate
    (lr x lr_floor) instead of re-planning the cosine for 5 steps."""
    _, cfg = trained
    out = tmp_path / "ext.pt"
    args = ["--quiet", "train-boltzmann", "alanine_dipeptide", "--data", str(md_frames[0]), "--out", str(out),
            "--seed", "2", "--config", str(cfg)]
    assert main(args + ["--steps", "3"]) == 0
    assert main(args + ["--steps", "5", "--resume"]) == 0
    ck = torch.load(out, weights_only=True)
    lr = [h["lr"] for h in json.loads(ck["history_json"]) if "lr" in h]
    assert ck["step"] == 5 and len(lr) == 5 and ck["schedule_steps"] == 3
    assert lr[3:] == pytest.approx([1e-3 * 0.05] * 2) and lr[1] > lr[3]


def test_cli_sample_with_weights(trained, tmp_path, capsys):
    out, _ = trained
    conf = tmp_path / "conf.h5"
    assert main(["sample-boltzmann", str(out), "--n", "300", "--steps", "4", "--out", str(conf), "--reweight",
                 "--seed", "3"]) == 0
    assert "ESS" in capsys.readouterr().out
    with h5py.File(conf, "r") as f:
        a = dict(f.attrs)
        w, lw, ok = f["weights"][:], f["log_weights"][:], f["chirality_ok"][:]
        x = f["positions"][:]
    assert a["map_kind"] == "internal" and a["n_invertibility_failures"] == 0 and a["n_wrong_chirality"] == 0
    assert ok.all() and abs(w.sum() - 1) < 1e-9 and np.all(w >= 0)
    np.testing.assert_allclose(w, np.exp(lw - lw.max()) / np.exp(lw - lw.max()).sum(), rtol=1e-9, atol=1e-15)
    assert 0 < a["ess_fraction"] <= 1 and abs(a["ess"] - 1 / (w ** 2).sum()) < 1e-6 * a["ess"]
    np.testing.assert_allclose(x.mean(1), 0.0, atol=1e-5)
    # the same seed draws the same conformations with or without weights
    bs = molflow.BoltzmannSampler.load(out)
    plain = bs.sample(300, steps=4, seed=3)
    np.testing.assert_allclose(plain["positions"], x, atol=1e-6)
    assert main(["--quiet", "sample-boltzmann", str(out), "--n", "4", "--steps", "0", "--out",
                 str(tmp_path / "base.h5")]) == 0


def test_weighted_frame_files(ala, md_frames, tmp_path, capsys):
    """.npz frames train with their weights; a file for another molecule is refused in one line."""
    from molflow.boltzmann.training import load_weighted_frames

    x = md_frames[1][:100]
    good = tmp_path / "w.npz"
    np.savez(good, positions=x, weight=np.linspace(1.0, 3.0, len(x)))
    frames, w = load_weighted_frames([good], ala)
    assert frames.shape == (100, 22, 3) and abs(w.mean() - 1.0) < 1e-12 and w[-1] / w[0] == pytest.approx(3.0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, positions=x[:, :10], weight=np.ones(len(x)))
    code = main(["--quiet", "train-boltzmann", "alanine_dipeptide", "--data", str(bad), "--out", str(tmp_path / "b.pt")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT and "do not fit" in err and len(err.splitlines()) == 1
    code = main(["--quiet", "train-boltzmann", "alanine_dipeptide", "--data", str(good), "--out",
                 str(tmp_path / "c.pt"), "--config", str(_yaml(tmp_path, "kind: vp\n"))])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT and "weighted frames" in err


def _yaml(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_tiny_data_still_fits(ala, md_frames):
    """A few dozen frames (fewer than the stiff block's dimension) give a well-posed base: the residual
    covariance is shrunk to its diagonal, not singular."""
    fl = InternalFlow.fit(ala, md_frames[1][:30], config=InternalFlowConfig(step_counts=(1,), hidden=8))
    d = fl.sample(16, 1, torch.Generator().manual_seed(0))
    assert torch.isfinite(d["log_base_density"]).all() and math.isfinite(float(fl.log_det_chol))
