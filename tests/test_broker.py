"""The local broker: started by the project's own code, with every docflow topic, carrying real messages."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.local.kafka import LocalBroker
from pipeline.topics import DOCUMENTS_RAW, TOPICS


async def test_broker_has_every_docflow_topic_with_configured_partitions(kafka_settings):
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics([spec.name for spec in TOPICS])}
    finally:
        await admin.close()
    assert set(described) == {spec.name for spec in TOPICS}
    for topic in described.values():
        assert topic["error_code"] == 0
        assert len(topic["partitions"]) == kafka_settings.topic_partitions


async def test_message_produced_to_documents_raw_is_consumed_with_its_key(kafka_settings):
    document_id = str(uuid.uuid4())
    payload = {"document_id": document_id, "company_id": "acme"}
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(DOCUMENTS_RAW.name, json.dumps(payload).encode(), key=document_id.encode())
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_settings.bootstrap_servers,
        group_id=f"test-{document_id}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        from aiokafka import TopicPartition

        partition = TopicPartition(DOCUMENTS_RAW.name, sent.partition)
        consumer.assign([partition])
        consumer.seek(partition, sent.offset)
        records = await consumer.getmany(partition, timeout_ms=10_000)
    finally:
        await consumer.stop()
    [record] = records[partition][:1]
    assert record.key == document_id.encode()
    assert json.loads(record.value) == payload


def test_start_again_says_already_running_and_keeps_the_same_process(kafka_settings):
    broker = LocalBroker(kafka_settings)
    pid = broker.pid()
    assert broker.start() is False
    assert broker.pid() == pid


def test_cli_status_reports_running_broker_and_its_address(kafka_settings):
    env = {
        "DOCFLOW_HOME": str(kafka_settings.home),
        "DOCFLOW_KAFKA_PORT": str(kafka_settings.kafka_port),
        "DOCFLOW_KAFKA_CONTROLLER_PORT": str(kafka_settings.kafka_controller_port),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "kafka", "status"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert f"running at 127.0.0.1:{kafka_settings.kafka_port}" in result.stdout


def test_stopped_broker_leaves_no_process_and_restarts_on_its_data(tmp_path):
    from pipeline.local.ports import free_port
    from pipeline.settings import Settings

    settings = Settings(home=tmp_path, kafka_port=free_port(), kafka_controller_port=free_port())
    broker = LocalBroker(settings)
    assert broker.start() is True
    pid = broker.pid()
    assert broker.stop() is True
    assert not broker.is_running()
    assert not _process_exists(pid)
    assert broker.stop() is False
    assert broker.start() is True  # storage already formatted: starts on the existing data
    broker.stop()


def _process_exists(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
