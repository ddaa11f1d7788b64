"""docflow's one settings object, read from ``DOCFLOW_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob docflow has; the README's configuration table lists them."""

    model_config = SettingsConfigDict(env_prefix="DOCFLOW_", frozen=True, extra="ignore")

    home: Path = Field(Path(".docflow"), description="Local state: broker data and logs, objects, tables.")

    # Kafka
    kafka_bootstrap_servers: str = Field("", description="Brokers to use; empty means the local broker.")
    kafka_port: int = Field(9092, description="Client port of the local broker.")
    kafka_controller_port: int = Field(9093, description="KRaft controller port of the local broker.")
    kafka_heap: str = Field("512m", description="JVM heap of the local broker.")
    kafka_libs: Path = Field(REPO_ROOT / "infra" / "kafka" / "libs", description="Broker jars from Maven Central.")
    topic_partitions: int = Field(8, ge=1, description="Partitions of every docflow topic.")
    topic_replication_factor: int = Field(1, ge=1, description="Replication factor of every docflow topic.")
    consumer_session_timeout_seconds: float = Field(
        30.0, gt=0, description="How soon a worker that died without leaving loses its partitions."
    )
    produce_timeout_seconds: float = Field(10.0, gt=0, description="How long a produce may wait for the broker.")
    producer_linger_ms: int = Field(
        5, ge=0, description="How long the chunker and embedder wait to fill a produce batch (web sends at once)."
    )
    producer_batch_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest produce batch per partition (an embedding is 4-8 KB of JSON)."
    )

    # HDFS (the local single-node cluster the Spark jobs archive to)
    hdfs_namenode_port: int = Field(8020, description="Namenode RPC port of the local HDFS (hdfs://127.0.0.1:PORT).")
    hdfs_http_port: int = Field(9870, description="Namenode web port of the local HDFS (UI, WebHDFS, JMX).")
    hdfs_heap: str = Field("512m", description="JVM heap of the local HDFS (namenode and datanode in one JVM).")
    hdfs_libs: Path = Field(REPO_ROOT / "infra" / "hadoop" / "libs", description="Hadoop jars from Maven Central.")

    # Storage
    storage_url: str = Field("", description="file://PATH or s3://BUCKET[/PREFIX]; empty means HOME/objects.")
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint (MinIO); empty means AWS.")
    s3_region: str = Field("us-east-1", description="S3 region.")

    # Web
    web_host: str = Field("127.0.0.1", description="Address the web role listens on.")
    web_port: int = Field(6066, description="Port the web role listens on.")
    web_canonical_url: str = Field(
        "", description="URL other web workers reach this one at; empty means http://HOST:PORT."
    )
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Largest accepted upload.")
    table_standby_replicas: int = Field(1, ge=0, description="Standby copies of the status table on other web workers.")

    # Chunking
    chunk_size_unit: Literal["tokens", "chars"] = Field(
        "tokens", description="What chunk sizes count: the local model's word pieces, or characters."
    )
    chunk_size: int = Field(250, ge=1, description="Default chunk size, in chunk_size_unit.")
    chunk_overlap: int = Field(30, ge=0, description="Default overlap between chunks, in chunk_size_unit.")
    pdf_extractor: Literal["pdfium", "pypdf"] = Field(
        "pdfium", description="PDF text extractor (pypdf is also the fallback)."
    )
    chunker_processes: int = Field(0, ge=0, description="Extraction processes per chunker worker; 0 means one per CPU.")
    chunker_batch_size: int = Field(8, ge=1, description="Documents handed to the extraction pool at once.")

    # Embedding
    embedding_backend: Literal["openai", "local", "hashing"] = Field("local", description="Embedding backend.")
    embedding_model: str = Field("", description="Model name; empty means the backend's default.")
    embedding_batch_size: int = Field(32, ge=1, description="Chunks per embedding batch.")
    embedding_threads: int = Field(0, ge=0, description="ONNX Runtime threads of the local model; 0 means one per CPU.")
    local_model_path: str = Field("", description="ONNX file of the local backend; empty means the bundled model.")
    local_tokenizer_path: str = Field("", description="tokenizer.json of that model; empty means the bundled one.")
    openai_base_url: str = Field("", description="OpenAI-compatible base URL; empty falls back to OPENAI_BASE_URL.")
    openai_api_key: str = Field("", description="API key; empty falls back to OPENAI_API_KEY.")
    openai_dimensions: int = Field(
        0, ge=0, description="Vector size asked of the model (text-embedding-3); 0 means its own."
    )
    openai_concurrency: int = Field(4, ge=1, description="Embedding requests in flight at once per embedder.")
    openai_max_retries: int = Field(
        5, ge=0, description="Retries of a request on 429, 5xx and timeouts (with backoff)."
    )
    openai_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of one embedding request.")
    embedding_cache: bool = Field(True, description="Cache vectors by sha256 of (model, text) in RocksDB per embedder.")

    # Vector index (Milvus)
    index: Literal["milvus", "none"] = Field(
        "milvus", description="Where chunks become searchable; none ends the pipeline at embeddings.ready."
    )
    milvus_uri: str = Field("", description="Milvus server (standalone, cluster, Zilliz); empty means the local one.")
    milvus_token: str = Field("", description="Milvus token (user:password or an API key); empty for none.")
    milvus_port: int = Field(19530, description="gRPC port of the local Milvus server (milvus-lite).")
    index_batch_size: int = Field(256, ge=1, description="Embeddings upserted into the index at once.")
    index_seal_idle_seconds: float = Field(
        5.0, ge=0, description="Flush what the indexer wrote once it has been idle this long; 0 never."
    )
    search_max_query_chars: int = Field(2000, ge=1, description="Longest accepted search query.")

    @field_validator("home", "kafka_libs", "hdfs_libs")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.expanduser().resolve()

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.kafka_port}"

    @property
    def objects_url(self) -> str:
        return self.storage_url or (self.home / "objects").as_uri()

    @property
    def kafka_dir(self) -> Path:
        return self.home / "kafka"

    @property
    def hdfs_dir(self) -> Path:
        return self.home / "hdfs"

    @property
    def milvus_dir(self) -> Path:
        return self.home / "milvus"

    @property
    def milvus_address(self) -> str:
        return self.milvus_uri or f"http://127.0.0.1:{self.milvus_port}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
