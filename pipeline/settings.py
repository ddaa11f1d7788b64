"""docflow's one settings object, read from ``DOCFLOW_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.ids import valid_id

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob docflow has; the README's configuration table lists them."""

    # A .env file in the working directory (seed 000) is read too; the environment wins over it.
    model_config = SettingsConfigDict(
        env_prefix="DOCFLOW_", env_file=".env", env_file_encoding="utf-8", frozen=True, extra="ignore"
    )

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
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers: TLS, SASL, both or neither."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "AWS_MSK_IAM"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism; AWS_MSK_IAM signs with the AWS credentials of the process."
    )
    kafka_sasl_username: str = Field("", description="SASL user (PLAIN, SCRAM).")
    kafka_sasl_password: str = Field("", description="SASL password (PLAIN, SCRAM).")
    kafka_ssl_cafile: str = Field(
        "", description="CA bundle that signs the brokers' certificates; empty means the system's."
    )
    kafka_ssl_certfile: str = Field("", description="Client certificate for mutual TLS; empty for none.")
    kafka_ssl_keyfile: str = Field("", description="Key of the client certificate.")
    kafka_aws_region: str = Field("", description="Region of the MSK cluster (AWS_MSK_IAM); empty means S3_REGION.")

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

    # Trust boundary
    auth: Literal["off", "required"] = Field(
        "off", description="API keys: required, or off (only for a web role on a loopback address)."
    )
    auth_secret: str = Field(
        "", description="Server secret the API keys are hashed with (HMAC); empty means one kept in HOME/auth.secret."
    )
    api_key: str = Field("", description="The API key the docflow command line sends.")
    default_company_id: str = Field(
        "", description="Company of a request that names none, with auth off (a single-tenant demo); empty means none."
    )
    rate_limit_uploads_per_minute: int = Field(
        120, ge=0, description="Uploads per key and minute per web worker; 0 means no limit."
    )
    rate_limit_searches_per_minute: int = Field(
        600, ge=0, description="Searches per key and minute per web worker; 0 means no limit."
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed to call the API from a browser; empty means none."
    )
    storage_sweep_grace_seconds: float = Field(
        3600.0, gt=0, description="Age before a stored original that no event names is removed as an orphan."
    )

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
    max_pages: int = Field(2000, ge=1, description="Most pages a document may have; more fails it unread.")
    extraction_timeout_seconds: float = Field(
        300.0, gt=0, description="Longest time one document may take to extract and split."
    )
    extraction_memory_mb: int = Field(
        4096,
        ge=256,
        description="Memory an extraction process may use; a document needing more fails, the worker lives.",
    )

    # URL ingestion (the chunker fetches)
    url_allow: str = Field(
        "", description="Comma-separated hosts or networks (CIDR) a URL may reach although private or loopback."
    )
    url_max_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Largest page or file fetched from a URL.")
    url_timeout_seconds: float = Field(30.0, gt=0, description="Longest time a URL's whole fetch may take.")
    url_max_redirects: int = Field(5, ge=0, description="Redirects a URL fetch follows, each checked again.")

    # OCR of PDF pages without a text layer
    ocr: Literal["off", "local", "openai"] = Field(
        "off", description="OCR of pages without text: off, the local engine (RapidOCR), or a vision model."
    )
    ocr_max_pages: int = Field(200, ge=0, description="Most pages OCRed per document; the rest count as unread.")
    ocr_timeout_seconds: float = Field(600.0, gt=0, description="Longest time a document's OCR may take.")
    ocr_dpi: int = Field(200, ge=50, le=600, description="Resolution pages are rendered at for OCR.")
    ocr_max_pixels: int = Field(
        25_000_000, ge=100_000, description="Largest rendered page image (pixels); larger pages render smaller."
    )
    ocr_min_text_chars: int = Field(20, ge=0, description="A page with fewer characters of text is OCRed.")
    ocr_openai_base_url: str = Field("", description="OpenAI-compatible chat API of the vision model (OCR=openai).")
    ocr_openai_api_key: str = Field("", description="Its API key; empty falls back to DOCFLOW_OPENAI_API_KEY.")
    ocr_model: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", description="Vision model that reads a page (OCR=openai).")
    ocr_prompt: str = Field(
        "Transcribe all text on this page exactly, in reading order. Output only the text.",
        description="What the vision model is asked for each page.",
    )
    ocr_concurrency: int = Field(4, ge=1, description="Pages sent to the vision model at once (OCR=openai).")

    # Embedding
    embedding_backend: Literal["openai", "local", "hashing"] = Field("local", description="Embedding backend.")
    embedding_model: str = Field("", description="Model name; empty means the backend's default.")
    embedding_batch_size: int = Field(32, ge=1, description="Chunks per embedding batch.")
    embedding_threads: int = Field(
        0, ge=0, description="Model runs at once of the local model, one CPU each; 0 means one per CPU."
    )
    local_model_path: str = Field("", description="ONNX file of the local backend; empty means the bundled model.")
    local_tokenizer_path: str = Field("", description="tokenizer.json of that model; empty means the bundled one.")
    local_model_precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="Matrix products of the bundled local model: fp32 as published, or int8 (faster, 0.99+ cosine).",
    )
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

    # Operations
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port this role also serves /metrics on (seed 000: 8001, 8002); 0 means none."
    )
    metrics_host: str = Field("127.0.0.1", description="Address that metrics port listens on.")
    otel_endpoint: str = Field(
        "", description="OTLP/HTTP endpoint traces are exported to (http://HOST:4318); empty means no tracing."
    )

    @field_validator("home", "kafka_libs", "hdfs_libs")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.expanduser().resolve()

    @field_validator("default_company_id")
    @classmethod
    def _valid_default_company(cls, company_id: str) -> str:
        if company_id and not valid_id(company_id):
            raise ValueError("must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return company_id

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.kafka_port}"

    @property
    def objects_url(self) -> str:
        return self.storage_url or (self.home / "objects").as_uri()

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

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
