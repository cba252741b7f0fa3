"""Flow-map checkpoints: everything sampling needs, loaded without unpickling code.

A checkpoint is a dict of tensors and plain values saved with ``torch.save`` and read with
``torch.load(weights_only=True)``; structured settings travel as JSON strings. It carries the model
and its EMA copy, the optimiser and scheduler states, the configs, the system (PDB text, force
field, Langevin settings, fingerprint), the base interval, the training step and RNG states, the
metrics history and the molflow version.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import InputError

FORMAT = "molflow-flowmap"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write atomically (a crash never leaves a half-written checkpoint)."""
    path = Path(path)
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
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise InputError(f"{path} is not a readable molflow checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ck, dict) or ck.get("format") != expected_format:
        raise InputError(f"{path} is not a molflow {kind} checkpoint")
    for key in list(ck):
        if key.endswith("_json"):
            ck[key] = json.loads(ck[key])
    return ck
