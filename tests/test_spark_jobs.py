"""The Spark jobs against the real broker and the real HDFS, run as a user runs them.

Each job runs as a subprocess of the Spark jobs' own virtualenv (jobs/spark/.venv, built by
`make jobs`), and what it wrote is read back through Spark (tests/spark_reader.py), which
follows the archive's _spark_metadata log as any reader must.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.settings import REPO_ROOT
from pipeline.topics import CHUNKS_PROCESSED, DOCUMENTS_RAW, DOCUMENTS_STATUS, EMBEDDINGS_READY, TOPICS

SPARK_JOBS = REPO_ROOT / "jobs" / "spark"
SPARK_PYTHON = SPARK_JOBS / ".venv" / "bin" / "python"
READER = REPO_ROOT / "tests" / "spark_reader.py"
COMMITTED = re.compile(r"^archive: batch (\d+) committed (\d+) rows, up to offsets (.*)$")
DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def spark_python(tmp_path_factory) -> Iterator[Path]:
    """The Spark jobs' interpreter; every Spark process of this module keeps its scratch files under a tmp dir."""
    assert SPARK_PYTHON.exists(), f"{SPARK_PYTHON} is missing: `make jobs` builds the Spark jobs' virtualenv"
    with pytest.MonkeyPatch.context() as patch:
        # A job killed with SIGKILL cannot delete its block manager and jar copies: not in /tmp then.
        patch.setenv("SPARK_LOCAL_DIRS", str(tmp_path_factory.mktemp("spark-local")))
        yield SPARK_PYTHON


# -- Kafka helpers --------------------------------------------------------------------------------


async def end_offsets(bootstrap_servers: str, topics: list[str]) -> dict[str, dict[str, int]]:
    """The next offset of every partition of ``topics``, as Spark's startingOffsets JSON wants them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    partitions = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    offsets: dict[str, dict[str, int]] = {}
    for tp, offset in ends.items():
        offsets.setdefault(tp.topic, {})[str(tp.partition)] = offset
    return offsets


class Producer(threading.Thread):
    """Produces (topic, key, value) messages from a thread, ``pace`` seconds apart, recording where each landed.

    With ``hold_after``, it stops after that many messages until :meth:`release` is called, so a
    test can be sure that something happens (a kill) before the last message is produced.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        messages: list[tuple[str, str, dict]],
        pace: float = 0.0,
        hold_after: int | None = None,
    ):
        super().__init__(daemon=True)
        self.bootstrap_servers = bootstrap_servers
        self.messages = messages
        self.pace = pace
        self.hold_after = hold_after
        self.released = threading.Event()
        self.landed: list[tuple[str, int, int]] = []  # (topic, partition, offset) per message sent
        self.error: BaseException | None = None

    def release(self) -> None:
        self.released.set()

    def run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as exc:  # the test thread reports it
            self.error = exc

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all")
        await producer.start()
        try:
            for topic, key, value in self.messages:
                if len(self.landed) == self.hold_after:
                    await asyncio.to_thread(self.released.wait, 300)
                sent = await producer.send_and_wait(topic, json.dumps(value).encode(), key=key.encode())
                self.landed.append((topic, sent.partition, sent.offset))
                if self.pace:
                    await asyncio.sleep(self.pace)
        finally:
            await producer.stop()

    def finish(self, timeout: float) -> list[tuple[str, int, int]]:
        self.join(timeout)
        assert not self.is_alive(), "the producer did not finish"
        if self.error:
            raise self.error
        return self.landed


