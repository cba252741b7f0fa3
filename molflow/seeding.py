"""Seeds: a random default that is printed and recorded, and derived seeds that are never 0.

OpenMM reads a random-number seed of 0 as "pick one at random", which would make a run
irreproducible; every seed molflow hands to OpenMM is derived from the run's master seed with
:func:`derive_seed` and lies in [1, 2**31 - 1].
"""
from __future__ import annotations

import secrets

import numpy as np


def random_seed() -> int:
    """A fresh master seed in [1, 2**31 - 1] (print and record it)."""
    return secrets.randbelow(2**31 - 2) + 1


def derive_seed(seed: int, *keys: int) -> int:
    """A reproducible seed in [1, 2**31 - 1] from a master seed and integer keys.

    Uses numpy's SeedSequence (a hash), so neighbouring keys give unrelated streams.
    """
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in keys]])
    value = int(ss.generate_state(1, dtype=np.uint32)[0]) % (2**31 - 1)
    return value + 1
