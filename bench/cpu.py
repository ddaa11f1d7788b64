"""CPU seconds spent by processes and their children, read from /proc.

A benchmark on a small machine is bound by CPU more often than by anything else, and
wall time alone does not say which process spent it. Summing user+system time of each
process tree (a chunker with its extraction pool, the broker's JVM) over a measured run
does, and stays meaningful when the machine is shared.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, user+system CPU seconds) of one live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


def _all_processes() -> dict[int, tuple[int, float]]:
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                processes[int(entry)] = _stat(int(entry))
            except (OSError, IndexError, ValueError):  # it exited while we read
                pass
    return processes


def tree_cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process and its live descendants, read once for all of them.

    A descendant counts under the nearest named ancestor only, so a process tree named
    inside another one (the broker started by this very process) is not counted twice.
    """
    processes = _all_processes()
    named = {pid: name for name, pid in roots.items()}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    totals = {}
    for name, root in roots.items():
        total, pending = 0.0, [root]
        while pending:
            pid = pending.pop()
            total += processes.get(pid, (0, 0.0))[1]
            pending += [child for child in children.get(pid, []) if child not in named]
        totals[name] = total
    return totals


class CpuMeter:
    """CPU seconds each named process tree spends between :meth:`start` and :meth:`stop`."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self._started: dict[str, float] = {}

    def start(self) -> None:
        self._started = tree_cpu_seconds(self.roots)

    def stop(self) -> dict[str, float]:
        ended = tree_cpu_seconds(self.roots)
        return {name: round(ended[name] - self._started.get(name, 0.0), 3) for name in self.roots}
