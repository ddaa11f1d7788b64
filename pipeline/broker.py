"""The local Apache Kafka broker: KRaft, single node, on loopback, jars from Maven Central.

`docflow kafka start|stop|status`, `docflow up` and the tests' fixture all go through
:class:`LocalBroker`, so the broker a test runs against is the one a user runs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError

from pipeline.settings import REPO_ROOT, Settings
from pipeline.topics import create_topics

POM = REPO_ROOT / "infra" / "kafka" / "pom.xml"
LOG4J2_CONFIG = REPO_ROOT / "infra" / "kafka" / "log4j2.properties"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started or stopped."""


def fetch_jars(libs: Path) -> None:
    """Resolve the broker's jars from Maven Central into ``libs`` (Maven caches them in ~/.m2)."""
    if any(libs.glob("kafka_2.13-*.jar")):
        return
    command = [
        "mvn", "-q", "-B", "-f", str(POM),
        "dependency:copy-dependencies", f"-DoutputDirectory={libs}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BrokerError(f"fetching Kafka jars with Maven failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


class LocalBroker:
    """One KRaft broker+controller process whose state lives under ``settings.kafka_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.kafka_dir
        self.data_dir = self.dir / "data"
        self.logs_dir = self.dir / "logs"
        self.config_file = self.dir / "server.properties"
        self.pid_file = self.dir / "broker.pid"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.kafka_port}"

    # -- state -------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The broker's pid when its process is alive, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if MAIN_CLASS.encode() not in cmdline or str(self.config_file).encode() not in cmdline:
            return None  # the pid was reused by another process
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    # -- start -------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> bool:
        """Start the broker and create the docflow topics; False when it was already running."""
        if self.is_running():
            asyncio.run(create_topics(self.settings))
            return False
        fetch_jars(self.settings.kafka_libs)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            self._format_storage()
        stdout = open(self.logs_dir / "stdout.log", "ab")
        process = subprocess.Popen(
            self._java(MAIN_CLASS, str(self.config_file)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the caller's terminal must not kill the broker half-way
        )
        stdout.close()
        self.pid_file.write_text(str(process.pid))
        try:
            self._wait_until_serving(process, timeout)
            asyncio.run(create_topics(self.settings))
        except BaseException:
            self.stop()
            raise
        return True

    def _classpath(self) -> str:
        return f"{self.settings.kafka_libs}/*"

    def _java(self, main_class: str, *args: str) -> list[str]:
        return [
            "java",
            f"-Xmx{self.settings.kafka_heap}",
            f"-Xms{self.settings.kafka_heap}",
            "-XX:+UseG1GC",
            # C1 only: C2's compiler threads spent about as much CPU as the broker's own work
            # in bench/e2e.py (a local broker shares a laptop's cores with the workers), and a
            # local broker never needs C2's peak throughput. Halved its CPU in that benchmark.
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp", self._classpath(),
            main_class, *args,
        ]

    def _write_config(self) -> None:
        s = self.settings
        controller = f"127.0.0.1:{s.kafka_controller_port}"
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{controller}",
            "listeners": f"PLAINTEXT://{self.address},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.address}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(s.topic_partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # A single local node: no reason to delay the first consumer-group rebalance.
            "group.initial.rebalance.delay.ms": "0",
        }
        self.config_file.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))

    def _format_storage(self) -> None:
        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: a leading '-' reads as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        result = subprocess.run(
            self._java(STORAGE_TOOL, "format", "-t", cluster_id, "-c", str(self.config_file)),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def _wait_until_serving(self, process: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BrokerError(f"the Kafka broker exited with {process.returncode}:\n{self.log_tail()}")
            if asyncio.run(self._answers_metadata()):
                return
            time.sleep(0.5)
        raise BrokerError(f"the Kafka broker did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    async def _answers_metadata(self) -> bool:
        client = AIOKafkaClient(bootstrap_servers=self.address, request_timeout_ms=2000)
        aiokafka_log = logging.getLogger("aiokafka")
        level = aiokafka_log.level
        aiokafka_log.setLevel(logging.CRITICAL)  # "connection refused" is expected while the JVM boots
        try:
            await client.bootstrap()
            return bool(client.cluster.brokers())
        except (KafkaError, OSError):
            return False
        finally:
            aiokafka_log.setLevel(level)
            await client.close()

    def log_tail(self, lines: int = 40) -> str:
        tails = []
        for name in ("server.log", "stdout.log"):
            path = self.logs_dir / name
            if path.exists():
                tails.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    # -- stop --------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then wait); False when it was not running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)  # a controlled shutdown that hangs must not leave a JVM behind
            while _alive(pid):
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