def document_events(document_id: str, company_id: str, chunks: int, at_ms: int) -> list[tuple[str, str, dict]]:
    """One document's messages on every topic the pipeline writes, in the order the pipeline writes them."""
    events = [
        (
            DOCUMENTS_RAW.name,
            document_id,
            {
                "document_id": document_id,
                "company_id": company_id,
                "s3_path": f"file:///objects/{document_id}",
                "filename": "a.txt",
                "content_type": "text/plain",
                "size_bytes": 10,
                "sha256": "0" * 64,
                "uploaded_ms": at_ms,
                "chunk_size": 1000,
                "chunk_overlap": 200,
                "title": "",
                "tags": [],
            },
        )
    ]
    for index in range(chunks):
        chunk_id = f"{document_id}:{index}"
        events.append(
            (
                CHUNKS_PROCESSED.name,
                document_id,
                {
                    "chunk_id": chunk_id,
                    "document_id": document_id,
                    "company_id": company_id,
                    "text": f"text {index}",
                    "page": 1,
                    "index": index,
                    "total": chunks,
                    "created_ms": at_ms + 1,
                },
            )
        )
    events.append(
        (
            DOCUMENTS_STATUS.name,
            document_id,
            {
                "document_id": document_id,
                "company_id": company_id,
                "stage": "chunked",
                "at_ms": at_ms + 2,
                "chunks_total": chunks,
            },
        )
    )
    for index in range(chunks):
        events.append((EMBEDDINGS_READY.name, document_id, embedding(document_id, company_id, index, at_ms + 3)))
    events.append(
        (
            DOCUMENTS_STATUS.name,
            document_id,
            {
                "document_id": document_id,
                "company_id": company_id,
                "stage": "completed",
                "at_ms": at_ms + 4,
                "chunks_total": chunks,
                "chunks_embedded": chunks,
            },
        )
    )
    return events


def embedding(document_id: str, company_id: str, index: int, created_ms: int) -> dict:
    return {
        "chunk_id": f"{document_id}:{index}",
        "document_id": document_id,
        "company_id": company_id,
        "index": index,
        "vector": [0.25, -0.5, 1.0],
        "model": "hashing",
        "dims": 3,
        "created_ms": created_ms,
    }


# -- job helpers ----------------------------------------------------------------------------------


class Job:
    """A Spark job started as a user starts it, in its own process group so it dies whole."""

    def __init__(self, python: Path, script: str, args: list[str], log: Path):
        self.log = log
        self.began = time.monotonic()
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [str(python), str(SPARK_JOBS / script), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if match := re.search(pattern, line):
                    return match
            assert self.process.poll() is None, f"the job exited with {self.process.returncode}:\n{self.tail()}"
            time.sleep(0.3)
        raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f}s:\n{self.tail()}")

    def committed(self) -> list[tuple[int, int, dict]]:
        """(batch id, rows, end offsets per topic and partition) of every batch the job reported committed."""
        batches = []
        for line in self.lines():
            if match := COMMITTED.match(line):
                offsets: dict = {}
                for source in re.findall(r"\{.*?\}\}", match.group(3)):
                    offsets.update(json.loads(source))
                batches.append((int(match.group(1)), int(match.group(2)), offsets))
        return batches

    def kill(self) -> None:
        """SIGKILL the whole job, Python driver and JVM at once: a crash, no shutdown hook runs."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the driver (it stops its query and Spark), then wait for it; never leaves a process behind."""
        try:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout)
        finally:
            self.cleanup()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of its group (a JVM)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(30)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines()[-lines:])


def read_through_spark(python: Path, path: str, columns: str, where: str | None = None) -> list[dict]:
    command = [str(python), str(READER), path, "--columns", columns]
    if where:
        command += ["--where", where]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def wait_until_started(job: Job, timeout: float) -> float:
    """Seconds from the job's process start to its query running (the job prints the part inside Spark)."""
    inside = float(job.wait_for_line(r"^archive: started in ([\d.]+)s", timeout).group(1))
    wall = time.monotonic() - job.began
    print(f"archive query running {wall:.1f}s after its process started ({inside:.1f}s of it in Spark's start)")
    return wall


# -- tests ----------------------------------------------------------------------------------------


