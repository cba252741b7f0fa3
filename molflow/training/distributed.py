"""Data-parallel training on several devices with torch DistributedDataParallel (DDP).

    molflow train SYSTEM --data run.h5 --out model.pt --devices 4        # spawns 4 processes
    torchrun --nproc-per-node 4 -m molflow train SYSTEM --data ... --out model.pt   # or torchrun does

One process per device (``nccl`` on CUDA, ``gloo`` on CPU). Every rank builds the same
:class:`~molflow.training.loop.Trainer` (same seed, so the same initial weights, EMA teacher and
random streams; the weights are also broadcast from rank 0), then :func:`distribute` wraps it:

- **Sharded batches, one global batch.** Every rank advances the *same* random streams and draws
  the indices of the whole global batch (a few integers), then materialises only its own contiguous
  shard (about global/N items: the composed coefficients and the device copies are the per-item
  work). The union of the shards is exactly the batch a single process with the same seed draws,
  and the streams stay identical on every rank, so rank 0's checkpoint resumes every rank.
- **The same random numbers.** Every draw from the trainer's generator while a shard is active
  (the student's and the EMA teacher's latents, noise on start states) is drawn for the global
  batch and sliced the same way (:class:`_ShardedDraws`), so each item sees the numbers it would
  see in one process and the generator stays in step on every rank.
- **Exact gradient weights.** DDP averages gradients over ranks; a rank holding l of the G items
  of a sub-batch scales its gradient for that sub-loss by N l / G (an identity on the model's
  outputs whose backward multiplies), so the all-reduced gradient is that of the single-process
  mean over the G items even when G is not a multiple of N. Losses are per-item means (the
  scoring rules score each item against its own latent draws), which is what makes this exact.
- The EMA teacher is not wrapped: it is updated from the all-reduced (identical) weights on every
  rank, so it stays identical without communication.
- Rank 0 alone validates, logs, shows the progress bar and writes checkpoints; logged losses are
  the global means (one small all-reduce per step).

So a run on N processes follows the single-process run with the same seed and global batch up to
float rounding (different batch shapes and the order of the gradient sum); ``tests/test_ddp.py``
checks it with 2 CPU processes.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import InputError, MolflowError

#: sub-losses of ``Trainer.train_step`` and the config fields that weight them in the total
SUB_LOSSES = {"local": "fraction_local", "direct": "fraction_direct", "semigroup": "fraction_semigroup"}


@dataclasses.dataclass
class Context:
    """This process's place in a distributed run."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun (or any ``env://`` launcher) with
    more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def check_devices(device: torch.device, n: int) -> None:
    """Refuse N processes that the hardware cannot hold (CPU: any N)."""
    if n < 1:
        raise InputError(f"--devices must be >= 1, not {n}")
    if device.type == "cuda":
        if device.index is not None and n > 1:
            raise InputError(f"--device {device} names one GPU; with --devices {n} pass --device cuda "
                             "(ranks use GPUs 0..N-1; CUDA_VISIBLE_DEVICES picks which)")
        have = torch.cuda.device_count()
        if n > have:
            raise InputError(f"--devices {n}: torch sees {have} CUDA GPU(s) here")


def init(rank: int, world: int, local_rank: int, device_type: str, init_method: str = "env://") -> Context:
    """Join the process group; each rank gets its own GPU (``cuda:local_rank``) or the CPU."""
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kw = {} if init_method == "env://" else {"rank": rank, "world_size": world}
        dist.init_process_group(backend, init_method=init_method, **kw)
    return Context(rank, world, local_rank, device)


# ----------------------------------------------------------------------------- spawning


def launch(fn: Callable[..., Any], nprocs: int, device_type: str, *args: Any) -> None:
    """Run ``fn(ctx, *args)`` in ``nprocs`` fresh processes joined in one group (``fn`` must be a
    module-level function). A MolflowError in a rank is raised here with its class and message."""
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix="molflow-ddp-")
    try:
        procs = mp.spawn(_entry, args=(fn, nprocs, device_type, tmp, args), nprocs=nprocs, join=False)
        try:
            while not procs.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            for r in range(nprocs):
                err = os.path.join(tmp, f"error.{r}")
                if os.path.exists(err):
                    kind, _, message = open(err).read().partition("\n")
                    from .. import errors

                    raise getattr(errors, kind, MolflowError)(message) from None
            raise RuntimeError(f"a training process failed:\n{exc}") from None
        except BaseException:  # Ctrl-C, SIGTERM (the CLI turns it into KeyboardInterrupt): end the ranks too
            for proc in procs.processes:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs.processes:
                proc.join(30)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _entry(rank: int, fn, world: int, device_type: str, tmp: str, args: tuple) -> None:
    if device_type == "cpu":  # N processes share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    ctx = init(rank, world, rank, device_type, init_method=f"file://{os.path.join(tmp, 'store')}")
    try:
        fn(ctx, *args)
    except MolflowError as exc:
        with open(os.path.join(tmp, f"error.{rank}"), "w") as fh:
            fh.write(f"{type(exc).__name__}\n{exc}")
        raise
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the wrapped trainer


