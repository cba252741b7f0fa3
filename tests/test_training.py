"""Training a molecular flow map: it learns, checkpoints round-trip, resume is exact, loads are guarded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import molflow
from molflow import InputError
from molflow.models import MapConfig
from molflow.training.data import FrameData
from molflow.training.loop import Trainer, TrainConfig, train

TINY = dict(n_features=16, n_layers=2, batch_size=12, validate_every=10_000, checkpoint_every=10_000,
            verdict_replicas=0)


def test_composed_coefficients_match_recorded_data(data20fs):
    """A k-frame jump's coefficients are the exact composition of the recorded frame blocks."""
    from molflow.brownian import compose

    d = FrameData([str(data20fs)])
    b = d.items(np.array([0]), np.array([10]), 5)
    direct = compose(d.L[0, 10:15].astype(np.float64), [d.h0_ps] * 5)
    np.testing.assert_allclose(b["L"][0].numpy(), direct, atol=1e-6)
    assert float(b["tau"][0]) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def tiny_trained(data20fs, ala2):
    """150 CPU steps per objective on 200 frames (same data, settings, seed): held-out validation
    before and after, at 0.02 and 0.06 ps."""
    torch.set_num_threads(1)
    got = {}
    for objective in ("energy", "whitened_crps"):
        # no training noise: these tests isolate the loop and the objective (the noise trades a little
        # one-jump accuracy for rollout stability, measured in benchmarks/molecular_objectives.py)
        cfg = TrainConfig(steps=300, tau_max_ps=0.06, lr=3e-3, ema_decay=0.9, batch_size=12, objective=objective,
                          input_noise_nm=0.0)
        tr = Trainer(ala2, FrameData([str(data20fs)]), cfg, MapConfig(n_features=16, n_layers=2), torch.device("cpu"), 1)
        got["untrained"] = tr.validate([0.02, 0.06])
        for _ in range(cfg.steps):
            tr.train_step()
        got[objective] = tr.validate([0.02, 0.06])
    return got


def test_tiny_training_reduces_validation_strong_error(tiny_trained):
    """The held-out one-jump error (mean mode, h0 = 20 fs) must drop with training (energy objective).

    The untrained map is its identity base (zero-initialised read-out, issue 16), whose error is the
    whole displacement over the jump. We ask for a 20% drop after 300 steps, outside what a broken
    loss/gradient gives (it leaves the map at its base or makes it worse)."""
    key = "val_rmsd_mean_0.02ps_nm"
    assert tiny_trained["energy"][key] < 0.8 * tiny_trained["untrained"][key], tiny_trained


def _bond_spread_after_training(data20fs, ala2, objective: str, seed: int) -> float:
    """Held-out bond-length spread ratio at 0.06 ps after the tiny_trained recipe with ``seed``."""
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=300, tau_max_ps=0.06, lr=3e-3, ema_decay=0.9, batch_size=12, objective=objective,
                      input_noise_nm=0.0)
    tr = Trainer(ala2, FrameData([str(data20fs)]), cfg, MapConfig(n_features=16, n_layers=2), torch.device("cpu"), seed)
    for _ in range(cfg.steps):
        tr.train_step()
    return tr.validate([0.06])["val_bond_std_ratio_0.06ps"]


def test_whitened_objective_narrows_the_bond_spread(tiny_trained, data20fs, ala2):
    """The default objective (whitened internal coordinates + CRPS) scores every bond's own spread;
    the energy score on Cartesian features barely sees it (issue #10). The held-out bond-length
    spread after 0.06 ps (sampled / recorded, 1 = right) must be below the energy objective's, in the
    mean ratio over three seeds (one training run is chaotic in its float rounding: seed 1 gave 0.30
    on one machine and 0.70 on another). Measured on the project's current 2-core machine, seeds 1 /
    2 / 3: 4.07 / 5.80, 3.73 / 4.48, 3.60 / 5.90 (ratios 0.70, 0.83, 0.61, mean 0.71). An objective
    that did not see the bonds (no internal terms, wrong whitening) trains like the energy score, a
    ratio near 1 for every seed; we ask for a mean below 0.85. (The untrained map is the identity
    base, whose spread is the start states' own, ~1: no benchmark.)"""
    key = "val_bond_std_ratio_0.06ps"
    ratios = [tiny_trained["whitened_crps"][key] / tiny_trained["energy"][key]]
    for seed in (2, 3):
        ratios.append(_bond_spread_after_training(data20fs, ala2, "whitened_crps", seed)
                      / _bond_spread_after_training(data20fs, ala2, "energy", seed))
    assert np.mean(ratios) < 0.85, ratios


