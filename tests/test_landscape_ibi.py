"""Iterative Boltzmann inversion of a torsion drive's landscape (molflow.training.landscape_ibi)."""
import numpy as np
import pytest
import torch

from molflow.training.landscape_ibi import LandscapeIBIConfig, end_angle_counts, ibi_refine, ibi_update


def _von_mises(n, mus, kappas, weights):
    a = -np.pi + 2 * np.pi * np.arange(n) / n
    p = sum(w * np.exp(k * np.cos(a - m)) for m, k, w in zip(mus, kappas, weights))
    return p / p.sum()


def test_ibi_update_is_the_damped_clipped_smoothed_log_ratio():
    c_data = np.full((1, 8), 10.0)
    c_map = np.array([[10.0, 10.0, 30.0, 10.0, 10.0, 10.0, 0.0, 0.0]])  # 80 counts each; bin 2 over-visited
    d = ibi_update(c_map, c_data, damping=0.5, clip_kT=10.0, pseudo_count=0.5)
    pm = (c_map + 0.5) / 84.0
    pd = (c_data + 0.5) / 84.0
    r = np.log(pm / pd)[0]
    smooth = 0.25 * np.roll(r, 1) + 0.5 * r + 0.25 * np.roll(r, -1)
    np.testing.assert_allclose(d[0], 0.5 * smooth, rtol=1e-12)
    assert d[0, 2] > 0 and d[0, 6] < 0  # over-/under-visited: the landscape rises/falls there
    assert np.abs(ibi_update(c_map, c_data, 1.0, 0.1, 0.5)).max() == pytest.approx(0.1)  # the clip holds
    with pytest.raises(Exception, match="kinds, nodes"):
        ibi_update(c_map[0], c_data[0], 1.0, 1.0, 0.5)


def test_ibi_refine_converges_on_an_exact_toy():
    """A sampler whose end-angle law is exactly base * exp(-U) (normalised): IBI must drive U to
    ln(base / data) + const. Each iteration removes a share `damping` * k(f) of every frequency f of
    the error (k the smoothing kernel's response, cos^2(pi f / n) ~ 1 for these smooth laws), so 4
    iterations at damping 0.7 leave <= (1 - 0.7 * 0.93)^4 ~ 2% of the initial error (|ln ratio| <= 1.6,
    the clip never binds) plus the multinomial noise of 400000 counts per call (each bin's log-count
    error ~ 1/sqrt(count) <= 0.03 for bins above 1000 counts); we allow 0.15 kT and JS down 20-fold."""
    n = 36
    base = np.stack([_von_mises(n, [-1.2, 1.0], [2.0, 2.0], [0.7, 0.3]), _von_mises(n, [2.5, -0.7], [1.5, 2.5], [0.5, 0.5])])
    data = np.stack([_von_mises(n, [-1.0, 1.2], [2.2, 2.0], [0.55, 0.45]), _von_mises(n, [2.3, -0.5], [1.7, 2.2], [0.6, 0.4])])
    rng = np.random.default_rng(0)
    c_data = np.stack([rng.multinomial(2_000_000, p) for p in data]).astype(float)

    def sample_counts(table, it):
        p = base * np.exp(-table)
        p /= p.sum(1, keepdims=True)
        g = np.random.default_rng(100 + it)
        return np.stack([g.multinomial(400_000, row) for row in p]).astype(float)

    cfg = LandscapeIBIConfig(iterations=4, damping=0.7, clip_kT=2.0)
    table, rec = ibi_refine(np.zeros((2, n)), sample_counts, c_data, cfg)
    assert len(rec) == 5 and all("max_change_kT" in r for r in rec[:-1])
    target = np.log(base / data)
    err = (table - target) - (table - target).mean(1, keepdims=True)
    assert np.abs(target - target.mean(1, keepdims=True)).max() < 1.6
    assert np.abs(err).max() < 0.15, np.abs(err).max()
    first, last = rec[0]["js_end_angle_vs_data"], rec[-1]["js_end_angle_vs_data"]
    assert all(lj < fj / 20 for lj, fj in zip(last, first)), (first, last)


def test_end_angle_counts_read_phi_psi_in_the_landscape_frame():
    """The drive's end angles of alanine dipeptide frames are the evaluator's phi and psi (an L
    residue: chirality +1), binned to the nearest landscape node."""
    from molflow.evaluation.dihedrals import phi_psi
    from molflow.models.torsion_drive import build_torsion_drive
    from molflow.systems import load_system

    system = load_system("alanine_dipeptide")
    drive = build_torsion_drive(system, 3, 16, 8, 24).double()
    rng = np.random.default_rng(1)
    x = system.positions_nm[None] + 0.005 * rng.standard_normal((50, system.n_atoms, 3))
    assert (drive._chirality(torch.as_tensor(x)) == 1).all()  # an L residue, not inverted by the noise
    c = end_angle_counts(drive, x)
    phi, psi = phi_psi(x, system)
    for k, a in enumerate((phi, psi)):
        idx = np.round((np.asarray(a).ravel() + np.pi) / (2 * np.pi) * 24).astype(int) % 24
        np.testing.assert_array_equal(c[k], np.bincount(idx, minlength=24))
    x_nan = np.concatenate([x, np.full((3, system.n_atoms, 3), np.nan)])  # stopped frames are not counted
    np.testing.assert_array_equal(end_angle_counts(drive, x_nan), c)
