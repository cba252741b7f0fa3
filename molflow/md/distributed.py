"""Reference MD on a Dask cluster: one task per group of replicas, one HDF5 shard per task.

    molflow simulate alanine_dipeptide --out run.h5 --replicas 64 --executor dask [--scheduler tcp://host:8786]

The run is planned exactly as a local run would be (:func:`~molflow.md.engine.plan_layout`, with
the cluster's worker threads as the cores): replicas are grouped into multi-copy OpenMM Contexts of
``copies_per_context`` copies, and group ``g`` becomes Dask task ``g``, which runs the ordinary
engine (:func:`~molflow.md.engine.simulate` with ``group_offset=g``) into its own run file
``run.h5.shards/shard-<g>.h5``. Seeds follow the group's index in the whole run
(``derive_seed(seed, g, ...)``), never the worker or the order tasks ran in, so for the same seed,
platform and ``copies_per_context`` a Dask run equals a local run bit for bit. On the Reference and
CPU platforms the engine draws the per-step Gaussians itself, from a stream keyed by the run's seed
and the group's index (:class:`~molflow.md.integrator.HostNoise`), so any ``workers`` give the same
run. (OpenMM's own integrator random numbers, which the engine uses on a GPU, come from one stream
per process on those platforms, and groups sharing a process would interleave them; a shard runs
alone in its process, one at a time per Dask worker process, so its numbers depend on its seed and
index only either way.)

``run.h5`` itself is an HDF5 file of virtual datasets (h5py VDS) concatenating the shards along the
replica axis, with relative source paths (``run.h5`` and ``run.h5.shards/`` move together) and the
attributes of a normal run plus ``executor="dask"``, ``shards`` and ``shard_frames``; it exposes the
frames complete in every shard. It is rewritten (atomically) whenever a shard finishes, so a partial
run is readable. ``wall_clock_s`` is the sum over shards (compute seconds, not elapsed time;
``elapsed_s`` is the client's elapsed time).

Every shard task resumes its own file (``resume=True``): a task whose worker died is rerun by Dask
on another worker and continues from the shard's last complete frame and its OpenMM checkpoint,
exactly as a local ``--resume``; ``--resume`` of the whole run submits only the shards that are not
complete. Nothing is written twice: a shard is only ever appended after its last complete frame.

The client and the workers must see the same filesystem (shard paths are absolute on the workers).
A LocalCluster starts its workers with ``spawn``, which re-imports the calling script: guard a
script that calls ``simulate(..., executor="dask")`` with ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import InputError, MolflowError, SimulationError
from ..seeding import random_seed
from ..systems import MolecularSystem, load_system
from ..trajectory import FORMAT_NAME, FORMAT_VERSION, Trajectory
from .engine import (GPU_PLATFORMS, RESUME_KEYS, check_settings, hardware_description, plan_layout, register_executor,
                     resolve_platform, run_attrs, settings_differ)
from .multicopy import default_cutoff_nm

INSTALL_HINT = 'pip install "molflow[dask]"'
# OpenMM's Reference and CPU platforms draw the custom integrator's random numbers from one stream per
# process (reseeded when a Context is made): two shards sharing a worker process at the same time
# would interleave their draws. The engine no longer uses those numbers there (host noise), but a
# shard's run should not hinge on that: shards in one process run one at a time.
_PROCESS_LOCK = threading.Lock()


def shards_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_path(out: str | os.PathLike, index: int) -> Path:
    return shards_dir(out) / f"shard-{index:04d}.h5"


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise InputError(f"--executor dask needs Dask, which is not installed: {INSTALL_HINT}") from None
    return distributed


# ----------------------------------------------------------------------------- on the workers


def _run_shard(mol_spec: dict, path: str, replicas: int, group_offset: int, settings: dict) -> dict:
    """One Dask task: run (or continue) one shard with the ordinary engine."""
    from ..systems import system_from_pdb_text
    from .engine import simulate

    mol = system_from_pdb_text(**mol_spec)
    lock = _PROCESS_LOCK if settings["platform"] not in GPU_PLATFORMS else threading.Lock()
    with lock, simulate(mol, path, replicas=replicas, group_offset=group_offset, resume=True, progress=False,
                        workers=1, **settings) as t:
        return {"shard": group_offset, "n_frames": t.n_frames, "wall_clock_s": float(t.attrs["wall_clock_s"])}


# ----------------------------------------------------------------------------- the manifest


def write_manifest(out: str | os.PathLike, attrs: dict[str, Any], sizes: list[int], n_atoms: int) -> int:
    """(Re)write ``out`` as virtual datasets over the shards; returns its complete frames.

    Maps the frames complete in every shard (each shard's ``n_frames``); shards not started count
    as 0. Written to a temporary file and renamed, so readers see the old or the new manifest.
    """
    out = Path(out)
    R, A, N = sum(sizes), int(n_atoms), int(attrs["n_coefficients"])
    infos: list[dict | None] = []
    for i in range(len(sizes)):
        info = None
        p = shard_path(out, i)
        if p.exists():
            try:
                with Trajectory(p) as t:
                    info = {"n_frames": t.n_frames, "attrs": t.attrs}
            except InputError:
                info = None
        infos.append(info)
    n = min(info["n_frames"] if info else 0 for info in infos)
    rel = [os.path.relpath(shard_path(out, i), out.parent) for i in range(len(sizes))]
    shapes = {"positions": ((R, n, A, 3), "f4"), "velocities": ((R, n, A, 3), "f4"),
              "forces": ((R, n, A, 3), "f4"), "potential_energy": ((R, n), "f8"),
              "brownian": ((R, max(n - 1, 0), N, A, 3), "f4"), "time": ((n,), "f8")}
    done = [info for info in infos if info]
    merged = dict(attrs)
    merged.update(executor="dask", shards=rel, shard_frames=[info["n_frames"] if info else 0 for info in infos],
                  wall_clock_s=float(sum(info["attrs"].get("wall_clock_s", 0.0) for info in done)),
                  n_restarts=int(sum(info["attrs"].get("n_restarts", 0) for info in done)))
    hardware = sorted({str(info["attrs"]["hardware"]) for info in done if "hardware" in info["attrs"]})
    if hardware:
        merged["hardware"] = "; ".join(hardware)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:  # default libver, no SWMR (DESIGN.md section 5)
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in merged.items():
            f.attrs[key] = _attr(value)
        for name, (shape, dtype) in shapes.items():
            if 0 in shape:  # nothing to map (no complete frame yet, or no coefficients recorded)
                f.create_dataset(name, shape=shape, dtype=dtype)
                continue
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            if name == "time":  # every shard has the same time axis
                layout[:] = h5py.VirtualSource(rel[0], "time", shape=shape)[:n]
            else:
                r0 = 0
                for size, path in zip(sizes, rel):
                    src = h5py.VirtualSource(path, name, shape=(size,) + shape[1:], dtype=dtype)
                    layout[r0:r0 + size] = src[:, :shape[1]]
                    r0 += size
            f.create_virtual_dataset(name, layout, fillvalue=np.nan)  # an unreadable source shows as NaN
        f.attrs["n_frames"] = n
    os.replace(tmp, out)
    return n


def _attr(value: Any) -> Any:
    import json

    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else value


def _shard_frames(path: Path) -> int | None:
    """Complete frames of a shard being written (None when it cannot be read right now)."""
    if not path.exists():
        return 0
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("n_frames", 0))
    except (OSError, KeyError, ValueError):
        return None


def _recorded(out: Path) -> dict[str, Any]:
    """Settings of an existing Dask run (from its manifest), for resume."""
    if not out.exists():
        return {}  # only shards left: each shard checks its own settings
    try:
        with Trajectory(out) as t:
            a = t.attrs
    except InputError as exc:
        raise InputError(f"cannot resume: {exc}; use --overwrite to start again") from None
    if a.get("executor") != "dask":
        raise InputError(f"{out} was written by the local executor: resume it with --executor local")
    return a


# ----------------------------------------------------------------------------- the client


def simulate_dask(system: str | MolecularSystem, out: str | os.PathLike, *, replicas: int, time_ps: float,
                  frame_fs: float, n_coefficients: int, equilibrate_ps: float, platform: str, seed: int | None,
                  resume: bool, overwrite: bool, copies_per_context: int | None, workers: int | None,
                  chunk_frames: int | None, deterministic: bool, cutoff_nm: float | None, progress: bool,
                  scheduler: str | None, **overrides: Any) -> Trajectory:
    """:func:`molflow.simulate` with ``executor="dask"`` (see the module docstring)."""
    if getattr(mp.current_process(), "_inheriting", False):  # spawn re-running an unguarded script
        raise InputError("simulate(executor='dask') was called while a worker process was starting: put the "
                         "calling script's code under `if __name__ == \"__main__\":`")
    distributed = _import_distributed()
    t_start = time.perf_counter()
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    mol = system if isinstance(system, MolecularSystem) else load_system(system, **overrides)
    if isinstance(system, MolecularSystem) and overrides:
        raise InputError("pass overrides to load_system, not with a MolecularSystem")
    replicas, n_coefficients = int(replicas), int(n_coefficients)
    _, n_total = check_settings(mol, replicas, time_ps, frame_fs, n_coefficients, equilibrate_ps)
    sdir = shards_dir(out)
    existing = out.exists() or sdir.exists()
    if existing and not (resume or overwrite):
        raise InputError(f"{out} exists: pass --resume to continue it or --overwrite to replace it")
    recorded: dict[str, Any] = {}
    if resume and existing:
        recorded = _recorded(out)
        if seed is None and "seed" in recorded:
            seed = int(recorded["seed"])
        if copies_per_context is None and "copies_per_context" in recorded:
            copies_per_context = int(recorded["copies_per_context"])
    seed = random_seed() if seed is None else int(seed)
    if seed <= 0:
        raise InputError("seed must be a positive integer")

    cluster = None
    try:
        if scheduler:
            client = distributed.Client(scheduler)
        else:
            cluster = distributed.LocalCluster(n_workers=int(workers or os.cpu_count() or 1), threads_per_worker=1,
                                               processes=True, dashboard_address=None)
            client = distributed.Client(cluster)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the user's to fix
        if scheduler:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {type(exc).__name__}: {exc}") from None
        raise InputError(f"cannot start a local Dask cluster ({type(exc).__name__}: {exc}); from a Python script, "
                         "keep its code under `if __name__ == \"__main__\":` (the workers re-import it)") from None
    try:
        if overwrite and not recorded:  # replace the old run only once the cluster is there
            out.unlink(missing_ok=True)
            shutil.rmtree(sdir, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".ckpt"), ignore_errors=True)  # a replaced local run's
        return _run(distributed, client, mol, out, replicas, time_ps, frame_fs, n_coefficients, equilibrate_ps,
                    platform, seed, recorded, copies_per_context, chunk_frames, deterministic, cutoff_nm, progress,
                    scheduler, n_total, t_start)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run(distributed, client, mol, out, replicas, time_ps, frame_fs, n_coefficients, equilibrate_ps, platform,
         seed, recorded, copies_per_context, chunk_frames, deterministic, cutoff_nm, progress, scheduler, n_total,
         t_start) -> Trajectory:
    from tqdm.auto import tqdm

    # the platform is resolved where the work runs (a GPU node's client may be a login node)
    resolved = client.submit(resolve_platform, platform, pure=False).result()
    n_threads = max(1, sum(client.nthreads().values()))
    platform_name, cpc = plan_layout(mol, replicas, platform, resolved, copies_per_context, n_threads)
    if copies_per_context is None and platform_name in GPU_PLATFORMS:  # one group per GPU worker
        cpc = int(min(1024, -(-replicas // n_threads)))
    hardware = client.submit(hardware_description, platform_name, pure=False).result()
    cutoff = float(cutoff_nm or default_cutoff_nm(mol.positions_nm))
    sizes = [min(cpc, replicas - s) for s in range(0, replicas, cpc)]
    attrs = run_attrs(mol, frame_fs, n_coefficients, replicas, seed, platform_name, cpc, equilibrate_ps, cutoff,
                      hardware, time_ps)
    if recorded:
        diffs = [f"{k}: file has {recorded.get(k)!r}, asked {attrs[k]!r}" for k in RESUME_KEYS
                 if settings_differ(recorded.get(k), attrs[k])]
        if diffs:
            raise InputError(f"cannot resume {out}: settings differ ({'; '.join(diffs)})")
        attrs["time_ps_requested"] = max(float(time_ps), float(recorded.get("time_ps_requested", 0)))
    elapsed_before = float(recorded.get("elapsed_s", 0.0))
    attrs["elapsed_s"] = elapsed_before
    write_manifest(out, attrs, sizes, mol.n_atoms)  # first the manifest, so a run's shards always have one
    shards_dir(out).mkdir(exist_ok=True)

    todo = [i for i in range(len(sizes)) if (_shard_frames(shard_path(out, i)) or 0) < n_total]
    if progress:
        where = scheduler or f"LocalCluster of {n_threads} worker(s)"
        print(f"molflow simulate: system={mol.name} replicas={replicas} seed={seed} platform={platform_name} "
              f"copies_per_context={cpc} executor=dask ({where}): {len(sizes)} shard(s) in {shards_dir(out)}, "
              f"{len(todo)} to run", file=sys.stderr)
    mol_spec = {"pdb_text": mol.pdb_text, "forcefield_files": tuple(mol.forcefield_files),
                "temperature_K": mol.temperature_K, "friction_per_ps": mol.friction_per_ps,
                "timestep_fs": mol.timestep_fs, "name": mol.name}
    settings = {"time_ps": time_ps, "frame_fs": frame_fs, "n_coefficients": n_coefficients,
                "equilibrate_ps": equilibrate_ps, "platform": platform_name, "seed": seed,
                "copies_per_context": cpc, "chunk_frames": chunk_frames, "deterministic": deterministic,
                "cutoff_nm": cutoff}
    token = uuid.uuid4().hex[:8]
    futures = {client.submit(_run_shard, mol_spec, str(shard_path(out, i).resolve()), sizes[i], i, settings,
                             key=f"molflow-shard-{i:04d}-{token}", pure=False): i for i in todo}
    frames = {i: (_shard_frames(shard_path(out, i)) or 0) for i in range(len(sizes))}
    bar = tqdm(total=len(sizes) * n_total, initial=sum(frames.values()), unit="frame", disable=not progress,
               desc=f"simulate {mol.name} ({len(sizes)} shards)", dynamic_ncols=True, file=sys.stderr)
    poll_s = max(0.5, len(sizes) / 200)
    pending = set(futures)
    failure: tuple[int, BaseException] | None = None

    def manifest() -> int:
        attrs["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
        return write_manifest(out, attrs, sizes, mol.n_atoms)

    try:
        while pending and failure is None:
            try:
                done, _ = distributed.wait(list(pending), timeout=poll_s, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for fut in done:
                pending.discard(fut)
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001 - reported below with the shard's name
                    failure = failure or (futures[fut], exc)
            if done:
                manifest()
            for i in range(len(sizes)):
                n = _shard_frames(shard_path(out, i))
                frames[i] = frames[i] if n is None else n
            bar.n = sum(frames.values())
            bar.set_postfix_str(f"{len(sizes) - len(pending)}/{len(sizes)} shards done")
            bar.refresh()
    finally:
        if pending:
            client.cancel(list(pending))
        bar.close()
        n_done = manifest()
    if failure is not None:
        i, exc = failure
        if isinstance(exc, MolflowError) and not isinstance(exc, SimulationError):
            raise exc
        name = type(exc).__name__
        raise SimulationError(f"shard {i} ({shard_path(out, i).name}) failed: {name}: {exc}; kept {n_done} "
                              f"complete frames of every replica in {out}: continue with --resume")
    if progress and not futures:
        print(f"molflow simulate: nothing to do, every shard of {out} holds {n_total} frames", file=sys.stderr)
    return Trajectory(out)


register_executor("dask", simulate_dask)
