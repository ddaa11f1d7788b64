"""Object storage: file:// and s3:// (against a real S3-compatible server) behave the same."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from pipeline.errors import ObjectNotFound
from pipeline.ids import object_key, sanitize_filename
from pipeline.storage.file import FileStorage
from pipeline.storage.s3 import S3_PART_BYTES, S3Storage


@pytest.fixture
async def s3_storage(s3_endpoint):
    from aiobotocore.session import get_session

    bucket = f"docflow-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client("s3", endpoint_url=s3_endpoint, region_name="us-east-1") as client:
        await client.create_bucket(Bucket=bucket)
    async with S3Storage(bucket, "originals", endpoint_url=s3_endpoint) as storage:
        yield storage


@pytest.fixture
def file_storage(tmp_path):
    return FileStorage(tmp_path / "objects")


@pytest.fixture(params=["file", "s3"])
def storage(request):
    return request.getfixturevalue(f"{request.param}_storage")


async def _pieces(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_put_get_exists_delete_round_trip(storage):
    key = object_key("acme", str(uuid.uuid4()), "report.pdf")
    data = b"%PDF-1.7 docflow\n" * 100
    stored = await storage.put(key, data, "application/pdf")
    assert stored.size_bytes == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await storage.exists(key)
    assert await storage.get(key) == data
    assert storage.key_of(stored.uri) == key
    await storage.delete(key)
    assert not await storage.exists(key)
    with pytest.raises(ObjectNotFound):
        await storage.get(key)


async def test_large_object_is_streamed_in_and_out_in_pieces(storage):
    key = object_key("acme", str(uuid.uuid4()), "big.bin")
    data = os.urandom(2 * S3_PART_BYTES + 12345)  # S3 takes this as a three-part multipart upload
    stored = await storage.put(key, _pieces(data, 1024 * 1024))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    pieces = [piece async for piece in storage.stream(key)]
    assert len(pieces) > 1
    assert b"".join(pieces) == data


async def test_failed_streaming_put_leaves_nothing_under_the_key(storage):
    key = object_key("acme", str(uuid.uuid4()), "broken.bin")

    async def breaks_midway():
        yield os.urandom(S3_PART_BYTES + 1)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await storage.put(key, breaks_midway())
    assert not await storage.exists(key)


async def test_path_traversal_filename_is_stored_inside_its_company_prefix(storage, tmp_path):
    document_id = str(uuid.uuid4())
    key = object_key("acme", document_id, "../../etc/passwd")
    assert key == f"acme/{document_id}/passwd"
    stored = await storage.put(key, b"root:x:0:0")
    assert stored.uri.endswith(f"acme/{document_id}/passwd")
    if isinstance(storage, FileStorage):
        assert (storage.root / "acme" / document_id / "passwd").read_bytes() == b"root:x:0:0"


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("../../etc/passwd", "passwd"),
        ("..%2F..%2Fetc%2Fpasswd", "passwd"),
        ("..\\..\\windows\\system.ini", "system.ini"),
        ("report\x00.pdf", "report.pdf"),
        ("line\nbreak\r.txt", "linebreak.txt"),
        ("..", "document"),
        ("", "document"),
        ("notas de reunión.md", "notas de reunión.md"),
        ("a;b|c$(rm -rf).txt", "a_b_c_(rm -rf).txt"),
    ],
)
def test_sanitize_filename_removes_directories_and_control_characters(filename, expected):
    assert sanitize_filename(filename) == expected


def test_sanitized_filename_is_bounded_and_keeps_its_extension():
    name = sanitize_filename("x" * 5000 + ".pdf")
    assert len(name.encode()) <= 200
    assert name.endswith(".pdf")


@pytest.mark.parametrize("company_id", ["", "../acme", "acme/other", "a" * 200, "acme\n"])
def test_object_key_refuses_unsafe_company_ids(company_id):
    with pytest.raises(ValueError):
        object_key(company_id, "doc-1", "a.txt")


def test_file_storage_refuses_keys_outside_its_root(file_storage):
    with pytest.raises(ValueError):
        file_storage.uri("../outside.txt")
    with pytest.raises(ValueError):
        file_storage.key_of("file:///etc/passwd")
