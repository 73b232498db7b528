"""Progress output that works in a terminal and in a log file.

In a terminal: a tqdm bar. Elsewhere (stdout/stderr redirected to a file, a CI log, a job
scheduler) tqdm redraws its bar with carriage returns, which a log shows as one line at the very
end; there we print a plain line every `every` seconds instead.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

from tqdm.auto import tqdm


class LineProgress:
    """A tqdm-like counter (iterate over it, or call `update`) that prints whole lines."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", every: float = 5.0, file=None):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.every = desc, unit, every
        self.file = file or sys.stderr
        self.n = self.shown = 0
        self.start = self.last = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        self.shown = self.n
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        eta = ""
        if self.total and rate > 0:
            eta = f", {max(0.0, (self.total - self.n) / rate):.0f} s left"
        print(f"{self.desc}: {done} {self.unit} ({elapsed:.0f} s, {rate:.2f} {self.unit}/s{eta})",
              file=self.file, flush=True)

    def close(self) -> None:
        if self.n != self.shown and time.perf_counter() - self.start >= self.every:  # once, if not shown yet
            self._print(time.perf_counter())
            self.every = float("inf")  # print the final line once


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "it",
             enabled: bool = True, every: float = 5.0):
    """`iterable` wrapped with progress output (a bar in a terminal, a line every few seconds
    elsewhere); `enabled=False` returns it unchanged (or a silent counter when it is None)."""
    if not enabled:
        return iterable if iterable is not None else tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, every=every)
