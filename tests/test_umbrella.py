"""Umbrella sampling along phi and its MBAR unbiasing (molflow.md.umbrella)."""
import numpy as np
import pytest

from molflow.md.umbrella import UmbrellaSettings, mbar_weights, reduced_bias, sample_phi_windows


def test_mbar_recovers_a_known_law_from_biased_windows():
    """Exact samples of p(phi) ~ exp(-2 cos phi) under 12 harmonic windows (k = 50 kJ/mol/rad^2,
    kT = 2.5), 12000 per window: the MBAR-weighted histogram (18 bins) must match the law's exact bin
    probabilities. The error is statistical (window free energies and per-bin counts): at 3000 per
    window four seeds gave a largest relative bin error of 0.08-0.16, and it falls as 1/sqrt(n), so
    ~0.04-0.08 here; we allow 0.13. Unweighted, the pooled windows are far off (they flatten the law)."""
    rng = np.random.default_rng(0)
    K, k, kT = 12, 50.0, 2.5
    cen = np.linspace(-np.pi, np.pi, K, endpoint=False)

    def window(c, n):
        out = []
        while len(out) < n:
            x = rng.uniform(-np.pi, np.pi, 20000)
            d = np.abs(x - c) % (2 * np.pi)
            d = np.minimum(d, 2 * np.pi - d)
            logp = -2 * np.cos(x) - 0.5 * k * d * d / kT
            out.extend(x[rng.uniform(size=x.size) < np.exp(logp - 2)])
        return np.array(out[:n])

    phi = np.concatenate([window(c, 12000) for c in cen])
    w = mbar_weights(reduced_bias(phi, cen, k, kT), np.full(K, 12000.0))
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()
    fine = np.linspace(-np.pi, np.pi, 180001)[:-1] + np.pi / 180000  # the law's exact bin probabilities
    true = np.histogram(fine, bins=18, range=(-np.pi, np.pi), weights=np.exp(-2 * np.cos(fine)))[0]
    true /= true.sum()
    h = np.histogram(phi, bins=18, range=(-np.pi, np.pi), weights=w)[0]
    assert np.abs(h / true - 1).max() < 0.13, np.round(h / true, 3)
    flat = np.histogram(phi, bins=18, range=(-np.pi, np.pi))[0] / phi.size
    assert np.abs(flat / true - 1).max() > 1.0  # the unweighted pool is not the law


def test_reduced_bias_takes_the_short_way_round():
    u = reduced_bias(np.array([np.pi - 0.1, -np.pi + 0.1]), np.array([np.pi - 0.05]), 2.0, 1.0)
    np.testing.assert_allclose(u, [[0.5 * 2.0 * 0.05 ** 2, 0.5 * 2.0 * 0.15 ** 2]], rtol=1e-9)


def test_windows_hold_phi_at_their_centres():
    """Four short windows on alanine dipeptide (k = 200 kJ/mol/rad^2: sigma = sqrt(kT/k) = 0.11 rad):
    each window's circular mean phi lies within 0.35 rad (3 sigma) of its centre, frames and weights
    line up, and the weights are a normalised distribution."""
    z = sample_phi_windows("alanine_dipeptide", UmbrellaSettings(windows=4, production_ps=2.0, equilibrate_ps=2.0,
                                                                 frame_fs=50.0, workers=1), verbose=False)
    n = len(z["phi"])
    assert z["positions"].shape == (n, 22, 3) and z["weight"].shape == (n,) and len(z["centres"]) == 4
    assert z["weight"].sum() == pytest.approx(1.0) and np.isfinite(z["weight"]).all()
    for i, c in enumerate(z["centres"]):
        m = np.angle(np.exp(1j * z["phi"][z["window"] == i]).mean())
        assert abs(np.angle(np.exp(1j * (m - c)))) < 0.35, (np.degrees(c), np.degrees(m))
    with pytest.raises(Exception, match="2 windows"):
        sample_phi_windows("alanine_dipeptide", UmbrellaSettings(windows=1))


def test_system_at_backbone_dihedrals_turns_the_start_strain_free():
    """The start structure reaches the asked (phi, psi) (to 1e-9 rad) with every bonded distance kept
    (a rigid turn of the two halves about each backbone bond); the force field is the system's; a
    molecule with more than one residue's phi/psi is refused."""
    import molflow
    from molflow.evaluation.dihedrals import phi_psi
    from molflow.md.umbrella import system_at_backbone_dihedrals

    mol = molflow.load_system("alanine_dipeptide")
    turned = system_at_backbone_dihedrals(mol, 1.0, 0.6)
    phi, psi = phi_psi(turned.positions_nm[None], mol)
    assert abs(float(phi[0]) - 1.0) < 1e-9 and abs(float(psi[0]) - 0.6) < 1e-9
    bonds = np.asarray(mol.bonds)
    d0 = np.linalg.norm(mol.positions_nm[bonds[:, 0]] - mol.positions_nm[bonds[:, 1]], axis=1)
    d1 = np.linalg.norm(turned.positions_nm[bonds[:, 0]] - turned.positions_nm[bonds[:, 1]], axis=1)
    np.testing.assert_allclose(d1, d0, atol=1e-12)
    assert turned.system is mol.system and turned.pdb_text == mol.pdb_text  # same force field
    with pytest.raises(molflow.InputError, match="exactly one backbone"):
        system_at_backbone_dihedrals(molflow.load_system("trialanine"), 1.0, 0.6)
