"""How quiet the machine was while a speed was measured: the CPU time *other* processes took meanwhile.

A tokens/s figure is only comparable with another one measured on a quiet machine. Two training jobs on the same
cores do not just halve each other's speed: OpenMP threads spin while they wait and can slow both by far more.
``OtherLoad`` reads the machine's busy CPU time (Linux ``/proc/stat``) and this process's own CPU time around a
block of work; what is left is the share of the machine's cores other processes used:

    with OtherLoad() as load:
        trainer.train()
    load.share   # 0.0: nobody else ran; 0.5: others kept half of the cores busy; None: not measurable here
"""
from __future__ import annotations

import os
import time
from typing import Optional

PROC_STAT = "/proc/stat"
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (idle and iowait are not busy)
QUIET_SHARE = 0.05  # at most 5% of the cores busy with other work: the speed counts as measured on a quiet machine


def _busy_cpu_seconds(path: str = PROC_STAT) -> Optional[float]:
    """All CPUs' busy time since boot, in seconds; None where /proc/stat cannot be read (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1:]]
    return sum(ticks[i] for i in BUSY_FIELDS if i < len(ticks)) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Context manager: ``share`` is the fraction of the machine's cores other processes kept busy inside it."""

    def __init__(self, stat_path: str = PROC_STAT):
        self.stat_path = stat_path
        self.share: Optional[float] = None

    def __enter__(self) -> "OtherLoad":
        self._busy = _busy_cpu_seconds(self.stat_path)
        self._own = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = _busy_cpu_seconds(self.stat_path)
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (time.process_time() - self._own)
        self.share = min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def is_quiet(share: Optional[float]) -> Optional[bool]:
    """True / False where the load was measured, None where it was not."""
    return None if share is None else share <= QUIET_SHARE