def test_checkpoint_resume_gives_identical_next_steps(data20fs, ala2, tmp_path):
    """Save after 4 steps, go on 4 more; a fresh Trainer loaded from the checkpoint (what
    ``train(resume=True)`` does) must take exactly the same 4 next steps, bit for bit."""
    from molflow.checkpoint import load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    cfg = TrainConfig(steps=8, tau_max_ps=0.06, batch_size=8)
    mcfg = MapConfig(n_features=16, n_layers=2)
    data = FrameData([str(data20fs)])
    a = Trainer(ala2, data, cfg, mcfg, torch.device("cpu"), 3)
    for _ in range(4):
        a.train_step()
    save_checkpoint(tmp_path / "ck.pt", a.state())
    losses_a = [a.train_step()["loss"] for _ in range(4)]
    b = Trainer(ala2, data, cfg, mcfg, torch.device("cpu"), 99)  # another seed: everything comes from the file
    b.load_state(load_checkpoint(tmp_path / "ck.pt"))
    losses_b = [b.train_step()["loss"] for _ in range(4)]
    assert losses_a == losses_b
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[key], atol=0, rtol=0)
        torch.testing.assert_close(a.ema.state_dict()[key], b.ema.state_dict()[key], atol=0, rtol=0)


def test_train_resume_continues_to_the_requested_steps(data20fs, tmp_path):
    path = tmp_path / "r.pt"
    train("alanine_dipeptide", [str(data20fs)], path, tau_max_ps=0.04, steps=3, seed=2, config=TINY, progress=False)
    train("alanine_dipeptide", [str(data20fs)], path, tau_max_ps=0.04, steps=5, resume=True, config=TINY,
          progress=False)
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 5 and ck["seed"] == 2 and len(__import__("json").loads(ck["history_json"])) == 5


def test_flowmap_load_guards(data20fs, tmp_path):
    path = tmp_path / "m.pt"
    train("alanine_dipeptide", [str(data20fs)], path, tau_max_ps=0.04, steps=2, seed=4, config=TINY, progress=False)
    fm = molflow.FlowMap.load(path, system="alanine_dipeptide", device="cpu")
    assert fm.n_coefficients == 3 and fm.h0_ps == pytest.approx(0.02)
    with pytest.raises(InputError, match="trained for system 'alanine_dipeptide'"):
        molflow.FlowMap.load(path, system="trialanine")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="not a readable molflow checkpoint"):
        molflow.FlowMap.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(InputError, match="not a molflow flow-map checkpoint"):
        molflow.FlowMap.load(foreign)


def test_training_data_guards(data20fs):
    with pytest.raises(InputError, match="records 3 path coefficients"):
        FrameData([str(data20fs)], n_coefficients=5)
    assert FrameData([str(data20fs)], n_coefficients=2).L.shape[2] == 2  # the first ones are exact


def test_cpu_training_picks_the_machine_sized_defaults(data20fs, tmp_path):
    """With no size settings a CPU run trains the measured CPU size (MACHINE_DEFAULTS: 32 features,
    2 layers, batch 32); a size the user sets wins over the machine default."""
    import json

    quiet = dict(validate_every=10_000, checkpoint_every=10_000, verdict_replicas=0)
    train("alanine_dipeptide", [str(data20fs)], tmp_path / "a.pt", tau_max_ps=0.04, steps=1, seed=1, device="cpu",
          config=quiet, progress=False)
    ck = torch.load(tmp_path / "a.pt", weights_only=True)
    m, t = json.loads(ck["map_config_json"]), json.loads(ck["train_config_json"])
    assert (m["n_features"], m["n_layers"], t["batch_size"]) == (32, 2, 32)
    train("alanine_dipeptide", [str(data20fs)], tmp_path / "b.pt", tau_max_ps=0.04, steps=1, seed=1, device="cpu",
          config={**quiet, "batch_size": 8}, n_features=16, progress=False)
    ck = torch.load(tmp_path / "b.pt", weights_only=True)
    m, t = json.loads(ck["map_config_json"]), json.loads(ck["train_config_json"])
    assert (m["n_features"], m["n_layers"], t["batch_size"]) == (16, 2, 8)


_QUIET_SMALL = dict(validate_every=10_000, checkpoint_every=10_000, verdict_replicas=0, batch_size=4)


