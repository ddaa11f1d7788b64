"""API keys: their form, their hash, and where every web worker finds them (the compacted topic auth.keys).

A key is ``dfk_<key_id>_<secret>``: the id finds the record, the secret proves the holder.
The secret is 256 random bits, so a slow password hash would protect nothing that brute
force could reach, and would cost every request tens of milliseconds of CPU; an
HMAC-SHA256 under a server secret instead means that the topic alone (a backup, a mirror,
a consumer that should not read it) gives nobody a way to test guesses. Digests are
compared with :func:`hmac.compare_digest`. docs/architecture.md ("Trust boundary") says
how keys reach every web worker and how fast a revocation does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from pipeline.broker_security import client_options
from pipeline.errors import KeyStoreUnavailable, TopicUnavailable
from pipeline.follow import follow_topic
from pipeline.ids import valid_id
from pipeline.records import ApiKey, now_ms
from pipeline.settings import Settings
from pipeline.topics import AUTH_KEYS, create_topics

log = logging.getLogger(__name__)

KEY_PREFIX = "dfk_"
_KEY_PATTERN = re.compile(r"^dfk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
MAX_NAME_CHARS = 100
READ_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True)
class NewKey:
    """A key as created: the only moment its secret exists outside its holder."""

    key: str
    record: ApiKey


def server_secret(settings: Settings) -> bytes:
    """DOCFLOW_AUTH_SECRET, or a secret kept in HOME/auth.secret (created on first use, mode 0600)."""
    if settings.auth_secret:
        return settings.auth_secret.encode()
    path = settings.home / "auth.secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32))
    return path.read_bytes().strip()


def hash_secret(secret_key: bytes, secret: str) -> str:
    return hmac.new(secret_key, secret.encode(), hashlib.sha256).hexdigest()


def new_key(secret_key: bytes, company_id: str, name: str = "") -> NewKey:
    if not valid_id(company_id):
        raise ValueError(f"invalid company id: {company_id!r}")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a key's name is at most {MAX_NAME_CHARS} characters")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    record = ApiKey(
        key_id=key_id, company_id=company_id, name=name, key_hash=hash_secret(secret_key, secret), created_ms=now_ms()
    )
    return NewKey(f"{KEY_PREFIX}{key_id}_{secret}", record)


class KeyRing:
    """Every key one process knows: the newest record of each key id, as auth.keys delivers them."""

    def __init__(self, secret_key: bytes) -> None:
        self._secret_key = secret_key
        self._records: dict[str, ApiKey] = {}

    def apply(self, record: ApiKey) -> None:
        known = self._records.get(record.key_id)
        if known is not None and known.revoked_ms is not None and record.revoked_ms is None:
            return  # a revocation is final, whatever a replayed or forged record says
        self._records[record.key_id] = record

    def authenticate(self, presented: str) -> ApiKey | None:
        """The valid key record that ``presented`` proves, or None."""
        match = _KEY_PATTERN.fullmatch(presented)
        if match is None:
            return None
        key_id, secret = match.groups()
        record = self._records.get(key_id)
        digest = hash_secret(self._secret_key, secret)
        if record is None or not hmac.compare_digest(digest, record.key_hash):
            return None
        return record if record.revoked_ms is None else None

    def get(self, key_id: str) -> ApiKey | None:
        return self._records.get(key_id)

    def of_company(self, company_id: str) -> list[ApiKey]:
        return sorted(
            (record for record in self._records.values() if record.company_id == company_id),
            key=lambda record: record.created_ms,
        )


async def publish(settings: Settings, record: ApiKey) -> None:
    """Write a key record to auth.keys and wait until the broker has it."""
    try:
        await create_topics(settings)
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            acks="all",
            request_timeout_ms=int(settings.produce_timeout_seconds * 1000),
            **client_options(settings),
        )
        await producer.start()
        try:
            await producer.send_and_wait(AUTH_KEYS.name, key=record.key_id.encode(), value=record.dumps())
        finally:
            await producer.stop()
    except (KafkaError, OSError) as exc:
        raise KeyStoreUnavailable(f"cannot write {AUTH_KEYS.name} at {settings.bootstrap_servers}: {exc}") from exc


async def follow_keys(settings: Settings, ring: KeyRing, caught_up: asyncio.Event | None = None, follow: bool = True):
    """Read auth.keys from its beginning into ``ring``; set ``caught_up`` once at its end, then keep following."""
    await follow_topic(
        settings,
        AUTH_KEYS.name,
        lambda message: ring.apply(ApiKey.loads(message.value, serializer="json")),
        caught_up,
        follow=follow,
    )


async def read_keys(settings: Settings) -> KeyRing:
    """Every key record as of now (for `docflow keys list`); hashes only, so no secret is needed."""
    ring = KeyRing(b"")
    try:
        await asyncio.wait_for(follow_keys(settings, ring, follow=False), READ_TIMEOUT_SECONDS)
    except (KafkaError, OSError, TimeoutError, TopicUnavailable) as exc:
        raise KeyStoreUnavailable(f"cannot read {AUTH_KEYS.name} at {settings.bootstrap_servers}: {exc}") from exc
    return ring


async def revoke(settings: Settings, key_id: str) -> ApiKey:
    """Revoke a key on every web worker; KeyError when no such key exists."""
    record = (await read_keys(settings)).get(key_id)
    if record is None:
        raise KeyError(key_id)
    if record.revoked_ms is not None:
        return record
    revoked = ApiKey(**{**record.asdict(), "revoked_ms": now_ms()})
    await publish(settings, revoked)
    return revoked