class _DDP(DistributedDataParallel):
    """DDP that still looks like the molecular map to the trainer: attributes (``v_th``,
    ``sample_latent``, ...) and the state dict are the wrapped module's; outputs carry the
    gradient scale of the current shard."""

    def __init__(self, module, shards: "ShardedFrames", **kw):
        super().__init__(module, **kw)
        self._shards = shards

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)

    def forward(self, *inputs, **kwargs):
        out = super().forward(*inputs, **kwargs)
        scale = self._shards.grad_scale()
        if scale == 1.0 or not torch.is_grad_enabled():
            return out
        return tuple(_ScaleGrad.apply(t, scale) for t in out)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class ShardedFrames:
    """A FrameData view that hands this rank its contiguous shard of every training draw.

    ``draw`` (split ``train``) draws the global indices with the shared stream and keeps rows
    ``[start, stop)``; the current shard is remembered for the latents and the gradient scale.
    Validation draws pass through whole. Everything else is the wrapped FrameData's.
    """

    def __init__(self, data, rank: int, world: int):
        self._data, self.rank, self.world = data, rank, world
        self.current: tuple[int, int, int] | None = None  # (global size, start, stop)
        self.draws: _ShardedDraws | None = None
        self.step_shards: list[tuple[int, int]] = []  # (local, global) sizes of this step's draws

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def draw(self, size: int, k: int, rng: np.random.Generator, split: str = "train"):
        r, f = self._data.draw(size, k, rng, split)
        if split != "train":
            self.current = None
            return r, f
        if size < self.world:
            raise InputError(f"a training sub-batch of {size} item(s) cannot be split over {self.world} "
                             "processes: raise batch_size (each of the local/direct/semigroup shares must "
                             "hold at least one item per process)")
        start, stop = size * self.rank // self.world, size * (self.rank + 1) // self.world
        self.current = (size, start, stop)
        self.step_shards.append((stop - start, size))
        return r[start:stop], f[start:stop]

    def batch(self, size: int, k: int, rng: np.random.Generator, split: str = "train", device="cpu",
              dtype=torch.float32):
        return self.items(*self.draw(size, k, rng, split), k, device, dtype)

    def grad_scale(self) -> float:
        if self.current is None:
            return 1.0
        size, start, stop = self.current
        return self.world * (stop - start) / size


class _ShardedDraws:
    """While active, the trainer's ``randn`` (the one seam every random draw of a training step goes
    through: the student's and the EMA teacher's latents, noise on start states) draws for the global
    batch and keeps the shard's rows: a draw whose leading dimension is m x the shard's n items (the
    losses repeat items m times, layout (m, n)) is drawn as m x G and sliced, so the generator stays
    in step on every rank. Draws outside a shard (validation) pass through."""

    def __init__(self, shards: "ShardedFrames", trainer):
        self.shards, self.trainer, self.saved = shards, trainer, None

    def __enter__(self) -> "_ShardedDraws":
        self.saved = self.trainer.randn
        self.trainer.randn = self._draw
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            del self.trainer.randn  # the class's method again
            self.saved = None

    def _draw(self, *shape: int) -> torch.Tensor:
        if self.shards.current is None:
            return self.saved(*shape)
        total, start, stop = self.shards.current
        n = stop - start
        if not shape or shape[0] % n:
            raise RuntimeError(f"a random draw of shape {tuple(shape)} from the trainer does not fit a shard of "
                               f"{n} items: molflow.training.distributed must learn its layout")
        m = shape[0] // n
        z = self.saved(m * total, *shape[1:])
        return z.view(m, total, *shape[1:])[:, start:stop].reshape(shape)


def distribute(trainer, ctx: Context) -> ShardedFrames:
    """Turn a built (and, when resuming, loaded) Trainer into this rank's part of a DDP run."""
    raw = trainer.model
    for module in (raw, trainer.ema):  # identical already (same seed / same checkpoint): make sure
        for tensor in module.state_dict().values():
            dist.broadcast(tensor.data, src=0)
    shards = ShardedFrames(trainer.data, ctx.rank, ctx.world)
    trainer.data = shards
    shards.draws = _ShardedDraws(shards, trainer).__enter__()
    kw = dict(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    kw["forward_sync_buffers" if "forward_sync_buffers" in _ddp_params() else "broadcast_buffers"] = False
    trainer.model = _DDP(raw, shards, **kw)  # buffers (masses, v_th, ...) are constants
    trainer.agree = lambda flag: _all_ranks(flag, ctx.device)  # one decision for every rank (semigroup gate)
    return shards


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` is true on every rank (collective: every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def _ddp_params() -> set[str]:
    import inspect

    return set(inspect.signature(DistributedDataParallel.__init__).parameters)


def undistribute(trainer) -> None:
    """Give the trainer its plain model and data back (after the run)."""
    if isinstance(trainer.model, _DDP):
        trainer.model = trainer.model.module
    if isinstance(trainer.data, ShardedFrames):
        trainer.data.draws.__exit__(None, None, None)
        trainer.data = trainer.data._data


def reduce_row(row: dict[str, float], shards: ShardedFrames, config, device: torch.device) -> dict[str, float]:
    """The global-batch values of a step's logged losses: each sub-loss is the item-weighted mean
    over ranks, the total is recomputed from them with the config's fractions. Collective: every
    rank must call it."""
    keys = [k for k in row if k in SUB_LOSSES]
    weights = [n / size for n, size in shards.step_shards]
    if len(weights) != len(keys):  # a draw pattern this code does not know: plain average
        weights = [1.0 / shards.world] * len(keys)
    vals = torch.tensor([row[k] * w for k, w in zip(keys, weights)] + [row["loss"] / shards.world],
                        dtype=torch.float64, device=device)
    dist.all_reduce(vals)
    out = dict(row)
    for k, v in zip(keys, vals.tolist()):
        out[k] = v
    if len(keys) == len(shards.step_shards):
        out["loss"] = sum(getattr(config, SUB_LOSSES[k]) * out[k] for k in keys)
    else:
        out["loss"] = float(vals[-1])
    shards.step_shards.clear()
    return out
