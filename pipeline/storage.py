"""Object storage for originals: one async interface, ``file://`` and ``s3://`` behind it.

Keys are ``{company_id}/{document_id}/{filename}``; :func:`object_key` builds them from
untrusted input. ``put`` takes bytes or an async iterator of bytes and streams it: to a
temporary file renamed into place, or to S3 as one PUT or a multipart upload. A failed
or abandoned ``put`` leaves nothing behind under the key.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import AsyncIterable, AsyncIterator
from urllib.parse import unquote, urlparse

from pipeline.settings import Settings

MAX_FILENAME_BYTES = 200
READ_CHUNK_BYTES = 1024 * 1024
S3_PART_BYTES = 8 * 1024 * 1024  # S3's minimum part size is 5 MiB

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UNSAFE_FILENAME_CHARS = re.compile(r"[^\w.\- ()+,=@]", re.UNICODE)

Body = bytes | AsyncIterable[bytes]


class StorageError(RuntimeError):
    """Storage is unreachable or refused an operation."""


class ObjectNotFound(StorageError, KeyError):
    """No object under the key."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    uri: str
    size_bytes: int
    sha256: str


def valid_id(value: str) -> bool:
    """Company and document ids are short, printable and cannot climb out of a prefix."""
    return bool(_ID_PATTERN.fullmatch(value)) and ".." not in value


def sanitize_filename(filename: str) -> str:
    """A filename safe as the last key segment: no directories, no control characters, bounded."""
    # Percent-decoded first: some clients quote '/' in multipart filenames as %2F.
    name = unicodedata.normalize("NFC", unquote(filename)).replace("\\", "/")
    name = name.rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = _UNSAFE_FILENAME_CHARS.sub("_", name).strip(" .")
    if not name:
        return "document"
    stem, dot, ext = name.rpartition(".")
    if not dot or len(ext.encode()) > 16:
        stem, ext = name, ""
    suffix = f".{ext}" if ext else ""
    budget = MAX_FILENAME_BYTES - len(suffix.encode())
    stem = stem.encode()[:budget].decode(errors="ignore").rstrip(" .") or "document"
    return stem + suffix


def object_key(company_id: str, document_id: str, filename: str) -> str:
    for label, value in (("company id", company_id), ("document id", document_id)):
        if not valid_id(value):
            raise ValueError(f"invalid {label}: {value!r}")
    return f"{company_id}/{document_id}/{sanitize_filename(filename)}"


async def _iterate(body: Body) -> AsyncIterator[bytes]:
    if isinstance(body, (bytes, bytearray, memoryview)):
        yield bytes(body)
    else:
        async for piece in body:
            if piece:
                yield piece


class ObjectStorage(abc.ABC):
    """Where originals live; ``close()`` (or ``async with``) releases connections."""

    async def __aenter__(self) -> "ObjectStorage":
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

    async def get(self, key: str) -> bytes:
        return b"".join([piece async for piece in self.stream(key)])


