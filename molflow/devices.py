"""Torch devices: what ``--device auto|cpu|cuda|cuda:N`` means, and how hardware is described in files."""
from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: torch sees no CUDA GPU here")
    return dev


def device_description(device: torch.device) -> str:
    """GPU name, or CPU model and core count, for the ``hardware`` attribute."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    from .md.engine import cpu_description

    return f"{cpu_description()} (torch {torch.__version__} CPU)"
