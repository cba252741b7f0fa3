"""Flow-map checkpoints: everything sampling needs, loaded without unpickling code.

A checkpoint is a dict of tensors and plain values saved with ``torch.save`` and read with
``torch.load(weights_only=True)``; structured settings travel as JSON strings. It carries the model
and its EMA copy, the optimiser and scheduler states, the configs, the system (PDB text, force
field, Langevin settings, fingerprint), the base interval, the training step and RNG states, the
metrics history and the molflow version.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import InputError

FORMAT = "molflow-flowmap"


#: payload entries holding network weights: they must be finite to be written or read
WEIGHT_KEYS = ("model", "ema")


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A 16-hex digest of a module's weights (recorded by sampled files; resume refuses another model)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def non_finite_tensors(payload: dict[str, Any]) -> list[str]:
    """Names ``key.tensor`` of the weight tensors in ``payload`` holding NaN or infinity."""
    bad = []
    for key in WEIGHT_KEYS:
        for name, t in (payload.get(key) or {}).items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{key}.{name}")
    return bad


def _describe_non_finite(bad: list[str]) -> str:
    return f"{len(bad)} weight tensor(s) hold NaN or infinity ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write atomically (a crash never leaves a half-written checkpoint). Refuses non-finite weights:
    a checkpoint on disk is always one a sampler can use."""
    path = Path(path)
    bad = non_finite_tensors(payload)
    if bad:
        raise ValueError(f"refusing to write {path}: {_describe_non_finite(bad)}")
    out = {"format": FORMAT, "molflow_version": __version__}
    for key, value in payload.items():
        out[key] = json.dumps(value) if key.endswith("_json") else value
    tmp = path.with_name(path.name + ".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", expected_format: str = FORMAT,
                    kind: str = "flow-map") -> dict[str, Any]:
    """Read a checkpoint safely; a missing, corrupt or foreign file raises InputError.

    ``expected_format``/``kind``: the ``format`` field the file must carry and its name in errors
    (the Boltzmann sampler's checkpoints use ``"molflow-boltzmann"``; a payload's own ``format``
    key overrides the default when saving)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such checkpoint: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        raise InputError(f"{path} is an HDF5 file (a trajectory or samples file), not a molflow {kind} "
                         "checkpoint; `molflow info` tells what it holds")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # never suggest unsafe loading: name the problem only
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__ or "pickle" in str(exc).lower():
            first = "it holds objects that a safe (weights-only) load refuses"
        raise InputError(f"{path} is not a readable molflow checkpoint ({kind}; {type(exc).__name__}: {first})") from None
    if not isinstance(ck, dict) or ck.get("format") != expected_format:
        raise InputError(f"{path} is not a molflow {kind} checkpoint")
    bad = non_finite_tensors(ck)
    if bad:
        raise InputError(f"{path}: {_describe_non_finite(bad)}; this map cannot "
                         "sample: retrain it")
    for key in list(ck):
        if key.endswith("_json"):
            ck[key] = json.loads(ck[key])
    return ck


def without_torsion_drive(ck: dict[str, Any]) -> dict[str, Any]:
    """A copy of flow-map checkpoint ``ck`` without its torsion drive: the network alone, as it was
    before a drive was added and fitted with ``train_only: torsion_drive`` (which leaves every network
    weight untouched), so a map's drive can be fitted again on other data from the same network
    (``--init-from`` the result). Optimiser state, which belongs to the run that made ``ck``, is
    dropped; settings, normalisation and history are kept."""
    cfg = dict(ck["map_config_json"])
    if not cfg.get("torsion_drive"):
        from .errors import InputError

        raise InputError("this checkpoint's map has no torsion drive")
    cfg.update(torsion_drive=0, torsion_drive_bins=0, torsion_drive_landscape=0, torsion_drive_landscape_pair=0)
    out = {k: v for k, v in ck.items() if k not in ("model", "ema", "optimizer", "scheduler", "map_config_json")}
    out["map_config_json"] = cfg
    for k in ("model", "ema"):
        if k in ck:
            out[k] = {name: t for name, t in ck[k].items() if not name.startswith("drive.")}
    return out
