"""Torch devices: what ``--device auto|cpu|cuda|cuda:N`` means, and how hardware is described in files."""
from __future__ import annotations

import os
import sys

import torch

from .errors import InputError

#: glibc mallopt parameters (malloc.h) and the values set by :func:`keep_freed_memory`
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest accepted value on 64-bit
_TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed blocks of up to 32 MB instead of mapping fresh pages (Linux only;
    once per process; ``MOLFLOW_KEEP_MALLOC=0`` turns it off). Returns whether it is in effect.

    Torch on a CPU allocates a new array for every operation. By default glibc serves blocks above
    ~128 kB-32 MB with fresh ``mmap`` pages and hands them back on free, so every large intermediate of
    a dense message-passing layer is page-faulted in again on every call. Keeping them in the heap
    (mmap threshold 32 MB, trim threshold 512 MB) measured on this project's 2-core EPYC, one thread,
    the shipped alanine-dipeptide map's jump of 32 replicas: 1.21 -> 0.70 ms per replica. The cost is
    that the process keeps its peak heap (tens of MB here) instead of returning it."""
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if sys.platform.startswith("linux") and os.environ.get("MOLFLOW_KEEP_MALLOC", "1") != "0":
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and \
                    bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
            except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
                _allocator_tuned = False
    return _allocator_tuned


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given.
    A CPU device also tunes the allocator for torch's many short-lived arrays (:func:`keep_freed_memory`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: torch sees no CUDA GPU here")
    if dev.type == "cpu":
        keep_freed_memory()
    return dev


def device_description(device: torch.device) -> str:
    """GPU name, or CPU model and core count, for the ``hardware`` attribute."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    from .md.engine import cpu_description

    return f"{cpu_description()} (torch {torch.__version__} CPU)"
