"""The one async interface of object storage for originals.

Keys are ``{company_id}/{document_id}/{filename}`` (:func:`pipeline.ids.object_key` builds
them from untrusted input). ``put`` takes bytes or an async iterator of bytes and streams
it; a failed or abandoned ``put`` leaves nothing behind under the key. ``listing`` walks
what is stored, for the sweeper of orphan originals (:mod:`pipeline.storage.sweep`).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

READ_CHUNK_BYTES = 1024 * 1024

Body = bytes | AsyncIterable[bytes]


@dataclass(frozen=True)
class StoredObject:
    key: str
    uri: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ListedObject:
    """One object as a listing sees it: its key, size and last modification (ms since the epoch)."""

    key: str
    size_bytes: int
    modified_ms: int


async def iterate(body: Body) -> AsyncIterator[bytes]:
    """The pieces of a body, whether it is bytes or an async iterator of them."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        yield bytes(body)
    else:
        async for piece in body:
            if piece:
                yield piece


class ObjectStorage(abc.ABC):
    """Where originals live; ``close()`` (or ``async with``) releases connections."""

    async def __aenter__(self) -> ObjectStorage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release connections."""

    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """The storage URI of a key, as carried in ``s3_path``."""

    @abc.abstractmethod
    def key_of(self, uri: str) -> str:
        """The key of a URI of this storage; ValueError for a URI elsewhere."""

    @abc.abstractmethod
    async def put(self, key: str, body: Body, content_type: str = "application/octet-stream") -> StoredObject:
        """Store body under key, streaming it; returns its size and sha256."""

    @abc.abstractmethod
    def stream(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes, piece by piece; ObjectNotFound when missing."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether an object is stored under key."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; no error when it is missing."""

    @abc.abstractmethod
    def listing(self, prefix: str = "") -> AsyncIterator[ListedObject]:
        """Every object whose key starts with prefix, in no promised order; StorageError when unreachable."""

    async def get(self, key: str) -> bytes:
        return b"".join([piece async for piece in self.stream(key)])
