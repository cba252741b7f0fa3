"""Iterative Boltzmann inversion of a torsion drive's landscape (molflow.training.landscape_ibi)."""
import numpy as np
import pytest
import torch

from molflow.training.landscape_ibi import (LandscapeIBIConfig, end_angle_counts, ibi_pair_update, ibi_refine,
                                           ibi_update, pair_counts)


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


def _joint(n, coupling):
    """A smooth periodic joint law on an n x n grid with a phi-psi coupling (for the pair tests)."""
    a = -np.pi + 2 * np.pi * np.arange(n) / n
    f, s = np.meshgrid(a, a, indexing="ij")
    logp = 1.5 * np.cos(f + 1.2) + 1.2 * np.cos(s - 2.4) + coupling * np.sin(f) * np.sin(s)
    p = np.exp(logp - logp.max())
    return p / p.sum()


def test_pair_update_is_the_interaction_part_of_the_log_ratio():
    """Where map and data both have independent phi and psi the pair table does not change (the 1-D
    tables take the marginal errors); otherwise the change is the damped, clipped, smoothed joint log-ratio less
    the log-ratios of its marginals, and an over-visited corner rises."""
    n = 12
    independent = _joint(n, 0.0) * 1e6
    tilt = np.exp(0.3 * np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)))
    product = independent * tilt[:, None] * tilt[None, ::-1]  # marginal errors only
    np.testing.assert_allclose(ibi_pair_update(product, independent, 1.0, 10.0, 0.0), 0.0, atol=1e-12)
    data = _joint(n, 0.8) * 1e6
    c_map = _joint(n, 0.2) * 1e6
    d = ibi_pair_update(c_map, data, 0.5, 10.0, 0.0)
    pm, pd = c_map / c_map.sum(), data / data.sum()
    r = np.log(pm / pd) - np.log(pm.sum(1) / pd.sum(1))[:, None] - np.log(pm.sum(0) / pd.sum(0))[None, :]
    for ax in (0, 1):
        r = 0.25 * np.roll(r, 1, ax) + 0.5 * r + 0.25 * np.roll(r, -1, ax)
    np.testing.assert_allclose(d, 0.5 * r, rtol=1e-10, atol=1e-12)
    i, j = n // 4, n // 4  # sin(phi) sin(psi) < 0 here: the weaker coupling over-visits this corner
    assert d[i + n // 2, j] > 0 and d[i + n // 2, j + n // 2] < 0
    with pytest.raises(Exception, match=r"\(n, n\)"):
        ibi_pair_update(c_map[:, :5], data[:, :5], 1.0, 1.0, 0.5)


def test_ibi_refine_with_a_pair_table_converges_on_an_exact_toy():
    """An exact sampler of base(phi, psi) exp(-U_phi - U_psi - P): IBI with the pair table must drive
    U_phi + U_psi + P to ln(base / data) + const on the joint grid. Each iteration removes a share
    0.7 k(f) of the error (as the 1-D test: k ~ 0.9-1 for these smooth laws, both grids 24 nodes so the
    1-D and pair parts add up exactly), so 4 iterations leave ~2% of an initial error under 1.6 kT,
    plus the noise of 2e6 counts per call in bins above ~2000 counts (1/sqrt(2000) = 0.02): we allow
    0.15 kT there, and the joint JS must fall 20-fold."""
    n = 24
    base, data = _joint(n, 0.0), _joint(n, 1.0)
    base = base * np.exp(0.4 * np.cos(-np.pi + 2 * np.pi * np.arange(n) / n + 0.5))[:, None]  # a marginal error too
    base /= base.sum()
    rng = np.random.default_rng(0)
    c_pair_data = rng.multinomial(10_000_000, data.ravel()).reshape(n, n).astype(float)
    c_data = np.stack([c_pair_data.sum(1), c_pair_data.sum(0)])

    def sample(table, pair, it):
        logp = np.log(base) - table[0][:, None] - table[1][None, :] - pair
        p = np.exp(logp - logp.max())
        c = np.random.default_rng(100 + it).multinomial(2_000_000, (p / p.sum()).ravel()).reshape(n, n).astype(float)
        return np.stack([c.sum(1), c.sum(0)]), c

    cfg = LandscapeIBIConfig(iterations=4, damping=0.7, clip_kT=2.0)
    table, pair, rec = ibi_refine(np.zeros((2, n)), sample, c_data, cfg, pair=np.zeros((n, n)), c_pair_data=c_pair_data)
    assert all("max_pair_change_kT" in r for r in rec[:-1]) and "js_pair_vs_data" in rec[-1]
    target = np.log(base / data)
    total = table[0][:, None] + table[1][None, :] + pair
    err = (total - target) - (total - target)[data > 2000 / 2e6].mean()
    assert np.abs(target - target.mean()).max() < 4 and np.abs(np.diff(target, axis=0)).max() < 1.6
    assert np.abs(err[data > 2000 / 2e6]).max() < 0.15, np.abs(err[data > 2000 / 2e6]).max()
    assert rec[-1]["js_pair_vs_data"] < rec[0]["js_pair_vs_data"] / 20, (rec[0], rec[-1])
    with pytest.raises(Exception, match="joint counts"):
        ibi_refine(np.zeros((2, n)), sample, c_data, cfg, pair=np.zeros((n, n)))


def test_pair_counts_read_phi_psi_jointly():
    """The pair counts of alanine dipeptide frames are the evaluator's (phi, psi) binned jointly to the
    nearest pair-grid node; a drive without a pair table refuses."""
    from molflow.evaluation.dihedrals import phi_psi
    from molflow.models.torsion_drive import build_torsion_drive
    from molflow.systems import load_system

    system = load_system("alanine_dipeptide")
    drive = build_torsion_drive(system, 3, 16, 8, 24, landscape_pair=12).double()
    rng = np.random.default_rng(2)
    x = system.positions_nm[None] + 0.01 * rng.standard_normal((80, system.n_atoms, 3))
    phi, psi = phi_psi(x, system)
    i = np.round((np.asarray(phi).ravel() + np.pi) / (2 * np.pi) * 12).astype(int) % 12
    j = np.round((np.asarray(psi).ravel() + np.pi) / (2 * np.pi) * 12).astype(int) % 12
    want = np.zeros((12, 12))
    np.add.at(want, (i, j), 1)
    np.testing.assert_array_equal(pair_counts(drive, x), want)
    with pytest.raises(Exception, match="pair landscape"):
        pair_counts(build_torsion_drive(system, 3, 16, 8, 24).double(), x)


def test_weighted_target_counts():
    """Weighted target frames (umbrella windows with unbiasing weights) count by their weights,
    scaled to sum to the weights' Kish effective number (so the pseudo-counts weigh as for that many
    plain frames); equal weights give the plain counts; bad weights are refused."""
    from molflow.models.torsion_drive import build_torsion_drive
    from molflow.systems import load_system

    system = load_system("alanine_dipeptide")
    drive = build_torsion_drive(system, 3, 16, 8, 24, landscape_pair=12).double()
    rng = np.random.default_rng(3)
    x = system.positions_nm[None] + 0.01 * rng.standard_normal((60, system.n_atoms, 3))
    w = rng.uniform(0.1, 2.0, 60)
    ess = w.sum() ** 2 / (w * w).sum()
    for fn in (end_angle_counts, pair_counts):
        plain, weighted = fn(drive, x), fn(drive, x, weights=w)
        np.testing.assert_allclose(fn(drive, x, weights=np.full(60, 3.0)), plain, rtol=1e-12)
        assert weighted.sum() == pytest.approx(ess * (2 if fn is end_angle_counts else 1), rel=1e-12)
        one = np.zeros(60)
        one[7] = 1.0  # all the weight on frame 7: its bins only
        np.testing.assert_allclose(fn(drive, x, weights=one), fn(drive, x[7:8]), rtol=1e-12)
        with pytest.raises(Exception, match="weight"):
            fn(drive, x, weights=-w)



def test_stratified_starts_fix_each_groups_share_and_weigh_it_back():
    """Each labelled group gets round(share * n) starts (largest remainder; the rest of the pool the
    rest); within a group the systematic draw gives item i a count within 1 of k * w_i / W (its
    deterministic bound); each start weighs its group's pool mass over its count, so the weighted
    starts give every group exactly its mass in the pool. A group of the pool left without starts, or
    asked for starts without weight, is refused."""
    from molflow.training.landscape_ibi import stratified_starts

    rng = np.random.default_rng(6)
    w = rng.uniform(0.0, 1.0, 300)
    labels = (np.arange(300) >= 280).astype(int)  # 20 rare frames, ~7% of the weight
    idx, sw = stratified_starts(w, 200, labels, {1: 0.25}, seed=3)
    assert len(idx) == len(sw) == 200 and (labels[idx] == 1).sum() == 50
    assert sw.mean() == pytest.approx(1.0)
    for lab, k in ((1, 50), (0, 150)):
        g = np.flatnonzero(labels == lab)
        counts = np.bincount(idx, minlength=300)[g]
        assert np.abs(counts - k * w[g] / w[g].sum()).max() < 1.0
        assert sw[labels[idx] == lab].sum() / sw.sum() == pytest.approx(w[g].sum() / w.sum(), rel=1e-12)
    idx, sw = stratified_starts(w, 7, labels, {1: 0.3}, seed=1)
    assert len(idx) == 7 and (labels[idx] == 1).sum() == 2  # 2.1 and 4.9: the larger remainder rounds up
    with pytest.raises(Exception, match="no start"):
        stratified_starts(w, 3, labels, {1: 1.0})
    with pytest.raises(Exception, match="weighted frames"):
        stratified_starts(np.where(labels == 1, 0.0, w), 10, labels, {1: 0.5})