def _small_base(data20fs, tmp_path, steps: int):
    """A tiny trained map (16 features, 1 layer) to fine-tune from."""
    base = tmp_path / "base.pt"
    train("alanine_dipeptide", [str(data20fs)], base, tau_max_ps=0.04, steps=steps, seed=1, device="cpu",
          config=_QUIET_SMALL, n_features=16, n_layers=1, progress=False)
    return base


def test_fine_tuning_starts_from_the_checkpoint(data20fs, tmp_path):
    """``init_from``: the fine-tune's first state is the base checkpoint's weights and architecture (a
    one-step fine-tune at learning rate 0 writes them back unchanged), its own settings are recorded,
    and a training step moves them; a checkpoint
    for another system or a missing file is refused."""
    import json

    quiet = _QUIET_SMALL
    base = _small_base(data20fs, tmp_path, steps=3)
    tuned = tmp_path / "tuned.pt"
    train("alanine_dipeptide", [str(data20fs)], tuned, tau_max_ps=0.04, steps=1, seed=2, device="cpu",
          config={**quiet, "torsion_weight": 4.0, "lr": 0.0}, init_from=base, progress=False)
    a, b = torch.load(base, weights_only=True), torch.load(tuned, weights_only=True)
    k = int(a["ema_updates"])  # the teacher continues the base's EMA (flowmap.EMA with warm-up)
    d = min(0.995, (1.0 + k) / (10.0 + k))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=0, rtol=0)
        torch.testing.assert_close(b["ema"][key], d * a["ema"][key] + (1 - d) * a["model"][key], atol=1e-6, rtol=1e-5)
    cfg = json.loads(b["train_config_json"])
    assert cfg["torsion_weight"] == 4.0 and cfg["init_from"] == str(base)
    assert json.loads(b["map_config_json"])["n_features"] == 16
    train("alanine_dipeptide", [str(data20fs)], tuned, tau_max_ps=0.04, steps=2, seed=2, device="cpu",
          config={**quiet, "torsion_weight": 4.0}, init_from=base, overwrite=True, progress=False)
    c = torch.load(tuned, weights_only=True)
    assert c["step"] == 2 and any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    with pytest.raises(InputError, match="no such checkpoint"):
        train("alanine_dipeptide", [str(data20fs)], tmp_path / "x.pt", steps=1, init_from=tmp_path / "none.pt",
              progress=False)


def test_torsion_drive_fine_tune_moves_only_the_drive(data20fs, tmp_path):
    """``init_from`` a map without a drive plus ``torsion_drive`` in the settings adds one (starting as
    the identity); ``train_only: torsion_drive`` with the ``torsion_crps`` objective then changes the
    drive's weights and leaves every other weight exactly as it was. A drive-less map with
    ``train_only`` is refused."""
    quiet = _QUIET_SMALL
    base = _small_base(data20fs, tmp_path, steps=2)
    tuned = tmp_path / "drive.pt"
    train("alanine_dipeptide", [str(data20fs)], tuned, tau_max_ps=0.04, steps=3, seed=2, device="cpu",
          config={**quiet, "torsion_drive": 8, "train_only": "torsion_drive", "objective": "torsion_crps",
                  "lr": 1e-2}, init_from=base, progress=False)
    a, b = torch.load(base, weights_only=True), torch.load(tuned, weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=0, rtol=0)
    drive = [k for k in b["model"] if k.startswith("drive.")]
    assert drive and set(b["model"]) - set(a["model"]) == set(drive)
    assert b["model"]["drive.mlp.4.weight"].abs().sum() > 0  # the zero-initialised last layer moved
    import json
    assert json.loads(b["map_config_json"])["torsion_drive"] == 8
    with pytest.raises(InputError, match="torsion drive"):
        train("alanine_dipeptide", [str(data20fs)], tmp_path / "x.pt", tau_max_ps=0.04, steps=1, device="cpu",
              config={**quiet, "train_only": "torsion_drive"}, init_from=base, progress=False)


