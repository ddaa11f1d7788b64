"""Real worker processes for integration tests: `docflow worker --role ROLE` against the session broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from pipeline.client import DocflowClient
from pipeline.settings import Settings
from pipeline.stack import worker_command

ROLE_INPUTS = {"web": "documents.status", "chunker": "documents.raw", "embedder": "chunks.processed"}


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

    def start(self, role: str, port: int) -> Worker:
        log_path = self.logs / f"{role}-{port}-{len(self.workers)}.log"
        env = dict(self.env, DOCFLOW_WEB_PORT=str(port))
        process = subprocess.Popen(
            worker_command(role),
            env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        worker = Worker(role, port, log_path, process)
        self.workers.append(worker)
        return worker

    def launch(self, counts: dict[str, int]) -> list[Worker]:
        """Start ``counts[role]`` processes of each role; return once all are healthy and balanced."""
        from tests.conftest import free_port

        started = [self.start(role, free_port()) for role, count in counts.items() for _ in range(count)]
        self.wait_healthy(started)
        self.wait_balanced({role: ROLE_INPUTS[role] for role in counts}, self.settings.topic_partitions)
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

    def wait_balanced(self, inputs: dict[str, str], partitions: int, timeout: float = 120.0) -> None:
        """Wait until each role's processes together own every partition of its input topic.

        Uploading while a role's group still rebalances gets messages redelivered (at-least-once),
        which a test that counts deliveries must not see.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._owned(role, topic) == set(range(partitions)) for role, topic in inputs.items()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"roles not balanced in time: { {role: self._owned(role, topic) for role, topic in inputs.items()} }")

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
    env.update({
        "DOCFLOW_HOME": str(settings.home),
        "DOCFLOW_KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "DOCFLOW_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "DOCFLOW_EMBEDDING_BACKEND": "hashing",
        "DOCFLOW_CHUNKER_PROCESSES": "2",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(overrides)
    return env


async def upload_all(stack: WorkerStack, company: str, files, tmp_path: Path) -> dict[str, tuple[str, bytes]]:
    """Upload through the web workers in turn; returns document_id → (filename, data)."""
    webs = stack.of_role("web")
    uploaded = {}
    for n, (filename, data) in enumerate(files):
        path = tmp_path / filename
        path.write_bytes(data)
        async with DocflowClient(webs[n % len(webs)].url, company) as client:
            answer = await client.upload(path)
        uploaded[answer["document_id"]] = (filename, data)
    return uploaded


async def wait_all(url: str, company: str, document_ids, timeout: float = 180.0) -> dict[str, dict]:
    async with DocflowClient(url, company) as client:
        statuses = await asyncio.gather(*(client.wait(doc, timeout) for doc in document_ids))
    return dict(zip(document_ids, statuses))


async def read_topic(settings, topic: str, document_ids: set[str], until_count: int, timeout: float = 60.0):
    """Every message on a topic for the given documents, read from the beginning."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.bootstrap_servers, group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    value = json.loads(record.value)
                    if value["document_id"] in document_ids:
                        assert record.key.decode() == value["document_id"]
                        found.append(value)
            if len(found) >= until_count and not batches:
                break
    finally:
        await consumer.stop()
    return found