class FileStorage(ObjectStorage):
    """Objects as files under a root directory (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"key escapes the storage root: {key!r}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ValueError(f"not a file:// URI: {uri!r}")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{uri!r} is outside {self.root}")
        return path.relative_to(self.root).as_posix()

    async def put(self, key: str, body: Body, content_type: str = "application/octet-stream") -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as tmp:
                async for piece in _iterate(body):
                    tmp.write(piece)
                    digest.update(piece)
                    size += len(piece)
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return StoredObject(key, path.as_uri(), size, digest.hexdigest())

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        try:
            handle = open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        with handle:
            while piece := handle.read(READ_CHUNK_BYTES):
                yield piece

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Storage(ObjectStorage):
    """Objects in an S3 bucket (AWS, MinIO, any S3-compatible endpoint) through aiobotocore."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "us-east-1") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region
        self._exit_stack = contextlib.AsyncExitStack()
        self._client = None

    async def _connect(self):
        """The S3 client, created on first use so the storage can be built outside a loop."""
        if self._client is None:
            from aiobotocore.session import get_session

            self._client = await self._exit_stack.enter_async_context(
                get_session().create_client("s3", endpoint_url=self.endpoint_url, region_name=self.region)
            )
        return self._client

    async def close(self) -> None:
        await self._exit_stack.aclose()
        self._client = None

    def _object_name(self, key: str) -> str:
        if any(part in ("", ".", "..") for part in PurePosixPath(key).parts) or key.startswith("/"):
            raise ValueError(f"invalid key: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_name(key)}"

    def key_of(self, uri: str) -> str:
        parsed = urlparse(uri)
        name = parsed.path.lstrip("/")
        if parsed.scheme != "s3" or parsed.netloc != self.bucket:
            raise ValueError(f"{uri!r} is not in s3://{self.bucket}")
        if self.prefix:
            if not name.startswith(self.prefix + "/"):
                raise ValueError(f"{uri!r} is outside s3://{self.bucket}/{self.prefix}")
            name = name[len(self.prefix) + 1:]
        return name

    async def put(self, key: str, body: Body, content_type: str = "application/octet-stream") -> StoredObject:
        from botocore.exceptions import BotoCoreError, ClientError

        client = await self._connect()
        name = self._object_name(key)
        digest, size = hashlib.sha256(), 0
        buffer = bytearray()
        upload_id = None
        parts: list[dict] = []
        async def upload_part(part: bytes) -> None:
            nonlocal upload_id
            if upload_id is None:
                created = await client.create_multipart_upload(Bucket=self.bucket, Key=name, ContentType=content_type)
                upload_id = created["UploadId"]
            number = len(parts) + 1
            uploaded = await client.upload_part(
                Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=part
            )
            parts.append({"PartNumber": number, "ETag": uploaded["ETag"]})

        try:
            async for piece in _iterate(body):
                digest.update(piece)
                size += len(piece)
                buffer += piece
                while len(buffer) >= S3_PART_BYTES:
                    await upload_part(bytes(buffer[:S3_PART_BYTES]))
                    del buffer[:S3_PART_BYTES]
            if upload_id is None:
                await client.put_object(Bucket=self.bucket, Key=name, Body=bytes(buffer), ContentType=content_type)
            else:
                if buffer:
                    await upload_part(bytes(buffer))
                await client.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException as exc:
            if upload_id is not None:
                with contextlib.suppress(Exception):
                    await client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            if isinstance(exc, (BotoCoreError, ClientError)):
                raise StorageError(f"S3 put of {key} failed: {exc}") from exc
            raise
        return StoredObject(key, self.uri(key), size, digest.hexdigest())

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        client = await self._connect()
        try:
            response = await client.get_object(Bucket=self.bucket, Key=self._object_name(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(key) from exc
            raise StorageError(f"S3 get of {key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 get of {key} failed: {exc}") from exc
        async with response["Body"] as body:
            while piece := await body.read(READ_CHUNK_BYTES):
                yield piece

    async def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        client = await self._connect()
        try:
            await client.head_object(Bucket=self.bucket, Key=self._object_name(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StorageError(f"S3 head of {key} failed: {exc}") from exc
        return True

    async def delete(self, key: str) -> None:
        client = await self._connect()
        await client.delete_object(Bucket=self.bucket, Key=self._object_name(key))


def storage_for_url(url: str, endpoint_url: str = "", region: str = "us-east-1") -> ObjectStorage:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStorage(Path(unquote(parsed.netloc + parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"no bucket in storage URL {url!r}")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region)
    raise ValueError(f"unsupported storage URL {url!r}: use file://PATH or s3://BUCKET[/PREFIX]")


def open_storage(settings: Settings) -> ObjectStorage:
    """The configured storage."""
    return storage_for_url(settings.objects_url, settings.s3_endpoint_url, settings.s3_region)
