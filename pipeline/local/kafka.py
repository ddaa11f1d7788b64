"""The local Apache Kafka broker: KRaft, single node, on loopback, jars from Maven Central.

`docflow kafka start|stop|status`, `docflow up` and the tests' fixture all go through
:class:`LocalBroker`, so the broker a test runs against is the one a user runs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import secrets
import subprocess
import uuid
from pathlib import Path

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError

from pipeline.broker_security import LOGIN_MODULES, client_options
from pipeline.errors import BrokerError
from pipeline.local import jvm
from pipeline.local.server import LocalServer
from pipeline.settings import REPO_ROOT, Settings
from pipeline.topics import create_topics

POM = REPO_ROOT / "infra" / "kafka" / "pom.xml"
LOG4J2_CONFIG = REPO_ROOT / "infra" / "kafka" / "log4j2.properties"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
# The broker's own SASL user (inter-broker listener); its password is kept beside the config.
BROKER_USER = "docflow-broker"
SASL_LISTENER = "SASL_PLAINTEXT"
# Names and passwords go into JAAS options and --add-scram text as they are: plain tokens only.
SASL_NAME = re.compile(r"[A-Za-z0-9._-]+")
SASL_PASSWORD = re.compile(r"[A-Za-z0-9._~!@#$%^&*+/-]+")


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

    def __init__(self, settings: Settings, sasl_users: dict[str, str] | None = None) -> None:
        """A broker with the state of ``settings``; by default the plaintext one of ``docflow kafka start``.

        ``sasl_users`` (name -> password) makes its client listener SASL_PLAINTEXT instead, for
        ``settings.kafka_sasl_mechanism`` (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512), to run
        docflow against an authenticating broker (tests/test_broker_security.py). ``settings``
        must then say SASL_PLAINTEXT and name one of these users: the broker's readiness
        check and topic creation connect with it. SCRAM users are stored when the storage is
        formatted, so they take effect on a fresh ``kafka_dir`` only. The KRaft controller
        listener stays PLAINTEXT; every listener is on 127.0.0.1.
        """
        self.settings = settings
        self.sasl_users = dict(sasl_users) if sasl_users else None
        if self.sasl_users is not None:
            self._check_sasl(settings, self.sasl_users)
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
        if self.sasl_users is None and self.settings.kafka_security_protocol != "PLAINTEXT":
            raise BrokerError(
                f"the local broker speaks PLAINTEXT, not DOCFLOW_KAFKA_SECURITY_PROTOCOL="
                f"{self.settings.kafka_security_protocol}: point DOCFLOW_KAFKA_BOOTSTRAP_SERVERS at the secured brokers"
            )
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
            "listeners": f"{self._listener}://{self.address},CONTROLLER://{controller}",
            "advertised.listeners": f"{self._listener}://{self.address}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": self._listener,
            "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,{self._listener}:{self._listener}",
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
            **self._sasl_properties(),
        }
        self.config_file.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        if self.sasl_users is not None:
            self.config_file.chmod(0o600)  # it holds the users' passwords

    # -- SASL (sasl_users) ----------------------------------------------------------------

    @staticmethod
    def _check_sasl(settings: Settings, users: dict[str, str]) -> None:
        if settings.kafka_security_protocol != "SASL_PLAINTEXT" or settings.kafka_sasl_mechanism not in LOGIN_MODULES:
            raise BrokerError(
                "a local broker with SASL users serves SASL_PLAINTEXT with PLAIN or SCRAM: settings say "
                f"{settings.kafka_security_protocol} with {settings.kafka_sasl_mechanism}"
            )
        for name, password in users.items():
            if name == BROKER_USER or not SASL_NAME.fullmatch(name) or not SASL_PASSWORD.fullmatch(password):
                raise BrokerError(
                    f"local broker SASL user {name!r}: a name matches {SASL_NAME.pattern} (not {BROKER_USER}), "
                    f"a password {SASL_PASSWORD.pattern}"
                )

    @property
    def _listener(self) -> str:
        return "PLAINTEXT" if self.sasl_users is None else SASL_LISTENER

    def _broker_password(self) -> str:
        """The broker's own password, made once per kafka_dir (SCRAM stores it at format time)."""
        secret = self.dir / "sasl-broker.secret"
        if not secret.exists():
            secret.touch(mode=0o600)
            secret.write_text(secrets.token_hex(16))
        return secret.read_text().strip()

    def _sasl_properties(self) -> dict[str, str]:
        if self.sasl_users is None:
            return {}
        mechanism = self.settings.kafka_sasl_mechanism
        password = self._broker_password()
        jaas = f'{LOGIN_MODULES[mechanism]} required username="{BROKER_USER}" password="{password}"'
        if mechanism == "PLAIN":  # PLAIN's users live in the JAAS config itself
            users = {BROKER_USER: password, **self.sasl_users}
            jaas += "".join(f' user_{name}="{secret}"' for name, secret in users.items())
        return {
            "sasl.enabled.mechanisms": mechanism,
            "sasl.mechanism.inter.broker.protocol": mechanism,
            f"listener.name.{SASL_LISTENER.lower()}.{mechanism.lower()}.sasl.jaas.config": jaas + ";",
        }

    def _scram_users(self) -> list[str]:
        """kafka-storage format's --add-scram arguments: the SCRAM users, the broker's own first."""
        mechanism = self.settings.kafka_sasl_mechanism
        if self.sasl_users is None or not mechanism.startswith("SCRAM-"):
            return []
        users = {BROKER_USER: self._broker_password(), **self.sasl_users}
        return [
            arg for name, pw in users.items() for arg in ("--add-scram", f"{mechanism}=[name={name},password={pw}]")
        ]

    def _format_storage(self) -> None:
        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: a leading '-' reads as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        result = subprocess.run(
            self._java(STORAGE_TOOL, "format", "-t", cluster_id, "-c", str(self.config_file), *self._scram_users()),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    async def _answers_metadata(self) -> bool:
        client = AIOKafkaClient(
            bootstrap_servers=self.address, request_timeout_ms=2000, **client_options(self.settings)
        )
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
