"""``s3://`` storage: objects in an S3 bucket (AWS, MinIO, any S3-compatible endpoint) through aiobotocore.

``put`` sends one PUT, or a multipart upload once a body outgrows one part.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from urllib.parse import urlparse

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import ObjectNotFound, StorageError
from pipeline.storage.base import READ_CHUNK_BYTES, Body, ListedObject, ObjectStorage, StoredObject, iterate

S3_PART_BYTES = 8 * 1024 * 1024  # S3's minimum part size is 5 MiB


class S3Storage(ObjectStorage):
    """Objects in an S3 bucket (AWS, MinIO, any S3-compatible endpoint) through aiobotocore."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "us-east-1") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region
        self._exit_stack = contextlib.AsyncExitStack()
        self._client = None

    @classmethod
    def from_url(cls, url: str, endpoint_url: str = "", region: str = "us-east-1") -> S3Storage:
        parsed = urlparse(url)
        if not parsed.netloc:
            raise ValueError(f"no bucket in storage URL {url!r}")
        return cls(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region)

    async def _connect(self):
        """The S3 client, created on first use so the storage can be built outside a loop."""
        if self._client is None:
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
            name = name[len(self.prefix) + 1 :]
        return name

    async def put(self, key: str, body: Body, content_type: str = "application/octet-stream") -> StoredObject:
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
            async for piece in iterate(body):
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

    async def listing(self, prefix: str = "") -> AsyncIterator[ListedObject]:
        """Every object under the storage's prefix whose key starts with prefix, a page (1000) at a time.

        Multipart uploads never completed are not objects and are not listed: a bucket lifecycle
        rule (AbortIncompleteMultipartUpload) removes them.
        """
        client = await self._connect()
        base = f"{self.prefix}/" if self.prefix else ""
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix)
        try:
            async for page in pages:
                for item in page.get("Contents", ()):
                    modified_ms = int(item["LastModified"].timestamp() * 1000)
                    yield ListedObject(item["Key"][len(base) :], item["Size"], modified_ms)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 listing of s3://{self.bucket}/{base}{prefix} failed: {exc}") from exc
