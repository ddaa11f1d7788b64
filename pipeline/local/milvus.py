"""The local Milvus: milvus-lite's gRPC server on loopback, data under ``DOCFLOW_HOME/milvus``.

A real Milvus server (the `milvus-lite` package's `milvus-lite server`), so the workers, the
tests and `make run` speak to it over gRPC exactly as they would to a Milvus cluster.
Opened as a file instead (``MilvusClient("x.db")``), Milvus Lite allows one process only.
`docflow milvus start|stop|status`, `docflow up` and the tests' fixture all go through
:class:`LocalMilvus`.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from pathlib import Path

from pipeline.errors import MilvusServerError
from pipeline.local.server import LocalServer
from pipeline.settings import Settings

# `milvus-lite server` stops cleanly (gRPC server stopped, memtables flushed, the data dir's
# lock released) only on KeyboardInterrupt; SIGTERM kills it at once, and a SIGINT that the
# caller ignores stays ignored in the child. So it runs behind this launcher, which turns
# either signal into that clean shutdown, once.
LAUNCHER = """\
import signal, sys
def _stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, _stop)
signal.signal(signal.SIGINT, _stop)
from milvus_lite.cmdline import main
sys.exit(main(sys.argv[1:]))
"""


class LocalMilvus(LocalServer):
    """One milvus-lite server process whose data, logs and pid file live under ``settings.milvus_dir``."""

    name = "the local Milvus"
    label = "milvus"
    ready_means = "list collections"
    marker = "milvus_lite.cmdline"
    error = MilvusServerError
    log_files = ("stdout.log",)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.milvus_dir
        self.data_dir = self.dir / "data"
        self.logs_dir = self.dir / "logs"
        self.pid_file = self.dir / "milvus.pid"

    @property
    def identity(self) -> Path:
        return self.data_dir

    @property
    def where(self) -> str:
        return f"http://127.0.0.1:{self.settings.milvus_port}"

    def serving(self) -> bool:
        """Whether a client connects and lists collections within 2 s."""
        from pymilvus import MilvusClient

        pymilvus_log = logging.getLogger("pymilvus")
        level = pymilvus_log.level
        pymilvus_log.setLevel(logging.CRITICAL)  # it logs every refused connection with a traceback
        try:
            client = MilvusClient(uri=self.where, timeout=2.0)
            try:
                client.list_collections(timeout=2.0)
                return True
            finally:
                client.close()
        except Exception:  # MilvusException, or a grpc.RpcError (DEADLINE_EXCEEDED) pymilvus lets through
            return False
        finally:
            pymilvus_log.setLevel(level)

    def start(self, timeout: float = 60.0) -> bool:
        """Start the server; returns once it serves, False when it was already running."""
        if self.is_running():
            return False
        self._check_port_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = str(self.settings.milvus_port)
        command = [
            sys.executable, "-c", LAUNCHER, "server",
            "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", port,
        ]  # fmt: skip
        self.launch(command, timeout)
        return True

    def _check_port_free(self) -> None:
        # gRPC binds with SO_REUSEPORT: a second server on a busy port starts without an error,
        # and the kernel then spreads new connections over both, each with its own data.
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
            try:
                sock.bind(("127.0.0.1", self.settings.milvus_port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise self.error(
                        f"port {self.settings.milvus_port} is in use by another process; set DOCFLOW_MILVUS_PORT"
                    ) from exc
                raise
