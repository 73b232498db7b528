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

MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit; argen keeps them distinct up to here


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
