"""The local HDFS: started by the project's own code, on loopback only, keeping files across restarts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline.errors import HdfsError
from pipeline.local.hdfs import LocalHdfs
from pipeline.local.ports import free_port
from pipeline.settings import Settings


def webhdfs_write(cluster: LocalHdfs, path: str, data: bytes) -> None:
    """Write a file the way every HDFS client does: the namenode names a datanode, the bytes go there."""
    ask = urllib.request.Request(
        f"{cluster.http_url}/webhdfs/v1{path}?op=CREATE&overwrite=true&noredirect=true", method="PUT"
    )
    with urllib.request.urlopen(ask, timeout=10) as response:
        datanode_url = json.load(response)["Location"]
    with urllib.request.urlopen(urllib.request.Request(datanode_url, data=data, method="PUT"), timeout=10) as response:
        assert response.status == 201


def webhdfs_read(cluster: LocalHdfs, path: str) -> bytes:
    with urllib.request.urlopen(f"{cluster.http_url}/webhdfs/v1{path}?op=OPEN", timeout=10) as response:
        return response.read()


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    listening = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address_hex, port_hex = local.split(":")
            raw = bytes.fromhex(address_hex)
            # /proc prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            listening.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return listening


def java_processes_under(home: Path) -> list[int]:
    """Pids of every JVM whose command line names this home: what a stopped cluster must not leave."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"java" in cmdline and str(home).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_hdfs_listens_on_loopback_only_with_namenode_and_datanode(hdfs):
    addresses = listening_addresses(hdfs.pid())
    ports = {port for _, port in addresses}
    assert {hdfs.settings.hdfs_namenode_port, hdfs.settings.hdfs_http_port} <= ports
    # namenode RPC and web, datanode data transfer, IPC and web: at least five servers, all on loopback
    assert len(addresses) >= 5, addresses
    assert {address for address, _ in addresses} <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses


def test_file_written_to_hdfs_reads_back(hdfs):
    path = f"/tests/{uuid.uuid4()}.txt"
    payload = uuid.uuid4().bytes * 1000
    webhdfs_write(hdfs, path, payload)
    assert webhdfs_read(hdfs, path) == payload


def test_cli_start_status_stop_leaves_no_jvm_and_keeps_files_across_restarts(tmp_path):
    env = {
        "DOCFLOW_HOME": str(tmp_path),
        "DOCFLOW_HDFS_NAMENODE_PORT": str(free_port()),
        "DOCFLOW_HDFS_HTTP_PORT": str(free_port()),
        "DOCFLOW_HDFS_HEAP": "256m",
        "PATH": os.environ["PATH"],  # java and mvn
    }
    cluster = LocalHdfs(
        Settings(
            home=tmp_path,
            hdfs_namenode_port=int(env["DOCFLOW_HDFS_NAMENODE_PORT"]),
            hdfs_http_port=int(env["DOCFLOW_HDFS_HTTP_PORT"]),
        )
    )

    def docflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "hdfs", *args], env=env, capture_output=True, text=True, timeout=120
        )

    stopped = docflow("status")
    assert stopped.returncode == 3 and "hdfs stopped" in stopped.stdout

    began = time.monotonic()
    started = docflow("start")
    start_seconds = time.monotonic() - began
    assert started.returncode == 0, started.stderr
    assert f"hdfs started at {cluster.url}" in started.stdout
    pid = cluster.pid()
    assert pid is not None and cluster.takes_writes()

    running = docflow("status")
    assert running.returncode == 0, running.stderr
    assert f"running at {cluster.url}" in running.stdout and f"(pid {pid})" in running.stdout
    again = docflow("start")
    assert again.returncode == 0 and "already running" in again.stdout and cluster.pid() == pid

    path = f"/kept/{uuid.uuid4()}.txt"
    webhdfs_write(cluster, path, b"kept across restarts")

    began = time.monotonic()
    stop = docflow("stop")
    stop_seconds = time.monotonic() - began
    assert stop.returncode == 0 and "hdfs stopped" in stop.stdout
    assert java_processes_under(tmp_path) == []
    assert docflow("status").returncode == 3
    assert docflow("stop").stdout.strip() == "hdfs was not running"

    assert docflow("start").returncode == 0  # the namenode's storage exists: no format, files are there
    try:
        assert webhdfs_read(cluster, path) == b"kept across restarts"
    finally:
        assert docflow("stop").returncode == 0
    assert java_processes_under(tmp_path) == []
    print(f"docflow hdfs start took {start_seconds:.1f}s, stop {stop_seconds:.1f}s")


def test_start_fails_when_another_cluster_holds_the_ports(hdfs, tmp_path):
    """A second home on the same ports must not take the running cluster for its own."""
    other = LocalHdfs(hdfs.settings.model_copy(update={"home": tmp_path}))
    with pytest.raises(HdfsError):
        other.start(timeout=60)
    assert not other.is_running()
    assert hdfs.takes_writes() and not other.takes_writes()
