"""Running roles as worker processes: one Faust worker per role process.

`docflow worker --role all` and `docflow up` start one process per role and stop them
together; each process is `docflow worker --role ROLE` with its own web port.
:class:`WorkerStack` starts any number of processes per role against one broker and waits
until each role's group owns every partition: the integration tests and the benchmarks
run the pipeline through it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.app import ROLES, active_roles
from pipeline.broker_security import SETTINGS_FIELDS as KAFKA_SECURITY_FIELDS
from pipeline.local.ports import free_port
from pipeline.settings import Settings
from pipeline.topics import CHUNKS_PROCESSED, DOCUMENTS_RAW, DOCUMENTS_STATUS, EMBEDDINGS_READY

# The topic whose partitions each role's consumer group shares.
ROLE_INPUTS = {
    "web": DOCUMENTS_STATUS.name,
    "chunker": DOCUMENTS_RAW.name,
    "embedder": CHUNKS_PROCESSED.name,
    "indexer": EMBEDDINGS_READY.name,
}


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


def role_metrics_ports(settings: Settings) -> dict[str, int]:
    """With DOCFLOW_METRICS_PORT set, each role's own metrics port: that one and the next ones, as
    :func:`role_ports` (8000 gives seed 000's layout: chunker 8001, embedder 8002); else none.

    One port for every process of a host would let only the first role bind it.
    """
    if not settings.metrics_port:
        return {}
    return {role: settings.metrics_port + offset for offset, role in enumerate(ROLES)}


def start_roles(settings: Settings, loglevel: str = "info") -> list[RoleProcess]:
    """One process of every role the pipeline runs (:func:`pipeline.app.active_roles`)."""
    ports = role_ports(settings)
    metrics_ports = role_metrics_ports(settings)
    started = []
    for role in active_roles(settings):
        env = dict(os.environ, DOCFLOW_WEB_PORT=str(ports[role]))
        if metrics_ports:
            env["DOCFLOW_METRICS_PORT"] = str(metrics_ports[role])
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


@dataclass
class Worker:
    role: str
    port: int
    log_path: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class WorkerStack:
    """The worker processes of one test session, sharing the broker, the home and the settings."""

    settings: Settings
    env: dict[str, str]
    logs: Path
    workers: list[Worker] = field(default_factory=list)

    def start(self, role: str, port: int, **env_overrides: str) -> Worker:
        """One process of a role on its web port; ``env_overrides`` are settings of this process alone."""
        log_path = self.logs / f"{role}-{port}-{len(self.workers)}.log"
        env = dict(self.env, **env_overrides, DOCFLOW_WEB_PORT=str(port))
        process = subprocess.Popen(
            worker_command(role), env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        worker = Worker(role, port, log_path, process)
        self.workers.append(worker)
        return worker

    def launch(self, counts: dict[str, int]) -> list[Worker]:
        """Start ``counts[role]`` processes of each role; return once all are healthy and balanced."""
        started = [self.start(role, free_port()) for role, count in counts.items() for _ in range(count)]
        self.wait_healthy(started)
        self.wait_balanced(counts)
        return started

    def wait_healthy(self, workers: list[Worker], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(workers)
        while pending and time.monotonic() < deadline:
            for worker in list(pending):
                if not worker.alive():
                    raise RuntimeError(f"{worker.role} worker died:\n{tail(worker.log_path)}")
                try:
                    with urllib.request.urlopen(f"{worker.url}/health", timeout=2) as response:
                        if response.status == 200:
                            pending.remove(worker)
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.3)
        if pending:
            raise RuntimeError(
                "workers not healthy in time:\n" + "\n".join(f"{w.role}:\n{tail(w.log_path)}" for w in pending)
            )

    def wait_balanced(self, roles: Iterable[str] | None = None, timeout: float = 120.0) -> None:
        """Wait until each role's processes (every running role's by default) together own every
        partition of its input topic.

        Uploading while a role's group still rebalances gets messages redelivered (at-least-once),
        which a test that counts deliveries must not see.
        """
        running = {worker.role for worker in self.workers if worker.alive()}
        inputs = {role: ROLE_INPUTS[role] for role in (running if roles is None else roles)}
        partitions = self.settings.topic_partitions
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._owned(role, topic) == set(range(partitions)) for role, topic in inputs.items()):
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"roles not balanced in time: { {role: self._owned(role, topic) for role, topic in inputs.items()} }"
        )

    def _owned(self, role: str, topic: str) -> set[int] | None:
        owned: list[int] = []
        for worker in self.of_role(role):
            try:
                with urllib.request.urlopen(f"{worker.url}/health", timeout=2) as response:
                    health = json.load(response)
            except (urllib.error.URLError, OSError, ValueError):
                return None
            mine = health["checks"]["assigned"].get(topic, [])
            if health["checks"]["rebalancing"] or not mine:
                return None
            owned += mine
        return set(owned) if len(owned) == len(set(owned)) else None

    def stop(self, worker: Worker, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        if worker.alive():
            worker.process.send_signal(sig)
            try:
                worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        if worker in self.workers:
            self.workers.remove(worker)

    def stop_all(self) -> None:
        for worker in list(self.workers):
            self.stop(worker)

    def of_role(self, role: str) -> list[Worker]:
        return [worker for worker in self.workers if worker.role == role and worker.alive()]


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def worker_env(settings: Settings, **overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DOCFLOW_")}
    env.update(
        {
            "DOCFLOW_HOME": str(settings.home),
            "DOCFLOW_KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            # TLS and SASL, so the workers reach a secured broker as this process does.
            **{f"DOCFLOW_{field.upper()}": getattr(settings, field) for field in KAFKA_SECURITY_FIELDS},
            "DOCFLOW_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "DOCFLOW_EMBEDDING_BACKEND": "hashing",
            # Sizes in characters: the hashing backend has no word-piece limit to fit.
            "DOCFLOW_CHUNK_SIZE_UNIT": "chars",
            "DOCFLOW_CHUNK_SIZE": "1000",
            "DOCFLOW_CHUNK_OVERLAP": "200",
            "DOCFLOW_INDEX": settings.index,
            "DOCFLOW_MILVUS_URI": settings.milvus_address,
            "DOCFLOW_CHUNKER_PROCESSES": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env
