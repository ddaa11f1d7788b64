"""Shared fixtures: a real Kafka broker, a real HDFS and a real S3-compatible server, each started once per session."""

from __future__ import annotations

import pytest

from pipeline.local.hdfs import LocalHdfs
from pipeline.local.kafka import LocalBroker
from pipeline.local.milvus import LocalMilvus
from pipeline.local.ports import free_port
from pipeline.settings import Settings


@pytest.fixture(scope="session")
def kafka_settings(tmp_path_factory) -> Settings:
    """Settings of a local broker started for this test session, exactly as `docflow kafka start` does."""
    settings = Settings(
        home=tmp_path_factory.mktemp("docflow-home"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        # The pipeline ends at embeddings.ready unless a test asks for the index (milvus_settings).
        index="none",
    )
    broker = LocalBroker(settings)
    broker.start()
    yield settings
    broker.stop()
    assert not broker.is_running()


@pytest.fixture(scope="session")
def milvus(kafka_settings) -> LocalMilvus:
    """A local Milvus server started for this test session, exactly as `docflow milvus start` does."""
    server = LocalMilvus(kafka_settings.model_copy(update={"index": "milvus", "milvus_port": free_port()}))
    server.start()
    yield server
    server.stop()
    assert not server.is_running()


@pytest.fixture(scope="session")
def milvus_settings(milvus) -> Settings:
    """The session broker's settings with the session Milvus as the vector index."""
    return milvus.settings


@pytest.fixture(scope="session")
def hdfs(tmp_path_factory) -> LocalHdfs:
    """A local HDFS started for this test session, exactly as `docflow hdfs start` does."""
    settings = Settings(
        home=tmp_path_factory.mktemp("docflow-hdfs-home"),
        hdfs_namenode_port=free_port(),
        hdfs_http_port=free_port(),
        hdfs_heap="256m",
    )
    cluster = LocalHdfs(settings)
    cluster.start()
    yield cluster
    cluster.stop()
    assert not cluster.is_running()


@pytest.fixture(scope="session")
def s3_endpoint(monkeypatch_session) -> str:
    """A moto S3 server on loopback, with dummy credentials for the clients."""
    from moto.server import ThreadedMotoServer

    for name, value in {
        "AWS_ACCESS_KEY_ID": "docflow-test",
        "AWS_SECRET_ACCESS_KEY": "docflow-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch_session.setenv(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as patch:
        yield patch
