"""Kafka TLS and SASL from the settings (pipeline/broker_security.py), against a broker that authenticates.

A second local broker runs with a SASL_PLAINTEXT listener and SCRAM-SHA-512 users (its KRaft
controller listener stays PLAINTEXT, everything on 127.0.0.1). Against it: aiokafka clients
built with client_options round-trip a message and a wrong password is refused; a Faust app
from create_app connects with faust_credentials (topics created, its producer sends, a chunker
worker process joins its group and reports healthy); a JVM Kafka client reads the properties
file java_properties writes. The JVM properties of every mechanism are checked as text too.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from pipeline import broker_security
from pipeline.broker_security import client_options, faust_credentials, java_properties, properties_file
from pipeline.errors import BrokerError, KafkaSecurityError
from pipeline.local.kafka import LocalBroker
from pipeline.local.ports import free_port
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.settings import REPO_ROOT, Settings
from pipeline.topics import DOCUMENTS_RAW, TOPICS

USER, PASSWORD = "docflow-app", "s3cret.pw-" + uuid.uuid4().hex[:8]
JOBS = REPO_ROOT / "jobs"


@pytest.fixture(scope="module")
def sasl_settings(tmp_path_factory) -> Settings:
    """Settings of a SCRAM-SHA-512 broker started for this module, as a client of it sees them."""
    settings = Settings(
        home=tmp_path_factory.mktemp("docflow-sasl-home"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        topic_partitions=2,
        index="none",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=USER,
        kafka_sasl_password=PASSWORD,
    )
    broker = LocalBroker(settings, sasl_users={USER: PASSWORD, "other": "other-pw"})
    broker.start()  # its readiness check and create_topics connect with client_options(settings)
    yield settings
    broker.stop()
    assert not broker.is_running()


def test_the_broker_serves_only_sasl_on_loopback(sasl_settings):
    config = (sasl_settings.kafka_dir / "server.properties").read_text()
    assert f"listeners=SASL_PLAINTEXT://127.0.0.1:{sasl_settings.kafka_port}," in config
    assert f"CONTROLLER://127.0.0.1:{sasl_settings.kafka_controller_port}" in config
    assert "sasl.enabled.mechanisms=SCRAM-SHA-512" in config
    assert (sasl_settings.kafka_dir / "server.properties").stat().st_mode & 0o077 == 0


async def test_clients_from_client_options_round_trip_a_message(sasl_settings):
    admin = AIOKafkaAdminClient(bootstrap_servers=sasl_settings.bootstrap_servers, **client_options(sasl_settings))
    await admin.start()
    try:
        assert {spec.name for spec in TOPICS} <= set(await admin.list_topics())  # create_topics worked
    finally:
        await admin.close()

    key, value = uuid.uuid4().hex.encode(), b'{"over": "SCRAM-SHA-512"}'
    producer = AIOKafkaProducer(
        bootstrap_servers=sasl_settings.bootstrap_servers, acks="all", **client_options(sasl_settings)
    )
    await producer.start()
    try:
        sent = await producer.send_and_wait(DOCUMENTS_RAW.name, value, key=key)
    finally:
        await producer.stop()
    assert await _read_back(sasl_settings, DOCUMENTS_RAW.name, key) == (sent.partition, value)


async def test_a_wrong_password_or_no_sasl_is_refused_with_the_brokers_reason(sasl_settings, caplog):
    wrong = sasl_settings.model_copy(update={"kafka_sasl_password": "not-the-password"})
    producer = AIOKafkaProducer(bootstrap_servers=wrong.bootstrap_servers, **client_options(wrong))
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError):
        try:
            await producer.start()
        finally:
            await producer.stop()
    assert (
        "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
        in (caplog.text)
    )

    plaintext = sasl_settings.model_copy(update={"kafka_security_protocol": "PLAINTEXT"})
    assert client_options(plaintext) == {}
    producer = AIOKafkaProducer(bootstrap_servers=plaintext.bootstrap_servers, request_timeout_ms=3000)
    with pytest.raises(KafkaConnectionError):
        try:
            await producer.start()
        finally:
            await producer.stop()


def test_faust_gets_the_sasl_credentials_of_the_settings(sasl_settings):
    # The worker process below shows a Faust app joining over SASL; building one here would
    # register its Prometheus metrics a second time in this process (test_worker builds one).
    credentials = faust_credentials(sasl_settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")


def test_a_chunker_worker_joins_its_group_over_sasl(sasl_settings, tmp_path):
    """The real `docflow worker --role chunker` process: healthy (its broker probe authenticates)
    and owning every partition of documents.raw (its consumer group joined)."""
    stack = WorkerStack(sasl_settings, worker_env(sasl_settings), tmp_path)
    assert stack.env["DOCFLOW_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    try:
        stack.launch({"chunker": 1})
    finally:
        stack.stop_all()


def test_a_jvm_client_connects_with_the_java_properties_file(sasl_settings, tmp_path):
    """Kafka's own Java client (the broker's kafka-clients jar) lists the topics with the
    client.properties that `python -m pipeline.broker_security` writes, and fails with a wrong password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCFLOW_")}
    env.update({f"DOCFLOW_{field.upper()}": getattr(sasl_settings, field) for field in broker_security.SETTINGS_FIELDS})
    good, bad = tmp_path / "client.properties", tmp_path / "wrong.properties"
    for path, password in ((good, PASSWORD), (bad, "wrong")):
        command = [sys.executable, "-m", "pipeline.broker_security", "--output", str(path)]
        subprocess.run(command, env={**env, "DOCFLOW_KAFKA_SASL_PASSWORD": password}, check=True, cwd=REPO_ROOT)
    assert good.stat().st_mode & 0o077 == 0
    assert "ScramLoginModule required" in good.read_text()

    source = tmp_path / "ListTopics.java"
    source.write_text(JAVA_LIST_TOPICS)
    java = ["java", "-cp", f"{sasl_settings.kafka_libs}/*", str(source), sasl_settings.bootstrap_servers]
    listed = subprocess.run([*java, str(good)], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert {spec.name for spec in TOPICS} <= set(listed.stdout.split())

    refused = subprocess.run([*java, str(bad)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "SaslAuthenticationException" in refused.stderr


JAVA_LIST_TOPICS = """
import java.io.FileReader;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;

public class ListTopics {
    public static void main(String[] args) throws Exception {
        Properties properties = new Properties();
        try (FileReader reader = new FileReader(args[1])) { properties.load(reader); }
        properties.put("bootstrap.servers", args[0]);
        properties.put("request.timeout.ms", "10000");
        properties.put("default.api.timeout.ms", "15000");
        try (Admin admin = Admin.create(properties)) {
            for (String name : admin.listTopics().names().get()) System.out.println(name);
        }
    }
}
"""


async def _read_back(settings: Settings, topic: str, key: bytes) -> tuple[int, bytes] | None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        **client_options(settings),
    )
    await consumer.start()
    try:
        for _ in range(20):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    if record.key == key:
                        return record.partition, record.value
    finally:
        await consumer.stop()
    return None


# ------------------------------------------------------------------- without a broker


def settings_of(**security) -> Settings:
    return Settings(home=Path("/tmp/docflow-unused"), **security)


def test_plaintext_changes_nothing():
    settings = settings_of()
    assert client_options(settings) == {}
    assert faust_credentials(settings) is None
    assert java_properties(settings) == {}


@pytest.mark.parametrize(
    ("mechanism", "login_module"),
    [
        ("PLAIN", "org.apache.kafka.common.security.plain.PlainLoginModule"),
        ("SCRAM-SHA-256", "org.apache.kafka.common.security.scram.ScramLoginModule"),
        ("SCRAM-SHA-512", "org.apache.kafka.common.security.scram.ScramLoginModule"),
    ],
)
def test_java_properties_of_a_password_mechanism(mechanism, login_module):
    settings = settings_of(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="app",
        kafka_sasl_password='pa"ss\\word',
        kafka_ssl_cafile="/etc/docflow/kafka-ca.pem",
    )
    assert java_properties(settings) == {
        "security.protocol": "SASL_SSL",
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": "/etc/docflow/kafka-ca.pem",
        "sasl.mechanism": mechanism,
        "sasl.jaas.config": f'{login_module} required username="app" password="pa\\"ss\\\\word";',
    }


def test_java_properties_of_msk_iam():
    settings = settings_of(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="AWS_MSK_IAM")
    assert java_properties(settings) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "AWS_MSK_IAM",
        "sasl.jaas.config": "software.amazon.msk.auth.iam.IAMLoginModule required;",
        "sasl.client.callback.handler.class": "software.amazon.msk.auth.iam.IAMClientCallbackHandler",
    }


def test_java_properties_of_tls_with_a_client_certificate():
    settings = settings_of(kafka_security_protocol="SSL", kafka_ssl_cafile="/ca.pem", kafka_ssl_certfile="/client.pem")
    assert java_properties(settings) == {
        "security.protocol": "SSL",
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": "/ca.pem",
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": "/client.pem",
    }
    split = settings.model_copy(update={"kafka_ssl_keyfile": "/client.key"})
    with pytest.raises(KafkaSecurityError, match="one PEM file"):
        java_properties(split)


@pytest.mark.parametrize(
    ("security", "message"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512"},
            "DOCFLOW_KAFKA_SASL_USERNAME",
        ),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "AWS_MSK_IAM"}, "SASL_SSL"),
        (
            {"kafka_ssl_cafile": "/ca.pem"},
            "DOCFLOW_KAFKA_SSL_CAFILE set, but DOCFLOW_KAFKA_SECURITY_PROTOCOL=PLAINTEXT",
        ),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"}, "DOCFLOW_KAFKA_SSL_CERTFILE"),
    ],
)
def test_contradictory_settings_are_refused_by_name(security, message):
    for compute in (client_options, java_properties):
        with pytest.raises(KafkaSecurityError, match=message):
            compute(settings_of(**security))


