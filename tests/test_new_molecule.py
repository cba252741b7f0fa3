"""A new molecule end to end (user story 2), training that cannot fail silently, maps that cannot
break a molecule: a capped dipeptide that is not built in (ACE-GLY-NME, from a PDB this test
writes) through the command line; injected NaN losses; a hand-made NaN checkpoint; the untrained
map's bonds; the sampler's named guard errors; resume that keeps the schedule."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import molflow
from molflow import InputError, SimulationError
from molflow.checkpoint import load_checkpoint, save_checkpoint
from molflow.cli import main
from molflow.errors import TrainingError
from molflow.models.molecular import MapConfig, build_model
from molflow.sampling import BOND_RANGE, FlowMap, start_states_from_run
from molflow.training.data import FrameData
from molflow.training.loop import Trainer, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_features=16, n_layers=2, batch_size=12, validate_every=10_000, checkpoint_every=10_000,
            verdict_replicas=0)


def _new_molecule_module():
    spec = importlib.util.spec_from_file_location("new_molecule", ROOT / "benchmarks" / "new_molecule.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bond_ratio(system, x, x_ref):
    b = np.asarray(system.bonds, dtype=int).reshape(-1, 2)
    bl = lambda y: np.linalg.norm(y[:, b[:, 0]] - y[:, b[:, 1]], axis=-1)  # noqa: E731
    return bl(x) / bl(x_ref)


def test_new_capped_dipeptide_end_to_end_through_the_cli(tmp_path, capsys):
    """simulate -> train (short) -> sample (at the trained tau_max) -> evaluate -> info, for a
    peptide the user brings as a PDB: no NaN, no stopped replica, the verdict printed, every file valid."""
    pdb = _new_molecule_module().write_glycine_dipeptide(tmp_path / "ace_gly_nme.pdb")
    data, ref, model, samples = (tmp_path / n for n in ("data.h5", "ref.h5", "model.pt", "s.h5"))
    assert main(["--quiet", "simulate", str(pdb), "--out", str(data), "--replicas", "2", "--time-ps", "6",
                 "--frame-fs", "20", "--equilibrate-ps", "2", "--seed", "3"]) == 0
    assert main(["--quiet", "simulate", str(pdb), "--out", str(ref), "--replicas", "2", "--time-ps", "20",
                 "--frame-fs", "100", "--equilibrate-ps", "2", "--seed", "4"]) == 0
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_features: 16\nn_layers: 2\nbatch_size: 12\nfinish_steps: 20\nverdict_replicas: 4\n"
                   "verdict_jumps: 5\nvalidate_every: 1000\n")
    capsys.readouterr()
    assert main(["train", str(pdb), "--data", str(data), "--out", str(model),
                 "--tau-max-ps", "0.1", "--steps", "60", "--seed", "5", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "verdict: STABLE at tau 0.1 ps" in err, err[-2000:]
    # a re-typed command does not overwrite hours of training
    assert main(["--quiet", "train", str(pdb), "--data", str(data), "--out", str(model), "--steps", "2"]) != 0
    assert "exists: pass --resume" in capsys.readouterr().err
    assert main(["--quiet", "sample", str(model), "--from", str(data), "--out", str(samples), "--replicas", "4",
                 "--jumps", "10", "--seed", "6"]) == 0
    with molflow.Trajectory(samples) as s:
        assert s.n_frames == 11 and s.attrs["n_stopped"] == 0 and s.attrs["status"] == "complete"
        assert s.attrs["finish_steps"] == 20  # the checkpoint's recommendation
        assert np.isfinite(np.asarray(s.positions)).all() and np.isfinite(np.asarray(s.velocities)).all()
        ratio = _bond_ratio(s.system(), np.asarray(s.positions[:, -1], dtype=np.float64),
                            np.asarray(s.positions[:, 0], dtype=np.float64))
        assert ((ratio > BOND_RANGE[0]) & (ratio < BOND_RANGE[1])).all()
    # a tau above the trained tau_max is refused without --extrapolate
    assert main(["--quiet", "sample", str(model), "--from", str(data), "--out", str(tmp_path / "x.h5"),
                 "--tau-ps", "0.2", "--jumps", "2"]) != 0
    assert "above the longest jump" in capsys.readouterr().err
    assert main(["--quiet", "evaluate", "--reference", str(ref), "--samples", str(samples),
                 "--report", str(tmp_path / "rep")]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert math.isfinite(metrics["stationary"]["js_phi_psi"])
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    assert "verdict: STABLE at tau 0.1 ps" in capsys.readouterr().out


def test_nan_losses_are_skipped_then_restored_then_stop_training(data20fs, tmp_path, monkeypatch):
    """An injected bad batch (NaN loss) is skipped and counted; max_bad_steps in a row restore the
    last good state with half the learning rate; past max_restores training stops with an error
    naming the loss term and the step; no checkpoint with a non-finite weight is ever written."""
    sys_ = molflow.load_system("alanine_dipeptide")
    cfg = TrainConfig(**{k: v for k, v in TINY.items() if k in TrainConfig.__dataclass_fields__},
                      steps=100, tau_max_ps=0.04, max_bad_steps=3, max_restores=2)
    tr = Trainer(sys_, FrameData([str(data20fs)]), cfg, MapConfig(n_features=16, n_layers=2), torch.device("cpu"), 1)
    for _ in range(5):
        assert tr.train_step()["skipped"] == 0
    good = {k: v.clone() for k, v in tr.model.state_dict().items()}
    real = tr._jump_loss
    poison = {"on": True}

    def bad_local(b, model=None):  # the local loss of every step turns NaN while poisoned
        out = real(b, model)
        return out * float("nan") if poison["on"] and model is None else out

    monkeypatch.setattr(tr, "_jump_loss", bad_local)
    rows = [tr.train_step() for _ in range(2)]
    assert [r["skipped"] for r in rows] == [1, 1] and tr.counts["skipped_steps"] == 2
    for k, v in tr.model.state_dict().items():  # skipped: the weights did not move
        torch.testing.assert_close(v, good[k], atol=0, rtol=0)
    tr.train_step()  # the third in a row: restore, learning rate halved
    assert tr.counts["restores"] == 1 and tr.lr_scale == 0.5
    poison["on"] = False
    assert tr.train_step()["skipped"] == 0  # recovered
    path = tmp_path / "ok.pt"
    save_checkpoint(path, tr.state())
    assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values())
    poison["on"] = True
    with pytest.raises(TrainingError, match=r"step \d+: .*local loss was non-finite"):
        for _ in range(20):
            tr.train_step()
    # weights broken in memory can never reach the disk
    broken = tr.state()
    next(iter(broken["model"].values())).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite|NaN"):
        save_checkpoint(tmp_path / "nan.pt", broken)
    assert not (tmp_path / "nan.pt").exists()


def test_a_hand_made_nan_checkpoint_is_refused(data20fs, tmp_path):
    path = tmp_path / "m.pt"
    train("alanine_dipeptide", [str(data20fs)], path, tau_max_ps=0.04, steps=2, seed=1, config=TINY, progress=False)
    ck = torch.load(path, weights_only=True)
    name = next(k for k in ck["ema"] if k.startswith("net."))
    ck["ema"][name] = torch.full_like(ck["ema"][name], float("nan"))
    torch.save(ck, tmp_path / "nan.pt")  # written by hand, around molflow's guard
    with pytest.raises(InputError, match="NaN or infinity.*ema"):
        FlowMap.load(tmp_path / "nan.pt")
    with pytest.raises(InputError, match="HDF5 file .* not a molflow flow-map checkpoint"):
        FlowMap.load(data20fs)


def test_the_untrained_map_keeps_every_bond(data20fs):
    """At initialisation the correction is exactly zero (zero-initialised read-out), so the map is its
    identity base and no bond moves at tau = 0.02-0.1 ps, whatever the coefficients and latents."""
    sys_ = molflow.load_system("alanine_dipeptide")
    fm = FlowMap(build_model(sys_, MapConfig(n_features=16, n_layers=2)), sys_, 0.02)
    x0, v0 = start_states_from_run(data20fs, 8)
    for tau in (0.02, 0.05, 0.1):
        out = fm.sample((x0, v0), n_jumps=3, tau_ps=tau, seed=2, finish=0)
        assert out["restarts_per_replica"].sum() == 0
        ratio = _bond_ratio(sys_, out["positions"][:, -1].astype(np.float64), x0)
        np.testing.assert_allclose(ratio, 1.0, atol=1e-5)


def test_a_briefly_trained_map_does_no_worse_than_its_base(data20fs, tmp_path):
    """30 optimiser steps from the safe base: free-running at 0.02-0.1 ps with the sampler's default
    (the checkpoint's recommended physical finish), no replica trips the guards (the base never does)."""
    path = tmp_path / "m30.pt"
    train("alanine_dipeptide", [str(data20fs)], path, tau_max_ps=0.1, steps=30, seed=3, config=TINY, progress=False)
    fm = FlowMap.load(path, device="cpu")
    x0, v0 = start_states_from_run(data20fs, 8)
    for tau in (0.02, 0.1):
        out = fm.sample((x0, v0), n_jumps=5, tau_ps=tau, seed=4)
        # no replica lost; restarts within the verdict's "stable" allowance (1 per 10 jumps)
        assert (out["stopped_at_jump"] < 0).all() and out["restarts_per_replica"].sum() <= 8 * 5 / 10
    assert fm.default_finish().n_steps == 20


def test_sampler_error_names_the_guard_the_bond_and_the_jump(data20fs):
    sys_ = molflow.load_system("alanine_dipeptide")
    model = build_model(sys_, MapConfig(n_features=16, n_layers=2))
    fm = FlowMap(model, sys_, 0.02, {"path": "bad.pt", "train_config": {"tau_max_ps": 0.1}})
    real = model.forward

    def wild(x, v, L, eps, tau):  # a wildly wrong map: every atom thrown 0.1 nm at random
        xt, vt = real(x, v, L, eps, tau)
        return xt + 0.1 * eps[:, 0], vt

    model.forward = wild
    x0, v0 = start_states_from_run(data20fs, 2)
    with pytest.raises(SimulationError) as err:
        fm.sample((x0, v0), n_jumps=3, tau_ps=0.1, seed=1, max_retries=2, finish=0)
    msg = str(err.value)
    assert "at jump 1" in msg and "bond guard:" in msg and "x its start length" in msg
    assert "molflow info bad.pt" in msg and "train longer" in msg and "--finish-steps" in msg


def test_a_jump_that_inverts_a_stereocentre_is_redrawn(data20fs):
    """A map that turns L-alanine into its mirror image trips the chirality guard: the replica is
    restarted, and one that keeps inverting is stopped with the guard named. A map that mirrors only
    every other draw is rescued by its restarts: every frame keeps the start's handedness."""
    from molflow.boltzmann.geometry import ChiralityChecker

    sys_ = molflow.load_system("alanine_dipeptide")
    model = build_model(sys_, MapConfig(n_features=16, n_layers=2))
    fm = FlowMap(model, sys_, 0.02, {"path": "mirror.pt"})
    real = model.forward
    calls = {"n": 0}

    def mirror(x, v, L, eps, tau, every=1):
        xt, vt = real(x, v, L, eps, tau)
        calls["n"] += 1
        return (-xt if calls["n"] % every == 0 else xt), vt  # point inversion: every centre inverted

    x0, v0 = start_states_from_run(data20fs, 2)
    model.forward = mirror
    with pytest.raises(SimulationError) as err:
        fm.sample((x0, v0), n_jumps=2, tau_ps=0.02, seed=1, max_retries=2, finish=0)
    assert "chirality guard: stereocentre" in str(err.value) and "CA" in str(err.value)
    model.forward = lambda *a: mirror(*a, every=2)
    calls["n"] = 0
    out = fm.sample((x0, v0), n_jumps=4, tau_ps=0.02, seed=1, max_retries=3, finish=0)
    chk = ChiralityChecker.for_system(sys_)
    assert (chk.classify(out["positions"].astype(np.float64)) == 1).all()
    assert out["restarts_per_replica"].sum() >= 1 and (out["stopped_at_jump"] < 0).all()


def test_resume_with_more_steps_keeps_the_schedule(data20fs, tmp_path):
    """A finished run extended with --resume --steps keeps its planned LR schedule and curriculum
    (it goes on at the final learning rate), instead of re-planning them for the new total."""
    path = tmp_path / "r.pt"
    cfg = {**TINY, "lr_min_factor": 0.05}
    train("alanine_dipeptide", [str(data20fs)], path, tau_max_ps=0.06, steps=10, seed=2, config=cfg, progress=False)
    train("alanine_dipeptide", [str(data20fs)], path, tau_max_ps=0.06, steps=14, resume=True, config=cfg,
          progress=False)
    hist = json.loads(torch.load(path, weights_only=True)["history_json"])
    assert [h["step"] for h in hist] == list(range(1, 15))
    lr = [h["lr"] for h in hist]
    assert lr[9:] == pytest.approx([1e-3 * 0.05] * 5)  # steps 10-14: the schedule's end, not a new cosine
    assert all(h["tau_max_ps"] == pytest.approx(0.06) for h in hist[9:])
