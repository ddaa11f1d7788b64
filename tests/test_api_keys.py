"""API keys: their form and hash, the key ring, and `docflow keys` against the real broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from pipeline.api_keys import KeyRing, hash_secret, new_key
from pipeline.records import ApiKey
from tables.company_index import CompanyIndex, cursor_of, parse_cursor

SECRET = b"server-secret"


def test_a_key_is_stored_as_its_hmac_and_proves_only_itself():
    created = new_key(SECRET, "acme", "ci")
    assert re.fullmatch(r"dfk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", created.key)
    assert created.key.split("_", 2)[2] not in created.record.dumps().decode()  # the secret never leaves
    ring = KeyRing(SECRET)
    ring.apply(created.record)
    assert ring.authenticate(created.key).company_id == "acme"
    tampered = created.key[:-1] + ("A" if created.key[-1] != "A" else "B")
    assert ring.authenticate(tampered) is None
    assert ring.authenticate("dfk_nothing") is None
    # The same key under another server secret proves nothing.
    other = KeyRing(b"another-secret")
    other.apply(created.record)
    assert other.authenticate(created.key) is None


def test_a_revoked_key_stays_revoked_whatever_record_comes_after():
    created = new_key(SECRET, "acme")
    ring = KeyRing(SECRET)
    ring.apply(created.record)
    ring.apply(ApiKey(**{**created.record.asdict(), "revoked_ms": 5}))
    ring.apply(created.record)  # replayed or forged: the key was issued, not re-issued
    assert ring.authenticate(created.key) is None
    assert ring.of_company("acme")[0].revoked_ms == 5


def test_hash_is_hmac_sha256_of_the_secret_part():
    assert len(hash_secret(SECRET, "x")) == 64 and hash_secret(SECRET, "x") != hash_secret(SECRET, "y")


def test_company_index_pages_a_company_newest_first_and_never_another_company():
    index = CompanyIndex()
    for n in range(25):
        index.add("acme", f"doc-{n:02d}", 1000 + n)
        index.add("globex", f"g-{n:02d}", 1000 + n)
    first = index.page("acme", 10)
    assert [key[1] for key in first] == [f"doc-{n:02d}" for n in range(24, 14, -1)]
    after = parse_cursor(cursor_of(-first[-1][0], first[-1][1]))
    rest = index.page("acme", 100, after)
    assert [key[1] for key in rest] == [f"doc-{n:02d}" for n in range(14, -1, -1)]
    assert index.page("initech", 10) == []


def test_company_index_rebuild_keeps_what_was_added_while_it_read():
    index = CompanyIndex()
    index.add("acme", "old", 1)
    index.start_rebuild()
    index.add("acme", "during", 3)
    index.finish_rebuild([("acme", "read", 2, None)])
    assert [key[1] for key in index.page("acme", 10)] == ["during", "read"]


def docflow(settings, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DOCFLOW_")}
    env.update(
        DOCFLOW_HOME=str(settings.home),
        DOCFLOW_KAFKA_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
        DOCFLOW_AUTH_SECRET="cli-test-secret",
    )
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_docflow_keys_create_list_and_revoke(kafka_settings):
    created = docflow(kafka_settings, "create", "--company", "hooli", "--name", "nightly import")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = key.split("_")[1]
    listed = docflow(kafka_settings, "list", "--company", "hooli")
    assert key_id in listed.stdout and "nightly import" in listed.stdout and key not in listed.stdout
    revoked = docflow(kafka_settings, "revoke", key_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    [line] = [
        line for line in docflow(kafka_settings, "list", "--company", "hooli").stdout.splitlines() if key_id in line
    ]
    assert "UTC" in line.split(key_id, 1)[1].split("nightly")[0].split("UTC", 1)[1]  # a revocation date
    assert docflow(kafka_settings, "revoke", "000000000000").returncode == 1
    assert docflow(kafka_settings, "create", "--company", "../etc").returncode == 2