@pytest.mark.parametrize("bins,landscape", [(0, 0), (24, 36)])
def test_cached_drive_fit_moves_only_the_drive(data20fs, tmp_path, bins, landscape):
    """``drive_cache_items`` fits the drive (implicit, or binned with a landscape) on cached
    items of the frozen map instead of the step loop: the drive moves, every other weight stays
    bit-identical, the EMA copy gets the same drive, the fit's history is recorded and its cache file
    is gone once the checkpoint is written; the map then samples."""
    import molflow

    quiet = _QUIET_SMALL
    base = _small_base(data20fs, tmp_path, steps=2)
    tuned = tmp_path / "drive.pt"
    train("alanine_dipeptide", [str(data20fs)], tuned, tau_max_ps=0.1, steps=20, seed=2, device="cpu",
          config={**quiet, "torsion_drive": 8, "torsion_drive_bins": bins, "torsion_drive_landscape": landscape,
                  "train_only": "torsion_drive",
                  "objective": "torsion_crps", "drive_cache_items": 64, "validation_items": 32, "batch_size": 32,
                  "lr": 1e-2, "drive_cache_draws": 3}, init_from=base, progress=False)
    fm = molflow.FlowMap.load(tuned, device="cpu")
    assert fm.model.config.torsion_drive_bins == bins and fm.model.config.torsion_drive_landscape == landscape
    out = fm.sample(molflow.sampling.start_states_from_run(str(data20fs), 2), n_jumps=2, tau_ps=0.1, seed=1, finish=0)
    assert np.isfinite(out["positions"]).all()
    a, b = torch.load(base, weights_only=True), torch.load(tuned, weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=0, rtol=0)
    assert b["model"]["drive.mlp.4.weight"].abs().sum() > 0
    if landscape:  # the learned landscape moved too
        assert b["model"]["drive.landscape"].abs().sum() > 0
    for key in b["model"]:
        if key.startswith("drive."):
            torch.testing.assert_close(b["model"][key], b["ema"][key], atol=0, rtol=0)
    assert b["step"] == 20
    import json
    rows = [r for r in json.loads(b["history_json"]) if "val_score" in r]
    assert rows and all(np.isfinite(r["val_score"]) for r in rows)
    assert not (tmp_path / "drive.pt.drive_cache.pt").exists()
    with pytest.raises(InputError, match="train_only"):
        train("alanine_dipeptide", [str(data20fs)], tmp_path / "x.pt", tau_max_ps=0.04, steps=1, device="cpu",
              config={**quiet, "drive_cache_items": 8}, init_from=base, progress=False)


@pytest.mark.parametrize("pair", [0, 12])
def test_landscape_refinement_after_training(data20fs, tmp_path, pair):
    """``landscape_ibi_iterations`` refines the drive's landscape after the fit
    (molflow.training.landscape_ibi): the same run without it gives every weight bit-identical but the
    landscape (and the pair table, with ``torsion_drive_landscape_pair``); model and EMA share the
    refined tables, each of which moved by at most damping x clip per node (0.7 x 2 kT); the record
    (one per rollout set) is in the checkpoint; a map without a landscape is refused."""
    import json

    base = _small_base(data20fs, tmp_path, steps=2)
    cfg = {**_QUIET_SMALL, "torsion_drive": 8, "torsion_drive_bins": 24, "torsion_drive_landscape": 36,
           "torsion_drive_landscape_pair": pair,
           "train_only": "torsion_drive", "objective": "torsion_crps", "drive_cache_items": 64,
           "validation_items": 32, "batch_size": 32, "lr": 1e-2, "drive_cache_draws": 3}
    ibi = {"landscape_ibi_iterations": 1, "landscape_ibi_replicas": 4, "landscape_ibi_jumps": 8,
           "landscape_ibi_skip_ps": 0.0, "landscape_ibi_frames": 2000}
    plain, refined = tmp_path / "plain.pt", tmp_path / "refined.pt"
    for out, extra in ((plain, {}), (refined, ibi)):
        train("alanine_dipeptide", [str(data20fs)], out, tau_max_ps=0.1, steps=20, seed=2, device="cpu",
              config={**cfg, **extra}, init_from=base, progress=False)
    a, b = torch.load(plain, weights_only=True), torch.load(refined, weights_only=True)
    tables = ["drive.landscape"] + (["drive.landscape_pair"] if pair else [])
    assert ("drive.landscape_pair" in a["model"]) == bool(pair)
    for key in a["model"]:
        if key not in tables:
            torch.testing.assert_close(a["model"][key], b["model"][key], atol=0, rtol=0)
    for key in tables:
        change = (b["model"][key] - a["model"][key]).abs()
        assert 0 < change.max() <= 0.7 * 2.0 + 1e-9, key
        torch.testing.assert_close(b["model"][key], b["ema"][key], atol=0, rtol=0)
    rec = json.loads(b["landscape_ibi_json"])
    assert len(rec["records"]) == 2 and rec["target_frames"] > 0
    assert ("js_pair_vs_data" in rec["records"][0]) == bool(pair)
    assert json.loads(a["landscape_ibi_json"]) is None
    with pytest.raises(InputError, match="landscape"):
        train("alanine_dipeptide", [str(data20fs)], tmp_path / "x.pt", tau_max_ps=0.1, steps=1, device="cpu",
              config={**_QUIET_SMALL, "landscape_ibi_iterations": 1}, progress=False)



