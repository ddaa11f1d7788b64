"""The Prometheus metrics of seed 000 (docs/architecture.md, "Metrics"), served on /metrics of every role.

They live in prometheus_client's default registry, next to Faust's own sensor metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SIZE_BUCKETS = (1e3, 1e4, 1e5, 1e6, 5e6, 1e7, 5e7, 1e8)

# web
ingest_uploads_total = Counter("ingest_uploads_total", "Uploaded files.", ["company_id", "content_type", "status"])
ingest_upload_file_size_bytes = Histogram(
    "ingest_upload_file_size_bytes", "Size of uploaded files.", buckets=SIZE_BUCKETS
)
ingest_request_processing_duration_seconds = Histogram(
    "ingest_request_processing_duration_seconds", "Latency of ingestion requests."
)
ingest_kafka_messages_produced_total = Counter(
    "ingest_kafka_messages_produced_total", "Messages produced to Kafka.", ["topic", "status"]
)

# chunker
docproc_messages_consumed_total = Counter(
    "docproc_messages_consumed_total", "Messages consumed by the chunker.", ["topic", "status"]
)
docproc_processing_duration_seconds = Histogram(
    "docproc_processing_duration_seconds", "Time to extract and chunk one document.", ["company_id", "content_type"]
)
docproc_chunks_produced_total = Counter(
    "docproc_chunks_produced_total", "Chunks produced.", ["company_id", "content_type"]
)
docproc_processing_errors_total = Counter("docproc_processing_errors_total", "Processing errors by stage.", ["stage"])
docproc_s3_download_duration_seconds = Histogram(
    "docproc_s3_download_duration_seconds", "Time to read an original from storage."
)

# embedder
embedding_messages_consumed_total = Counter("embedding_messages_consumed_total", "Chunks received by the embedder.")
embedding_batch_processing_duration_seconds = Histogram(
    "embedding_batch_processing_duration_seconds", "Time to embed and emit one batch."
)
embedding_texts_processed_total = Counter(
    "embedding_texts_processed_total", "Texts turned into embeddings.", ["company_id"]
)
embedding_openai_api_duration_seconds = Histogram(
    "embedding_openai_api_duration_seconds", "Latency of OpenAI embedding calls."
)
embedding_openai_api_errors_total = Counter(
    "embedding_openai_api_errors_total", "Errors of OpenAI embedding calls.", ["model_name", "error_type"]
)
embedding_truncated_texts_total = Counter(
    "embedding_truncated_texts_total", "Texts longer than the local model reads, cut by it.", ["model_name"]
)
embedding_cache_hits_total = Counter(
    "embedding_cache_hits_total", "Texts whose vector came from the embedding cache.", ["model_name"]
)
embedding_cache_misses_total = Counter(
    "embedding_cache_misses_total", "Texts not in the embedding cache, sent to the backend.", ["model_name"]
)

# indexer
index_chunks_upserted_total = Counter("index_chunks_upserted_total", "Chunks written into the vector index.")
index_batch_duration_seconds = Histogram(
    "index_batch_duration_seconds", "Time to upsert one batch into the index and report it."
)
index_errors_total = Counter(
    "index_errors_total", "Failed index writes, by kind (unavailable: retried; refused: permanent).", ["error_type"]
)

# status (web): what the status agent folds into the table. A counter, not a gauge of documents
# per state: the table is spread over the web workers' partitions, so only each state change,
# counted where it happens, adds up across workers and survives rebalances. Labels: the few states.
documents_state_transitions_total = Counter(
    "documents_state_transitions_total",
    "Documents that entered each state, as the status agent folded their events.",
    ["state"],
)

# search (web)
search_requests_total = Counter("search_requests_total", "Search requests, by outcome.", ["status"])
search_duration_seconds = Histogram(
    "search_duration_seconds", "Time to answer a search: embedding the query and searching the index."
)

# trust boundary (web)
auth_failures_total = Counter(
    "auth_failures_total", "Requests refused for their credentials (missing, invalid, company_mismatch).", ["reason"]
)
rate_limited_requests_total = Counter(
    "rate_limited_requests_total", "Requests refused over a per-key rate limit, by action.", ["action"]
)

# lifecycle (chunker, embedder, indexer)
lifecycle_skipped_messages_total = Counter(
    "lifecycle_skipped_messages_total",
    "Messages of cancelled, deleted or superseded documents not worked on.",
    ["stage"],
)