def test_jobs_explain_their_arguments(spark_python):
    for script, words in (
        ("archive.py", ["--checkpoint", "--starting-offsets", "exactly once"]),
        ("daily_report.py", ["--date", "yesterday", "s3a://"]),
    ):
        result = subprocess.run(
            [str(spark_python), str(SPARK_JOBS / script), "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        help_text = " ".join(result.stdout.split())
        for word in words:
            assert word in help_text, (script, word)


def test_archive_killed_mid_stream_and_restarted_has_every_message_exactly_once(
    spark_python, kafka_settings, hdfs, tmp_path
):
    run = uuid.uuid4().hex[:8]
    bootstrap = kafka_settings.bootstrap_servers
    output, checkpoint = f"{hdfs.url}/archive-{run}", f"{hdfs.url}/checkpoints/archive-{run}"
    topics = [spec.name for spec in TOPICS]
    # Start where the topics end now: the archive holds this test's messages, and anything another
    # test produced before does not make the first batch bigger.
    starting = asyncio.run(end_offsets(bootstrap, topics))
    args = [
        "--bootstrap-servers",
        bootstrap,
        "--output",
        output,
        "--checkpoint",
        checkpoint,
        "--trigger-seconds",
        "1",
        "--starting-offsets",
        json.dumps(starting),
        "--driver-memory",
        "768m",
    ]
    now_ms = int(time.time() * 1000)
    documents = [f"archive-{run}-{n}" for n in range(40)]
    messages = [event for n, doc in enumerate(documents) for event in document_events(doc, f"co-{n % 3}", 5, now_ms)]
    # 520 messages, 20 a second, the last fifth held back until the kill: production goes on
    # through the kill and the restart however slowly the job gets to its first batch.
    producer = Producer(bootstrap, messages, pace=0.05, hold_after=len(messages) * 4 // 5)

    first = Job(spark_python, "archive.py", args, tmp_path / "archive-1.log")
    try:
        first_startup = wait_until_started(first, timeout=120)
        producer.start()
        first.wait_for_line(r"^archive: batch \d+ committed [1-9]\d* rows", 120)
        first.kill()
    finally:
        first.cleanup()
        producer.release()
    sent_at_kill = len(producer.landed)
    assert producer.is_alive() and sent_at_kill < len(messages), "the kill was not mid-stream"

    mine = f"document_id LIKE 'archive-{run}-%'"
    at_kill = read_through_spark(spark_python, output, "topic,partition,offset", mine)
    assert 0 < len(at_kill) < len(messages), (len(at_kill), len(messages))
    assert len(at_kill) <= sent_at_kill

    second = Job(spark_python, "archive.py", args, tmp_path / "archive-2.log")
    try:
        second_startup = wait_until_started(second, timeout=120)
        landed = producer.finish(timeout=180)
        wanted = {}
        for topic, partition, offset in landed:
            wanted[(topic, str(partition))] = max(wanted.get((topic, str(partition)), 0), offset + 1)
        deadline = time.monotonic() + 120
        while not _reached(second.committed(), wanted):
            assert time.monotonic() < deadline, f"the restarted job did not catch up:\n{second.tail()}"
            assert second.process.poll() is None, second.tail()
            time.sleep(0.5)
        assert second.stop() == 0, second.tail()
    finally:
        second.cleanup()

    archived = read_through_spark(spark_python, output, "topic,partition,offset,document_id,chunk_id,date")
    coordinates = [(row["topic"], row["partition"], row["offset"]) for row in archived]
    assert len(coordinates) == len(set(coordinates)), "a message was archived twice"
    mine_archived = [row for row in archived if (row["document_id"] or "").startswith(f"archive-{run}-")]
    assert sorted((row["topic"], row["partition"], row["offset"]) for row in mine_archived) == sorted(landed)
    assert len(mine_archived) == len(messages)
    for topic in (CHUNKS_PROCESSED.name, EMBEDDINGS_READY.name):
        assert sorted(row["chunk_id"] for row in mine_archived if row["topic"] == topic) == sorted(
            value["chunk_id"] for t, _, value in messages if t == topic
        )
    # Every event of a document is dated now_ms .. now_ms + 4 (its own *_ms): filed under that UTC day.
    days = {dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date().isoformat() for ms in (now_ms, now_ms + 4)}
    assert {row["date"] for row in mine_archived} <= days
    print(
        f"archive start-up {first_startup:.1f}s and {second_startup:.1f}s (restart); "
        f"{len(at_kill)}/{len(messages)} archived at the kill, {sent_at_kill} produced by then"
    )


def _reached(batches: list[tuple[int, int, dict]], wanted: dict[tuple[str, str], int]) -> bool:
    """True once a committed batch ends at or past every wanted (topic, partition) offset."""
    if not batches:
        return False
    ends: dict[tuple[str, str], int] = {}
    for _, _, offsets in batches:
        for topic, partitions in offsets.items():
            for partition, offset in partitions.items():
                ends[(topic, partition)] = max(ends.get((topic, partition), 0), offset)
    return all(ends.get(key, 0) >= offset for key, offset in wanted.items())


def test_daily_report_counts_distinct_chunks_per_document_and_company_of_one_utc_day(
    spark_python, kafka_settings, hdfs, tmp_path
):
    run = uuid.uuid4().hex[:8]
    rng = random.Random(run)
    # A day of its own (years before any other test's data), so the day's partition holds only this test's events.
    day = dt.date(2001, 1, 1) + dt.timedelta(days=rng.randrange(6000))
    day_start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)
    bootstrap = kafka_settings.bootstrap_servers
    messages: list[tuple[str, str, dict]] = []
    for n in range(12):
        document_id, company_id = f"report-{run}-{n}", f"company-{run}-{n % 3}"
        for index in range(rng.randrange(1, 8)):
            created_ms = day_start + rng.randrange(DAY_MS)
            messages.append((EMBEDDINGS_READY.name, document_id, embedding(document_id, company_id, index, created_ms)))
            if rng.random() < 0.3:  # redelivered by an at-least-once upstream: the same chunk again, later
                redelivered = embedding(document_id, company_id, index, min(created_ms + 1000, day_start + DAY_MS - 1))
                messages.append((EMBEDDINGS_READY.name, document_id, redelivered))
        # A chunk on the day's text topic is not an embedding.
        messages.append(
            (
                CHUNKS_PROCESSED.name,
                document_id,
                {
                    "chunk_id": f"{document_id}:99",
                    "document_id": document_id,
                    "company_id": company_id,
                    "text": "t",
                    "page": 1,
                    "index": 99,
                    "total": 100,
                    "created_ms": day_start + 5,
                },
            )
        )
    # Embeddings one millisecond either side of the day belong to the days before and after.
    edge_document, edge_company = f"report-{run}-edge", f"company-{run}-edge"
    messages.append((EMBEDDINGS_READY.name, edge_document, embedding(edge_document, edge_company, 0, day_start - 1)))
    messages.append((EMBEDDINGS_READY.name, edge_document, embedding(edge_document, edge_company, 1, day_start)))
    messages.append(
        (EMBEDDINGS_READY.name, edge_document, embedding(edge_document, edge_company, 2, day_start + DAY_MS))
    )
    rng.shuffle(messages)

    expected_chunks: dict[tuple[str, str], set[str]] = {}
    for topic, _, value in messages:
        if topic == EMBEDDINGS_READY.name and day_start <= value["created_ms"] < day_start + DAY_MS:
            expected_chunks.setdefault((value["document_id"], value["company_id"]), set()).add(value["chunk_id"])
    expected = sorted((document, company, len(chunks)) for (document, company), chunks in expected_chunks.items())
    assert any(len(rows) > 1 for rows in expected_chunks.values())

    starting = asyncio.run(end_offsets(bootstrap, [spec.name for spec in TOPICS]))
    producer = Producer(bootstrap, messages)
    producer.start()
    producer.finish(timeout=120)  # --available-now archives what the topics hold when it starts

    output, checkpoint = f"{hdfs.url}/report-archive-{run}", f"{hdfs.url}/checkpoints/report-archive-{run}"
    report_path = f"{hdfs.url}/reports-{run}/chunks-per-document"
    archive = Job(
        spark_python,
        "archive.py",
        [
            "--bootstrap-servers",
            bootstrap,
            "--output",
            output,
            "--checkpoint",
            checkpoint,
            "--available-now",
            "--starting-offsets",
            json.dumps(starting),
            "--driver-memory",
            "768m",
        ],
        tmp_path / "archive.log",
    )
    assert archive.wait(300) == 0, archive.tail()

    began = time.monotonic()
    report = Job(
        spark_python,
        "daily_report.py",
        ["--archive", output, "--output", report_path, "--date", day.isoformat(), "--driver-memory", "768m"],
        tmp_path / "report.log",
    )
    assert report.wait(300) == 0, report.tail()
    report_seconds = time.monotonic() - began
    summary = report.wait_for_line(r"^daily report .*: (\d+) documents, (\d+) chunks", 1)
    assert (int(summary.group(1)), int(summary.group(2))) == (len(expected), sum(n for _, _, n in expected))

    rows = read_through_spark(spark_python, report_path, "document_id,company_id,chunks,date")
    assert sorted((row["document_id"], row["company_id"], row["chunks"]) for row in rows) == expected
    assert {row["date"] for row in rows} == {day.isoformat()}
    print(f"daily report for {day}: {len(expected)} rows, job ran {report_seconds:.1f}s")
