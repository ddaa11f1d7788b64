"""Running roles as worker processes: one Faust worker per role process (DESIGN §3).

`docflow worker --role all` and `docflow up` start one process per role and stop them
together; each process is `docflow worker --role ROLE` with its own web port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pipeline.app import ROLES
from pipeline.settings import Settings


def run_worker(settings: Settings, role: str, loglevel: str = "info") -> None:
    """Run one role's Faust worker in this process until it is told to stop."""
    role_worker(settings, role, loglevel).execute_from_commandline()


def role_worker(settings: Settings, role: str, loglevel: str = "info"):
    """The Faust worker of one role's app, quiet (no banner, no spinner) below info."""
    import faust

    from pipeline.app import create_app

    quiet = loglevel.lower() in ("warning", "warn", "error", "critical")  # as `docflow up` runs them
    worker = faust.Worker(create_app(settings, role), loglevel=loglevel, override_logging=True, quiet=quiet)
    if quiet:
        # Faust's spinner sets the root logger to DEBUG to spin on every record, so each debug
        # line of aiokafka and Faust (one per message sent) was formatted and then dropped.
        worker.spinner = None
    return worker


def worker_command(role: str, loglevel: str = "info") -> list[str]:
    """The command line of one role's worker process, as `docflow up` starts it."""
    return [sys.executable, "-m", "pipeline.cli", "worker", "--role", role, "--loglevel", loglevel]


@dataclass
class RoleProcess:
    role: str
    port: int
    process: subprocess.Popen


def role_ports(settings: Settings) -> dict[str, int]:
    """web on the configured port, the other roles on the next ones (for their /health and /metrics)."""
    return {role: settings.web_port + offset for offset, role in enumerate(ROLES)}


def start_roles(settings: Settings, roles=ROLES, loglevel: str = "info") -> list[RoleProcess]:
    ports = role_ports(settings)
    started = []
    for role in roles:
        env = dict(os.environ, DOCFLOW_WEB_PORT=str(ports[role]))
        command = worker_command(role, loglevel)
        # Own process group: the terminal's Ctrl-C reaches us, and we stop the workers in order.
        process = subprocess.Popen(command, env=env, start_new_session=True)
        started.append(RoleProcess(role, ports[role], process))
    return started


def stop_roles(processes: list[RoleProcess], timeout: float = 30.0) -> None:
    for proc in processes:
        if proc.process.poll() is None:
            proc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in processes:
        try:
            proc.process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.process.kill()
            proc.process.wait()


def supervise(processes: list[RoleProcess]) -> int:
    """Wait until Ctrl-C/SIGTERM or until a role process dies; stop the others either way."""
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping:
            dead = [proc for proc in processes if proc.process.poll() is not None]
            if dead:
                for proc in dead:
                    print(f"docflow: {proc.role} worker exited with {proc.process.returncode}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        stop_roles(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
