"""Sampling profiles of running worker processes with py-spy, and what they say in a few lines.

py-spy attaches to a live process without changing it. Only samples of threads that hold
the GIL are kept (``--gil``): on a machine with more runnable processes than cores, a
thread waiting for a CPU would otherwise look busy in whatever call it was preempted in
(a socket write to a local peer, typically). The collapsed stacks are written as they
are (``ROLE.folded``, readable by speedscope and flamegraph.pl) and summarised as the
functions with the most samples of their own and the docflow functions with the most
samples below them.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

SAMPLES_PER_SECOND = 250


def py_spy() -> str:
    """The py-spy executable (the ``bench`` extra installs it)."""
    found = shutil.which(Path(sys.executable).with_name("py-spy")) or shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    return found


@contextmanager
def profiled(processes: dict[str, int], folder: Path):
    """Sample each named process (and its children) for as long as the block runs."""
    folder.mkdir(parents=True, exist_ok=True)
    executable = py_spy()
    spies = {
        name: subprocess.Popen(
            [
                executable,
                "record",
                "--nonblocking",
                "--gil",
                "--subprocesses",
                "--rate",
                str(SAMPLES_PER_SECOND),
                "--format",
                "raw",
                "--output",
                str(folder / f"{name}.folded"),
                "--pid",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for name, pid in processes.items()
    }
    try:
        yield
    finally:
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for name, spy in spies.items():
            _, errors = spy.communicate(timeout=60)
            if spy.returncode not in (0, -signal.SIGINT) and not (folder / f"{name}.folded").exists():
                raise RuntimeError(f"py-spy on {name} failed: {errors.decode(errors='replace')[-500:]}")


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    return [frame for frame in stack.split(";") if not frame.startswith("process ")], int(count)


def summarise(path: Path, top: int = 12) -> dict:
    """Samples in all; the hottest functions by own samples; docflow's functions by samples below them."""
    own: Counter[str] = Counter()
    below: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        frames, count = _frames(line)
        total += count
        if frames:
            own[_short(frames[-1])] += count
        for frame in {_short(frame) for frame in frames if _is_docflow(frame)}:
            below[frame] += count
    return {
        "samples": total,
        "self": [(name, count) for name, count in own.most_common(top)],
        "docflow_inclusive": [(name, count) for name, count in below.most_common(top)],
    }


_DOCFLOW_PACKAGES = ("pipeline/", "agents/", "tables/", "web/")
# Below every sample of a worker: they say nothing about where its time goes.
_ENTRY_MODULES = ("pipeline/cli/", "pipeline/local/workers.py")


def _is_docflow(frame: str) -> bool:
    return any(f"({package}" in frame for package in _DOCFLOW_PACKAGES) and not any(
        module in frame for module in _ENTRY_MODULES
    )


def _short(frame: str) -> str:
    # "embed_batch (agents/embedder.py:61)" → "embed_batch (agents/embedder.py)": lines split one function apart.
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def markdown(summaries: dict[str, dict]) -> str:
    lines = []
    for name, summary in summaries.items():
        total = max(summary["samples"], 1)
        lines += [
            f"**{name}**: {summary['samples']} samples holding the GIL",
            "",
            "| own samples | % | function |",
            "|---:|---:|---|",
        ]
        lines += [f"| {count} | {100 * count / total:.1f} | `{function}` |" for function, count in summary["self"]]
        lines += ["", "| samples below | % | docflow function |", "|---:|---:|---|"]
        lines += [
            f"| {count} | {100 * count / total:.1f} | `{function}` |"
            for function, count in summary["docflow_inclusive"]
        ]
        lines.append("")
    return "\n".join(lines)