def test_refine_landscape_weighs_rollouts_by_their_starts(data20fs, tmp_path):
    """``start_weights`` weigh each rollout's frames (molflow.training.landscape_ibi): equal weights
    give the unweighted refinement bit for bit, unequal ones another table; one weight per start and
    one rollout per start are required."""
    import molflow
    from molflow.training.landscape_ibi import LandscapeIBIConfig, refine_landscape

    base = _small_base(data20fs, tmp_path, steps=2)
    cfg = {**_QUIET_SMALL, "torsion_drive": 8, "torsion_drive_bins": 24, "torsion_drive_landscape": 36,
           "train_only": "torsion_drive", "objective": "torsion_crps", "drive_cache_items": 64,
           "validation_items": 32, "batch_size": 32, "lr": 1e-2, "drive_cache_draws": 3}
    out = tmp_path / "drive.pt"
    train("alanine_dipeptide", [str(data20fs)], out, tau_max_ps=0.1, steps=20, seed=2, device="cpu", config=cfg,
          init_from=base, progress=False)
    from molflow.sampling import start_states_from_run
    from molflow.trajectory import Trajectory

    with Trajectory(data20fs) as t:
        data = np.asarray(t.positions[:, :], dtype=np.float64).reshape(-1, t.positions.shape[2], 3)
    starts = start_states_from_run(data20fs, 4)
    ibi = LandscapeIBIConfig(iterations=1, replicas=4, jumps=8, burn_jumps=0)
    tables = []
    for sw in (None, np.ones(4), np.array([3.0, 0.2, 0.2, 0.6])):
        fm = molflow.FlowMap.load(out, device="cpu")
        refine_landscape(fm, data, starts, ibi, progress=False, start_weights=sw)
        tables.append(fm.model.drive.landscape.detach().numpy().copy())
    np.testing.assert_array_equal(tables[0], tables[1])
    assert np.abs(tables[2] - tables[0]).max() > 1e-6
    with pytest.raises(InputError, match="per start state"):
        refine_landscape(fm, data, starts, ibi, progress=False, start_weights=np.ones(3))
    with pytest.raises(InputError, match="one rollout per start"):
        refine_landscape(fm, data, starts, LandscapeIBIConfig(iterations=1, replicas=8, jumps=8), progress=False,
                         start_weights=np.ones(4))


def test_drive_fit_learns_a_torque_driven_drift():
    """A known answer: cached items whose MD torsion is the network's plus 0.4 tanh(torque feature)
    rad (a deterministic, mirror-odd drift) must be fitted; a drive that learned nothing misses by the
    drift's own spread (RMS ~0.25 rad), we ask for under a third of it after 400 steps."""
    from molflow.models.torsion_drive import TorsionDrive
    from molflow.training.drive_fit import DriveFitConfig, fit_drive

    g = torch.Generator().manual_seed(0)
    quads, kinds = np.array([[0, 1, 2, 3], [1, 2, 3, 4]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    drive = TorsionDrive(quads, kinds, np.array([1, 0]), np.ones((2, 5)), n_coefficients=3, hidden=16)

    def cache(n):
        D, Q = 3, 2
        inv = torch.randn(D, n, Q, 12, generator=g)
        pseudo = torch.randn(D, n, Q, 16, generator=g)
        pseudo[1:, ..., 2] = pseudo[0, ..., 2]  # the torque is a property of the start, not of the draw
        net = 3.0 * torch.rand(D, n, Q, generator=g) - 1.5
        net[1:] = net[0]
        return {"inv": inv, "pseudo": pseudo, "theta_net": net, "theta_md": net[0] + 0.4 * torch.tanh(pseudo[0, ..., 2]),
                "theta0": net[0], "tau": torch.full((n,), 0.5)}

    train, val = cache(4096), cache(512)
    cfg = DriveFitConfig(steps=400, batch_items=256, lr=1e-2)
    fit_drive(drive, train, val, torch.tensor([0.5, 1.4]), cfg, 0.5, progress=False, log_every=400)
    with torch.no_grad():
        delta = drive.delta(val["inv"], val["pseudo"], val["tau"][None].expand(3, -1))
    err = (val["theta_net"] + delta - val["theta_md"]).pow(2).mean().sqrt()
    spread = (val["theta_md"] - val["theta_net"][0]).pow(2).mean().sqrt()
    assert err < spread / 3, (float(err), float(spread))
