"""The PyFlink job (jobs/flink/chunk_counts.py) against the session's real broker, and `docflow analytics`.

One job process serves the module: the test produces ChunkEmbedding events with known
created_ms for three companies over three minutes, runs the job with its own virtualenv,
and compares analytics.flink with the ground truth, window by window.

How the last windows close: every document's partition gets a final "closer" event (of a
company of its own, not counted) well past the last window end plus the watermark bound,
so the watermark of every partition that carries data passes every window. Partitions
with no data at all hold the watermark back until the idle timeout marks them idle (there
are 8 partitions and 6 documents, so some are always empty): the test only passes because
the idle timeout works. The late-event check then relies on it a second time (see there).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from jsonschema import Draft202012Validator

from pipeline.analytics import utc
from pipeline.local.ports import free_port
from pipeline.settings import REPO_ROOT
from pipeline.topics import ANALYTICS_FLINK, EMBEDDINGS_READY

FLINK_PYTHON = REPO_ROOT / "jobs" / "flink" / ".venv" / "bin" / "python"
JOB = REPO_ROOT / "jobs" / "flink" / "chunk_counts.py"
SCHEMA = json.loads((REPO_ROOT / "pipeline" / "schemas" / "analytics.flink.json").read_text())
MINUTE = 60_000
WATERMARK_SECONDS = 5
IDLE_TIMEOUT_SECONDS = 2
OUTPUT_TIMEOUT = 180.0  # the job's JVM start plus the windows, on a busy 2-core machine


def _event(company: str, document: str, chunk_id: str, created_ms: int, index: int = 0) -> dict:
    return {
        "chunk_id": chunk_id,
        "document_id": document,
        "company_id": company,
        "index": index,
        "vector": [0.5, -0.5, 0.25, 0.0],
        "model": "test-model",
        "dims": 4,
        "created_ms": created_ms,
    }


def build_events(companies: list[str], closer: str, base: int) -> tuple[list[tuple[str, bytes]], dict]:
    """(key, value) messages in production order, and the expected {(company, window_start_ms): count}.

    Per company two documents over three minutes, a different count per (company, minute);
    at each minute boundary a "straggler" 2 s before it is produced after a "leader" 1 s
    past it (out of order, within the 5 s bound: it must still count in the earlier
    window); redelivered copies (same chunk_id and created_ms) that must count once; and
    messages that are not countable (not JSON, no created_ms) that must not count.
    """
    messages: list[tuple[str, bytes]] = []
    distinct: dict[tuple[str, int], set[str]] = defaultdict(set)
    last_ms = 0
    for c, company in enumerate(companies):
        documents = [f"{company}-doc{d}" for d in range(2)]
        per_document: dict[str, list[dict]] = {doc: [] for doc in documents}
        for minute in range(3):
            n = 4 + 3 * c + 2 * minute
            for j in range(n):
                # Regular events keep clear of the boundaries, where leaders and stragglers go.
                created = base + minute * MINUTE + 5_000 + j * (50_000 // n)
                doc = documents[j % 2]
                per_document[doc].append(_event(company, doc, f"{doc}:{minute}:{j}", created, j))
        for doc in documents:
            events = sorted(per_document[doc], key=lambda e: e["created_ms"])
            ordered: list[dict] = []
            for boundary in (1, 2):
                leader = _event(company, doc, f"{doc}:leader{boundary}", base + boundary * MINUTE + 1_000)
                straggler = _event(company, doc, f"{doc}:straggler{boundary}", base + boundary * MINUTE - 2_000)
                split = next(i for i, e in enumerate(events) if e["created_ms"] > leader["created_ms"])
                ordered, events = ordered + events[:split] + [leader, straggler], events[split:]
            ordered += events
            for event in ordered:
                distinct[(company, base + (event["created_ms"] - base) // MINUTE * MINUTE)].add(event["chunk_id"])
                messages.append((doc, json.dumps(event).encode()))
                last_ms = max(last_ms, event["created_ms"])
            # Redelivered copies, as an at-least-once producer or a retried batch writes them.
            messages.append((doc, json.dumps(ordered[3]).encode()))
            messages.append((doc, json.dumps(ordered[-1]).encode()))
            # Not countable: skipped by the job, never a failure.
            messages.append((doc, b"not json at all"))
            messages.append((doc, json.dumps({"chunk_id": f"{doc}:no-time", "company_id": company}).encode()))
            messages.append((doc, json.dumps([company, base]).encode()))
    assert last_ms < base + 3 * MINUTE
    closing_ms = base + 4 * MINUTE + WATERMARK_SECONDS * 1000 + 1_000
    for doc in {key for key, _ in messages}:
        messages.append((doc, json.dumps(_event(closer, doc, f"{doc}:closer", closing_ms)).encode()))
    expected = {key: len(chunks) for key, chunks in distinct.items()}
    return messages, expected


def new_source_topic(kafka_settings) -> str:
    """A topic of the test's own, partitioned as embeddings.ready: the events below include
    messages that are not JSON, which the pipeline's tests must never read on the real topic."""
    name = f"{EMBEDDINGS_READY.name}.flink-test-{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, kafka_settings.topic_partitions, 1)])
        finally:
            await admin.close()

    asyncio.run(create())
    return name