def test_tls_gives_every_client_one_context():
    certifi = pytest.importorskip("certifi")
    settings = settings_of(kafka_security_protocol="SSL", kafka_ssl_cafile=certifi.where())
    options = client_options(settings)
    assert options["security_protocol"] == "SSL" and options["ssl_context"].verify_mode.name == "CERT_REQUIRED"
    assert isinstance(faust_credentials(settings), faust.SSLCredentials)
    sasl_ssl = settings.model_copy(
        update={"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u", "kafka_sasl_password": "p"}
    )
    credentials = faust_credentials(sasl_ssl)
    assert isinstance(credentials, faust.SASLCredentials) and credentials.protocol.value == "SASL_SSL"
    assert credentials.ssl_context is not None


def test_msk_iam_without_its_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", None)  # as if not installed
    settings = settings_of(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="AWS_MSK_IAM")
    with pytest.raises(KafkaSecurityError, match=r"pip install 'docflow\[msk\]'"):
        client_options(settings)


async def test_msk_iam_signs_a_token_with_the_aws_credentials(monkeypatch):
    pytest.importorskip("aws_msk_iam_sasl_signer")
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret"}.items():
        monkeypatch.setenv(name, value)
    settings = settings_of(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="AWS_MSK_IAM", kafka_aws_region="eu-west-1"
    )
    options = client_options(settings)
    assert options["sasl_mechanism"] == "OAUTHBEARER" and options["security_protocol"] == "SASL_SSL"
    token = await options["sasl_oauth_token_provider"].token()
    import base64

    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    assert url.startswith("https://kafka.eu-west-1.amazonaws.com/?Action=kafka-cluster%3AConnect")
    assert await options["sasl_oauth_token_provider"].token() == token  # reused, not signed per connection
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.OAuthCredentials) and credentials.protocol.value == "SASL_SSL"


