"""The local Apache Kafka broker: KRaft, single node, on loopback, jars from Maven Central.

`docflow kafka start|stop|status`, `docflow up` and the tests' fixture all go through
:class:`LocalBroker`, so the broker a test runs against is the one a user runs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import subprocess
import uuid
from pathlib import Path

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError

from pipeline.errors import BrokerError
from pipeline.local import jvm
from pipeline.local.server import LocalServer
from pipeline.settings import REPO_ROOT, Settings
from pipeline.topics import create_topics

POM = REPO_ROOT / "infra" / "kafka" / "pom.xml"
LOG4J2_CONFIG = REPO_ROOT / "infra" / "kafka" / "log4j2.properties"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"


def fetch_jars(libs: Path) -> None:
    """Resolve the broker's jars from Maven Central into ``libs`` (Maven caches them in ~/.m2)."""
    jvm.fetch_jars(POM, libs, "kafka_2.13-*.jar", BrokerError, "Kafka")


class LocalBroker(LocalServer):
    """One KRaft broker+controller process whose state lives under ``settings.kafka_dir``."""

    name = "the Kafka broker"
    label = "kafka"
    ready_means = "answer"
    marker = MAIN_CLASS
    error = BrokerError
    log_files = ("server.log", "stdout.log")

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

    @property
    def where(self) -> str:
        return self.address

    @property
    def identity(self) -> Path:
        return self.config_file

    def serving(self) -> bool:
        return asyncio.run(self._answers_metadata())

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
        self.launch(self._java(MAIN_CLASS, str(self.config_file)), timeout)
        try:
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
            "-cp",
            self._classpath(),
            main_class,
            *args,
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
