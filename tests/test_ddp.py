"""Data-parallel training (DDP): 2 gloo processes on CPU follow single-process training."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import molflow
from molflow import InputError
from molflow.training import distributed, loop

# batch 12 -> sub-batches local 5 (shards 3 + 2: unequal), direct 4, semigroup 4 (2 + 2)
TINY = dict(n_features=16, n_layers=2, batch_size=12, validate_every=10_000, checkpoint_every=4,
            validation_items=8, verdict_replicas=0)
KW = dict(tau_max_ps=0.06, seed=11, config=TINY, progress=False, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 replicas x 1 ps at 20 fs frames (51 frames each), N = 3."""
    path = tmp_path_factory.mktemp("ddp") / "data.h5"
    molflow.simulate("alanine_dipeptide", path, replicas=2, time_ps=1.0, frame_fs=20.0, n_coefficients=3,
                     equilibrate_ps=0.5, seed=5, progress=False).close()
    return str(path)


class _Interrupted(Exception):
    pass


def _interrupted_rank(ctx, args):
    """A rank that notes every checkpoint it writes, is interrupted after step 4 (every rank, as a
    killed job would be) and resumes from the checkpoint on disk. The spawned processes run this
    instead of loop._train_rank: ``launch`` is patched in the parent; the function travels by name."""
    real_save, real_step = loop.save_checkpoint, loop.Trainer.train_step
    interrupted = []

    def save(path, payload):
        with open(f"{path}.saves", "a") as fh:
            fh.write(f"{ctx.rank} {payload['step']}\n")
        real_save(path, payload)

    def step(self):
        if self.step == 4 and not interrupted:
            interrupted.append(True)
            raise _Interrupted
        return real_step(self)

    loop.save_checkpoint, loop.Trainer.train_step = save, step
    try:
        loop._train_rank(ctx, args)
    except _Interrupted:
        # a killed job restarts every rank after rank 0's checkpoint is on disk; without this barrier a
        # fast rank 1 could look for it before rank 0 wrote it and start a fresh run (1 in 5 runs here)
        ctx.barrier()
        loop._train_rank(ctx, {**args, "resume": True})


def _losses(path):
    rows = list(csv.DictReader(open(f"{path}.metrics.csv")))
    # the semigroup column is absent while its teacher-quality gate is shut (8 steps: always here)
    return np.array([[float(r.get(k) or "nan") for k in ("loss", "local", "direct", "semigroup")] for r in rows]), rows


def test_two_processes_follow_one_and_resume(data, tmp_path, monkeypatch):
    """8 steps of 2-process DDP (interrupted after 4 and resumed) vs 8 steps in one process, same
    seed and global batch.

    The shards' union is exactly the single process's batch (same items, same latents, gradients
    weighted per item), so the runs differ only by float32 rounding: per-item forward passes in
    other batch shapes and a gradient sum in another order. Measured (energy objective, and
    issue #10's whitened_crps with start-state noise): losses agree to ~5e-8 (relative) at step 1,
    the gap growing through this hot, clipped optimisation to <= 7.3e-6 by step 8; final weights
    (model and EMA) to <= 2.7e-7 absolute (2.4e-5 with issue 16's zero-initialised read-out). We allow 1e-4 and 1e-4: over 10x the rounding, and far
    below what a real mismatch gives (measured by breaking it on purpose: per-rank latents differ
    by 7e-2 at step 1, an unweighted gradient average over the unequal local shards 3 + 2 by 3e-3
    from step 2; a mismatched gradient moves AdamW's normalised updates by O(lr) = 1e-3 a step)."""
    torch.set_num_threads(1)
    one = molflow.train("alanine_dipeptide", [data], tmp_path / "one.pt", steps=8, **KW)

    real_launch = distributed.launch
    monkeypatch.setattr(distributed, "launch", lambda fn, n, kind, *a: real_launch(_interrupted_rank, n, kind, *a))
    two = molflow.train("alanine_dipeptide", [data], tmp_path / "two.pt", steps=8, devices=2, **KW)

    # rank 0 alone writes: at the checkpoint step 4 and at the end
    assert open(f"{two}.saves").read().split("\n")[:-1] == ["0 4", "0 8"]
    assert not list(tmp_path.glob("*.tmp"))

    l1, rows1 = _losses(one)
    l2, rows2 = _losses(two)
    assert l1.shape == l2.shape == (8, 4) and [r["step"] for r in rows2] == [str(s) for s in range(1, 9)]
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    ck1, ck2 = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert ck2["step"] == 8 and ck2["seed"] == 11
    for key in ("model", "ema"):
        for name, w in ck1[key].items():
            # 1e-4: measured 2.4e-5 since the read-out starts at zero (issue 16), where AdamW's
            # normalised update turns rounding-level gradient differences into visible ones; a real
            # mismatch moves weights by O(lr) = 1e-3 a step
            torch.testing.assert_close(ck2[key][name], w, rtol=0, atol=1e-4)
    # the same random streams continue after the run (a later resume on 1 or N processes agrees)
    assert json.loads(ck2["numpy_rng_json"]) == json.loads(ck1["numpy_rng_json"])
    torch.testing.assert_close(ck2["torch_rng"], ck1["torch_rng"], rtol=0, atol=0)


def test_devices_guards(data, tmp_path):
    from molflow.cli import main

    assert main(["--quiet", "train", "alanine_dipeptide", "--data", data, "--out", str(tmp_path / "c.pt"),
                 "--devices", "0", "--device", "cpu"]) == 2
    with pytest.raises(InputError, match="--devices must be >= 1"):
        molflow.train("alanine_dipeptide", [data], tmp_path / "m.pt", steps=1, devices=0, **KW)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="torch sees no CUDA GPU"):
            molflow.train("alanine_dipeptide", [data], tmp_path / "m.pt", steps=1, devices=2,
                          **{**KW, "device": "cuda"})
    else:
        n = torch.cuda.device_count()
        with pytest.raises(InputError, match=f"torch sees {n} CUDA GPU"):
            molflow.train("alanine_dipeptide", [data], tmp_path / "m.pt", steps=1, devices=n + 1,
                          **{**KW, "device": "cuda"})
