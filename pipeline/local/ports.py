"""Free loopback ports for local servers started side by side (tests, benchmarks)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST_PORT = 10000


def _ephemeral_start() -> int:
    """Where the kernel's range of ports for outgoing connections begins (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the ephemeral range.

    Port 0 would give an ephemeral port, which the kernel may hand to an outgoing connection
    (a Kafka client's, say) between this call and the server's bind: measured as a worker
    dying with "address already in use" about once per full test run.
    """
    upper = _ephemeral_start() - 1
    for _ in range(200):
        port = random.randint(LOWEST_PORT, upper)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded range: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
