"""Is anything else running on the cores while we time? (Linux /proc/stat.)

On these 2-core machines a 2-thread GEMM slows down 10-50x when another process holds a core:
OpenMP threads wait at every barrier for the one that was descheduled. A timing taken then says
nothing about the code. `CpuLoad` measures, over an interval, the CPU time spent by everything
except this process (busy jiffies of the whole machine, steal included, minus this process's own
CPU time) and turns it into "cores used by others".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

# Above this many cores' worth of other work on average, timings are flagged. A quiet VM shows
# 0.00-0.05 (kernel threads, the shell); one competing single-threaded job shows ~1.0.
BUSY_CORES = 0.25


def _machine_busy_seconds() -> Optional[float]:
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    busy = sum(values[:8]) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()  # this process, every thread; children that were waited for too
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class LoadReport:
    seconds: float
    other_cores: float  # average cores used by other processes during the interval
    cpus: int

    @property
    def busy(self) -> bool:
        return self.other_cores > BUSY_CORES

    def warning(self, threads: int) -> Optional[str]:
        if not self.busy:
            return None
        return (f"WARNING: the machine was busy: other processes used {self.other_cores:.2f} of {self.cpus} cores "
                f"on average over {self.seconds:.0f} s while this ran with {threads} threads. Timings under load "
                "are not valid (multi-threaded GEMMs slow down many-fold when a core is taken); ratios taken "
                "side by side are less affected, but re-run on a quiet machine before quoting them.")


class CpuLoad:
    """with CpuLoad() as load: ...; load.report -> LoadReport (None where /proc/stat is missing)."""

    def __init__(self):
        self.report: Optional[LoadReport] = None

    def start(self) -> "CpuLoad":
        self._wall = time.perf_counter()
        self._busy = _machine_busy_seconds()
        self._own = _own_cpu_seconds()
        return self

    def stop(self) -> Optional[LoadReport]:
        busy = _machine_busy_seconds()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._wall
        others = (busy - self._busy) - (_own_cpu_seconds() - self._own)
        self.report = LoadReport(seconds=wall, other_cores=max(0.0, others / max(wall, 1e-9)), cpus=os.cpu_count() or 1)
        return self.report

    def __enter__(self) -> "CpuLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def probe(seconds: float = 1.0) -> Optional[LoadReport]:
    """Sleep `seconds` and report what the rest of the machine did meanwhile."""
    load = CpuLoad().start()
    time.sleep(seconds)
    return load.stop()
