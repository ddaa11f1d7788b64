"""What every local server shares (the Kafka broker, HDFS, Milvus): a background process
with a pid file, started until it serves, stopped with no process left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from pipeline.errors import LocalServerError


class LocalServer:
    """A server process whose pid file, logs and state live in one folder, run in the
    background in a session of its own, found again through its pid file, stopped cleanly.

    Subclasses name the server (``name``), a string its command line holds (``marker``: its
    main class, its program), the error they raise, a path that only their own command
    line holds (``identity``: a pid reused by another process or another home's server
    must not pass for theirs) and when it is serving.
    """

    name: str
    label: str  # as the command line names it: `docflow LABEL start|stop|status`
    ready_means: str  # what serving means, as in "did not answer within 90s"
    marker: str
    error: type[LocalServerError]
    log_files: tuple[str, ...]
    pid_file: Path
    logs_dir: Path

    @property
    def identity(self) -> Path:
        raise NotImplementedError

    @property
    def where(self) -> str:
        """Where clients reach the server, as the command line shows it."""
        raise NotImplementedError

    def serving(self) -> bool:
        raise NotImplementedError

    def pid(self) -> int | None:
        """The server's pid when its process is alive, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if self.marker.encode() not in cmdline or str(self.identity).encode() not in cmdline:
            return None  # the pid was reused by another process
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def launch(self, command: list[str], timeout: float) -> None:
        """Start ``command`` and return once the server is serving; stopped again if it never is."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.logs_dir / "stdout.log", "ab") as stdout:
            process = subprocess.Popen(
                command,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the caller's terminal must not kill it half-way
            )
        self.pid_file.write_text(str(process.pid))
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise self.error(f"{self.name} exited with {process.returncode}:\n{self.log_tail()}")
                if self.serving():
                    return
                time.sleep(0.5)
            raise self.error(f"{self.name} did not {self.ready_means} within {timeout:.0f}s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 40) -> str:
        tails = []
        for name in self.log_files:
            path = self.logs_dir / name
            if path.exists():
                tails.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout``; False when it was not running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.2)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)  # a shutdown that hangs must not leave a JVM behind
            while alive(pid):
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True


def alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
