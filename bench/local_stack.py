"""A local broker and docflow worker processes for one measurement, under a temporary home."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.local.kafka import LocalBroker
from pipeline.local.milvus import LocalMilvus
from pipeline.local.ports import free_port
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.settings import Settings


class LocalStack:
    """A broker (and Milvus, with ``index="milvus"``) and worker processes on free ports under a
    temporary home, for one measurement. Without an index the pipeline ends at embeddings.ready."""

    def __init__(self, backend: str, batch_size: int, index: str = "none", precision: str = "fp32") -> None:
        self._home = tempfile.TemporaryDirectory(prefix="docflow-e2e-")
        home = Path(self._home.name)
        self.settings = Settings(
            home=home, kafka_port=free_port(), kafka_controller_port=free_port(), index=index, milvus_port=free_port()
        )
        self.broker = LocalBroker(self.settings)
        self.milvus = LocalMilvus(self.settings) if index == "milvus" else None
        (home / "logs").mkdir()
        self.workers = WorkerStack(
            self.settings,
            worker_env(
                self.settings,
                DOCFLOW_EMBEDDING_BACKEND=backend,
                DOCFLOW_EMBEDDING_BATCH_SIZE=str(batch_size),
                DOCFLOW_EMBEDDING_CACHE="false",
                DOCFLOW_LOCAL_MODEL_PRECISION=precision,
                DOCFLOW_CHUNKER_PROCESSES="0",
                # The deployment's chunk sizes (in the model's tokens), which e2e.py's baseline uses too.
                DOCFLOW_CHUNK_SIZE_UNIT=self.settings.chunk_size_unit,
                DOCFLOW_CHUNK_SIZE=str(self.settings.chunk_size),
                DOCFLOW_CHUNK_OVERLAP=str(self.settings.chunk_overlap),
            ),
            home / "logs",
        )

    def __enter__(self) -> LocalStack:
        self.broker.start()
        if self.milvus is not None:
            self.milvus.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.workers.stop_all()
        if self.milvus is not None:
            self.milvus.stop()
        self.broker.stop()
        self._home.cleanup()

    @property
    def web_url(self) -> str:
        return self.workers.of_role("web")[0].url

    def processes(self) -> dict[str, int]:
        """Every process of the stack by name (``chunker-2`` for a role's second one), and the broker's JVM."""
        named = {"broker": self.broker.pid()}
        counts: dict[str, int] = {}
        for worker in self.workers.workers:
            counts[worker.role] = counts.get(worker.role, 0) + 1
            named[f"{worker.role}-{counts[worker.role]}"] = worker.process.pid
        return named