@pytest.fixture(scope="module")
def source_topic(kafka_settings) -> str:
    return new_source_topic(kafka_settings)


async def produce(bootstrap: str, topic: str, messages: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in messages:  # one at a time: production order is partition order
            await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


class AnalyticsReader:
    """Follows analytics.flink from its beginning, keeping every message of the given companies."""

    def __init__(self, bootstrap: str, companies: set[str]) -> None:
        self.bootstrap = bootstrap
        self.companies = {company.encode() for company in companies}
        self.messages: list[tuple[bytes, dict, float]] = []  # (key, value, when it was seen)
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        # Subscribed without a group: every partition from the beginning, nothing committed.
        self.consumer = AIOKafkaConsumer(
            ANALYTICS_FLINK.name,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self.consumer.start()

    async def poll(self, seconds: float) -> None:
        batches = await self.consumer.getmany(timeout_ms=int(seconds * 1000))
        for records in batches.values():
            for record in records:
                if record.key in self.companies:
                    self.messages.append((record.key, json.loads(record.value), time.monotonic()))

    def latest(self) -> dict[tuple[str, int], int]:
        return {(value["company_id"], value["window_start_ms"]): value["count"] for _, value, _ in self.messages}

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()


class FlinkJob:
    """The job as a subprocess in a session of its own, so its gateway JVM dies with it."""

    def __init__(
        self,
        bootstrap: str,
        source_topic: str,
        starting_offsets: str,
        workdir: Path,
        *,
        checkpoint_dir: Path | None = None,
        checkpoint_interval_seconds: float = 10,
        restore: str = "none",
        name: str = "job",
    ) -> None:
        self.stdout_path = workdir / f"{name}.out"
        self.log_dir = workdir / f"{name}-logs"
        command = [
            str(FLINK_PYTHON),
            str(JOB),
            "--bootstrap-servers",
            bootstrap,
            "--source-topic",
            source_topic,
            "--starting-offsets",
            starting_offsets,
            "--group-id",
            f"test-flink-{uuid.uuid4().hex}",
            "--watermark-seconds",
            str(WATERMARK_SECONDS),
            "--idle-timeout-seconds",
            str(IDLE_TIMEOUT_SECONDS),
            "--parallelism",
            "1",
            "--jvm-heap",
            "512m",
            "--checkpoint-dir",
            str(checkpoint_dir or workdir / "checkpoints"),
            "--checkpoint-interval-seconds",
            str(checkpoint_interval_seconds),
            "--restore",
            restore,
            "--log-dir",
            str(self.log_dir),
        ]
        self.started = time.monotonic()
        with open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                start_new_session=True,
            )
        self.running_after: float | None = None

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def diagnostics(self) -> str:
        logs = "\n".join(
            "\n".join(path.read_text(errors="replace").splitlines()[-40:]) for path in self.log_dir.glob("*.log")
        )
        return f"--- job stdout\n{self.output()[-4000:]}\n--- flink log tail\n{logs[-6000:]}"

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"the Flink job exited with {self.process.returncode}\n{self.diagnostics()}")
        if self.running_after is None and re.search(r"RUNNING after", self.output()):
            self.running_after = time.monotonic() - self.started

    def crash(self) -> None:
        """SIGKILL to the job and its JVM at once: no cancel, no flush, as a lost machine."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        """SIGTERM (the job cancels itself), then SIGKILL to the whole group: no JVM may outlive the test."""
        group = self.process.pid
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(group), "a process of the Flink job (its JVM?) outlived it"


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


async def _wait_for(reader: AnalyticsReader, job: FlinkJob, done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(
                f"analytics.flink did not get the expected windows in {timeout:.0f}s: got "
                f"{sorted(reader.latest().items())}\n{job.diagnostics()}"
            )
        job.check_alive()
        await reader.poll(1.0)


@pytest.fixture(scope="module")
def flink_run(kafka_settings, source_topic, tmp_path_factory):
    """Produce the events, run the job over them, collect analytics.flink; yields what a test asserts on."""
    assert FLINK_PYTHON.exists(), "jobs/flink/.venv is missing: `make jobs` builds it"
    bootstrap = kafka_settings.bootstrap_servers
    run = uuid.uuid4().hex[:8]
    companies = [f"flink-{run}-c{i}" for i in range(3)]
    closer = f"flink-{run}-closer"
    base = time.time_ns() // 1_000_000 // MINUTE * MINUTE - 10 * MINUTE
    messages, expected = build_events(companies, closer, base)
    asyncio.run(produce(bootstrap, source_topic, messages))

    job = FlinkJob(bootstrap, source_topic, "earliest", tmp_path_factory.mktemp("flink-job"))
    reader = AnalyticsReader(bootstrap, {*companies})

    async def follow() -> dict:
        try:
            await reader.start()
            await _wait_for(reader, job, lambda: job.running_after is not None or reader.messages, OUTPUT_TIMEOUT)
            await _wait_for(reader, job, lambda: set(expected) <= set(reader.latest()), OUTPUT_TIMEOUT)
            first_output_after = min(seen for _, _, seen in reader.messages) - job.started
            await reader.poll(2.0)  # anything written twice would be here by now
            first_pass = list(reader.messages)

            # Now every partition is idle. On company 0's first document alone (the one
            # partition that then drives the watermark: the others, whose closers hold their
            # own watermarks minutes behind, are idle, else nothing below would close):
            # - a late event for window 0, which was emitted: it must be dropped, not update it;
            # - an event in the marker window, then one 1 s past its end (the watermark is then
            #   4 s before that end), then after a pause longer than the watermark interval a
            #   straggler 2 s before that end: still within the 5 s bound, it must count;
            # - a closer that closes both windows.
            doc = f"{companies[0]}-doc0"
            marker_start = base + 6 * MINUTE
            after_marker = marker_start + MINUTE
            await produce(
                bootstrap,
                source_topic,
                [
                    (doc, json.dumps(_event(companies[0], doc, f"{doc}:late", base + 30_000)).encode()),
                    (doc, json.dumps(_event(companies[0], doc, f"{doc}:marker", marker_start + 1_000)).encode()),
                    (doc, json.dumps(_event(companies[0], doc, f"{doc}:after-marker", after_marker + 1_000)).encode()),
                ],
            )
            await asyncio.sleep(1.0)
            await produce(
                bootstrap,
                source_topic,
                [
                    (
                        doc,
                        json.dumps(_event(companies[0], doc, f"{doc}:marker-straggler", after_marker - 2_000)).encode(),
                    ),
                    (doc, json.dumps(_event(closer, doc, f"{doc}:closer2", base + 9 * MINUTE)).encode()),
                ],
            )
            await _wait_for(reader, job, lambda: (companies[0], after_marker) in reader.latest(), OUTPUT_TIMEOUT)
            return {"first_pass": first_pass, "first_output_after": first_output_after, "marker_start": marker_start}
        finally:
            await reader.stop()

    try:
        outcome = asyncio.run(follow())
        job.check_alive()
    finally:
        job.stop()
    print(
        f"\nflink job: RUNNING after {job.running_after:.1f}s, first window after "
        f"{outcome['first_output_after']:.1f}s (process start)"
    )
    yield {
        "companies": companies,
        "base": base,
        "expected": expected,
        "job": job,
        "all_messages": reader.messages,
        **outcome,
    }


def test_job_counts_every_window_of_every_company_exactly(flink_run):
    expected = flink_run["expected"]
    first_pass = flink_run["first_pass"]
    got = {(value["company_id"], value["window_start_ms"]): value["count"] for _, value, _ in first_pass}
    assert got == expected
    assert len(expected) == 9 and len(set(expected.values())) > 3  # 3 companies x 3 minutes, counts that differ
    # No failure and no restart here: every window is written exactly once, when it closes.
    assert Counter((v["company_id"], v["window_start_ms"]) for _, v, _ in first_pass) == Counter(
        {key: 1 for key in expected}
    )


def test_window_messages_are_keyed_by_company_and_match_the_schema(flink_run):
    validator = Draft202012Validator(SCHEMA)
    for key, value, _ in flink_run["all_messages"]:
        assert not list(validator.iter_errors(value)), value
        assert key == value["company_id"].encode()
        assert value["window_end_ms"] - value["window_start_ms"] == MINUTE
        assert value["window_start_ms"] % MINUTE == 0
        started = datetime.fromtimestamp(value["window_start_ms"] / 1000, UTC)
        assert value["timestamp"] == started.strftime("%Y-%m-%dT%H:%M:%S.000Z")  # the seeds' field, in UTC


def test_late_event_is_dropped_straggler_within_bound_counts_and_idle_partitions_let_windows_close(flink_run):
    company = flink_run["companies"][0]
    base = flink_run["base"]
    windows = [value for _, value, _ in flink_run["all_messages"] if value["company_id"] == company]
    first_window = [w for w in windows if w["window_start_ms"] == base]
    assert [w["count"] for w in first_window] == [flink_run["expected"][(company, base)]]
    marker_start = flink_run["marker_start"]
    assert [w["count"] for w in windows if w["window_start_ms"] == marker_start] == [2]  # marker and straggler
    assert [w["count"] for w in windows if w["window_start_ms"] == marker_start + MINUTE] == [1]


def _docflow(bootstrap: str, *args: str) -> subprocess.CompletedProcess:
    env = {"DOCFLOW_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "analytics", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_docflow_analytics_prints_a_companys_windows_newest_first(flink_run, kafka_settings):
    company = flink_run["companies"][1]
    windows = sorted(
        ((start, count) for (c, start), count in flink_run["expected"].items() if c == company), reverse=True
    )
    result = _docflow(kafka_settings.bootstrap_servers, "--company", company)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"company {company}: 3 of 3 windows, newest first"
    assert lines[1].split() == ["window", "start", "(UTC)", "window", "end", "(UTC)", "chunks"]
    assert lines[2:] == [f"{utc(start):19}  {utc(start + MINUTE):19}  {count:>8}" for start, count in windows]

    limited = _docflow(kafka_settings.bootstrap_servers, "--company", company, "--limit", "2")
    assert limited.returncode == 0, limited.stderr
    assert limited.stdout.splitlines()[0] == f"company {company}: 2 of 3 windows, newest first"
    assert limited.stdout.splitlines()[2:] == lines[2:4]


def test_docflow_analytics_says_when_a_company_has_no_windows_yet(kafka_settings):
    result = _docflow(kafka_settings.bootstrap_servers, "--company", f"nobody-{uuid.uuid4().hex}")
    assert result.returncode == 0, result.stderr
    assert "no windows yet" in result.stdout


def test_docflow_analytics_exits_3_when_the_broker_is_unreachable():
    result = _docflow(f"127.0.0.1:{free_port()}", "--company", "acme", "--timeout", "5")
    assert result.returncode == 3
    assert "unreachable" in result.stderr


def _completed_checkpoints(checkpoint_dir: Path) -> dict[Path, float]:
    return {meta.parent: meta.stat().st_mtime for meta in checkpoint_dir.glob("*/chk-*/_metadata")}


def test_job_killed_and_restarted_resumes_open_windows_from_its_latest_checkpoint(kafka_settings, tmp_path):
    """A crash after a checkpoint loses nothing: the restart restores the open window and the offsets.

    The restart is given --starting-offsets latest, which a start without the checkpoint
    would obey and so miss every event produced while the job was down.
    """
    bootstrap = kafka_settings.bootstrap_servers
    source_topic = new_source_topic(kafka_settings)
    company = f"flink-restart-{uuid.uuid4().hex[:8]}"
    doc = f"{company}-doc"
    base = time.time_ns() // 1_000_000 // MINUTE * MINUTE - 10 * MINUTE
    before_crash = [_event(company, doc, f"{doc}:w0:{i}", base + 10_000 + i * 1_000) for i in range(4)]
    # In window 1, and far enough past window 0's end to close it (the partition with the
    # data drives the watermark alone: every other partition is empty, hence idle).
    before_crash += [_event(company, doc, f"{doc}:w1:{i}", base + MINUTE + 10_000 + i * 1_000) for i in range(3)]
    while_down = [_event(company, doc, f"{doc}:w1:{i}", base + MINUTE + 20_000 + i * 1_000) for i in range(3, 8)]
    while_down.append(_event(f"{company}-closer", doc, f"{doc}:closer", base + 3 * MINUTE))
    checkpoints = tmp_path / "checkpoints"
    reader = AnalyticsReader(bootstrap, {company})

    async def run() -> str:
        try:
            await reader.start()
            await produce(bootstrap, source_topic, [(doc, json.dumps(e).encode()) for e in before_crash])
            job = FlinkJob(
                bootstrap,
                source_topic,
                "earliest",
                tmp_path,
                checkpoint_dir=checkpoints,
                checkpoint_interval_seconds=2,
                restore="latest",
                name="first",
            )
            try:
                await _wait_for(reader, job, lambda: (company, base) in reader.latest(), OUTPUT_TIMEOUT)
                window0_seen = time.time()
                # A checkpoint taken after window 0 went out holds window 1's 3 events and the offsets past them.
                deadline = time.monotonic() + 60
                while not any(mtime > window0_seen + 0.5 for mtime in _completed_checkpoints(checkpoints).values()):
                    assert time.monotonic() < deadline, f"no checkpoint completed in 60s\n{job.diagnostics()}"
                    job.check_alive()
                    await asyncio.sleep(0.5)
            finally:
                job.crash()
            await produce(bootstrap, source_topic, [(doc, json.dumps(e).encode()) for e in while_down])
            restarted = FlinkJob(
                bootstrap,
                source_topic,
                "latest",
                tmp_path,
                checkpoint_dir=checkpoints,
                checkpoint_interval_seconds=2,
                restore="latest",
                name="restarted",
            )
            try:
                await _wait_for(reader, restarted, lambda: (company, base + MINUTE) in reader.latest(), OUTPUT_TIMEOUT)
                restarted.check_alive()
            finally:
                restarted.stop()
            return restarted.output()
        finally:
            await reader.stop()

    restarted_output = asyncio.run(run())
    assert f"from checkpoint {checkpoints}" in restarted_output
    assert reader.latest() == {(company, base): 4, (company, base + MINUTE): 3 + 5}