def test_a_local_broker_refuses_security_it_does_not_serve(tmp_path):
    with pytest.raises(BrokerError, match="speaks PLAINTEXT"):
        LocalBroker(
            Settings(
                home=tmp_path, kafka_security_protocol="SASL_SSL", kafka_sasl_username="u", kafka_sasl_password="p"
            )
        ).start()
    with pytest.raises(BrokerError, match="SASL_PLAINTEXT with PLAIN or SCRAM"):
        LocalBroker(Settings(home=tmp_path), sasl_users={"u": "p"})


# ------------------------------------------------------------------- the JVM jobs


def test_the_properties_file_reads_back_the_same_in_the_jobs(tmp_path):
    properties = java_properties(
        settings_of(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="app",
            kafka_sasl_password='p=a:s"s\\w #rd',
            kafka_ssl_cafile="/etc/ca bundle.pem",
        )
    )
    text = "# written by pipeline.broker_security\n" + properties_file(properties)
    flink = _load(JOBS / "flink" / "chunk_counts.py")
    assert flink.read_properties(text) == properties
    # jobs/spark/session.py imports pyspark: its copy of the reader is checked in its own venv.
    spark_python = JOBS / "spark" / ".venv" / "bin" / "python"
    if spark_python.exists():
        read = subprocess.run(
            [
                str(spark_python),
                "-c",
                "import json, sys, session; print(json.dumps(session.read_properties(sys.stdin.read())))",
            ],
            input=text,
            capture_output=True,
            text=True,
            cwd=JOBS / "spark",
            check=True,
        )
        assert json.loads(read.stdout) == properties


