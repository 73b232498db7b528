"""Checks of user-given numbers, shared by the Python API and the command line.

Numbers are checked at the boundary: finite (NaN and infinity pass every `<`/`>` comparison
the wrong way), integral where a count is meant (so `seed=1.5` or `True` is refused), and in
range. Failures are one-line `ArgenError`s naming the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

from .errors import ArgenError

# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: manual_seed(2**32) draws
# exactly what manual_seed(0) draws. Seeds above this would silently repeat smaller ones.
MAX_SEED = 2**32 - 1


def check_number(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None, *,
                 integer: bool = False, lo_open: bool = False, hi_open: bool = False):
    """`value` as an int (integer=True) or float, or a one-line error: finite and in [lo, hi]
    (open at an end when lo_open/hi_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "an integer" if integer else "a number"
        raise ArgenError(f"{name} must be {kind}, got {value!r}")
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if not math.isfinite(value):
        raise ArgenError(f"{name} must be finite, got {value}")
    if integer:
        if float(value) != int(value):
            raise ArgenError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if low_bad or high_bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ArgenError(f"{name} must be in {span}, got {value}")
    return value


def check_seed(name: str, seed) -> int:
    return check_number(name, seed, 0, MAX_SEED, integer=True)


def check_device(device):
    """A `torch.device` this machine can run argen models on, or a one-line error: an unknown
    name ("tpu9"), a GPU that is not there ("cuda" without CUDA), or "meta" (tensors without data)."""
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ArgenError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgenError(f"device {device!r}: no CUDA GPU is available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgenError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise ArgenError(f"device {device!r} cannot run argen models here; use cpu or cuda")