def test_the_flink_job_passes_the_properties_to_its_relocated_kafka_client(tmp_path):
    flink = _load(JOBS / "flink" / "chunk_counts.py")
    path = tmp_path / "client.properties"
    path.write_text(
        properties_file(
            java_properties(
                settings_of(
                    kafka_security_protocol="SASL_PLAINTEXT",
                    kafka_sasl_mechanism="SCRAM-SHA-512",
                    kafka_sasl_username="app",
                    kafka_sasl_password="pw",
                )
            )
        )
    )
    args = flink.parse_args(["--kafka-properties", str(path)])
    shaded = "org.apache.flink.kafka.shaded.org.apache.kafka.common.security.scram.ScramLoginModule"
    for ddl in (flink.source_ddl(args), flink.sink_ddl(args)):
        assert "'properties.security.protocol' = 'SASL_PLAINTEXT'" in ddl
        assert "'properties.sasl.mechanism' = 'SCRAM-SHA-512'" in ddl
        assert f"'properties.sasl.jaas.config' = '{shaded} required username=\"app\" password=\"pw\";'" in ddl
    assert "properties.security" not in flink.source_ddl(flink.parse_args([]))

    path.write_text(
        properties_file(
            java_properties(settings_of(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="AWS_MSK_IAM"))
        )
    )
    with pytest.raises(SystemExit):
        flink.parse_args(["--kafka-properties", str(path)])


def _load(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{path.stem}_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_emr_stages_the_properties_file_beside_each_job_and_passes_its_node_path(monkeypatch, tmp_path):
    """Not as step arguments: those are shown to anyone who may describe the step."""
    properties = tmp_path / "msk.properties"
    properties.write_text(
        properties_file(
            java_properties(settings_of(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="AWS_MSK_IAM"))
        )
    )
    for name in [name for name in os.environ if name.startswith("DOCFLOW_EMR_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DOCFLOW_EMR_BUCKET", "docflow-test")
    monkeypatch.setenv("DOCFLOW_EMR_KAFKA_BOOTSTRAP_SERVERS", "b-1.msk.example:9098")
    monkeypatch.setenv("DOCFLOW_EMR_KAFKA_PROPERTIES", str(properties))
    submit = _load(JOBS / "emr" / "submit.py")
    settings = submit.EmrSettings.from_env()
    staged = {item.key: item.local for item in submit.staging_plan(settings, fetch_jars=False)}
    for job in ("flink", "spark"):
        assert staged[f"docflow/emr/jobs/{job}/kafka-client.properties"] == properties
    layout = submit.NodeLayout(submit.PurePosixPath(settings.node_root))
    for step, job in ((submit.flink_step(settings, layout), "flink"), (submit.archive_step(settings, layout), "spark")):
        args = step["HadoopJarStep"]["Args"]
        assert args[args.index("--kafka-properties") + 1] == f"/opt/docflow/jobs/{job}/kafka-client.properties"
        assert not any("sasl" in arg for arg in args)
