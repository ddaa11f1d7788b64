"""The local HDFS: one namenode and one datanode in one JVM, on loopback, jars from Maven Central.

It is Hadoop's own MiniDFSCluster, started through ``MiniHadoopClusterManager`` (from
``hadoop-minicluster``, see ``infra/hadoop/pom.xml``): a real namenode and datanode that
speak the HDFS RPC and WebHDFS protocols, so the Spark jobs write to it as they would to
a production cluster. `docflow hdfs start|stop|status` and the tests' fixture both go
through :class:`LocalHdfs`, as :class:`pipeline.local.kafka.LocalBroker` does for Kafka.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import HdfsError
from pipeline.local import jvm
from pipeline.local.server import LocalServer
from pipeline.settings import REPO_ROOT, Settings

POM = REPO_ROOT / "infra" / "hadoop" / "pom.xml"
LOG4J_CONFIG = REPO_ROOT / "infra" / "hadoop" / "log4j.properties"
MAIN_CLASS = "org.apache.hadoop.mapreduce.MiniHadoopClusterManager"
# The namenode's own view of itself (JMX over HTTP): where it keeps its metadata, and whether
# it is out of safe mode with a live datanode, i.e. takes writes.
NAMENODE_INFO = "/jmx?qry=Hadoop:service=NameNode,name=NameNodeInfo"
NAMESYSTEM_STATE = "/jmx?qry=Hadoop:service=NameNode,name=FSNamesystemState"


def fetch_jars(libs: Path) -> None:
    """Resolve the mini cluster's jars from Maven Central into ``libs`` (Maven caches them in ~/.m2)."""
    jvm.fetch_jars(POM, libs, "hadoop-minicluster-*.jar", HdfsError, "Hadoop")


class LocalHdfs(LocalServer):
    """One namenode and one datanode whose state lives under ``settings.hdfs_dir``."""

    name = "HDFS"
    label = "hdfs"
    ready_means = "take writes"
    marker = MAIN_CLASS
    error = HdfsError
    log_files = ("hdfs.log", "stdout.log")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.hdfs_dir
        self.data_dir = self.dir / "data"
        self.logs_dir = self.dir / "logs"
        self.tmp_dir = self.dir / "tmp"
        self.pid_file = self.dir / "hdfs.pid"

    @property
    def url(self) -> str:
        """The file system URI clients use: ``hdfs://127.0.0.1:PORT``."""
        return f"hdfs://127.0.0.1:{self.settings.hdfs_namenode_port}"

    @property
    def http_url(self) -> str:
        """The namenode's web server: its UI, WebHDFS (``/webhdfs/v1``) and JMX."""
        return f"http://127.0.0.1:{self.settings.hdfs_http_port}"

    @property
    def where(self) -> str:
        return f"{self.url}, web {self.http_url}"

    # -- state -------------------------------------------------------------------------

    @property
    def identity(self) -> Path:
        return self.data_dir

    def serving(self) -> bool:
        return self.takes_writes()

    def _formatted(self) -> bool:
        # MiniDFSCluster keeps the namenode's metadata in name-<nameservice>-<n>/ under its base dir.
        return any(self.data_dir.glob("name-*/current/VERSION"))

    # -- start -------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> bool:
        """Start the cluster and return once it takes writes; False when it was already running."""
        if self.is_running():
            return False
        fetch_jars(self.settings.hdfs_libs)
        for path in (self.data_dir, self.tmp_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.launch(self._command(format_storage=not self._formatted()), timeout)
        return True

    def _command(self, format_storage: bool) -> list[str]:
        s = self.settings
        # Every server socket on loopback: the datanode's defaults are 0.0.0.0.
        conf = {
            "hdfs.minidfs.basedir": self.data_dir,
            "hadoop.tmp.dir": self.tmp_dir,
            "dfs.namenode.rpc-bind-host": "127.0.0.1",
            "dfs.namenode.http-bind-host": "127.0.0.1",
            "dfs.datanode.address": "127.0.0.1:0",
            "dfs.datanode.http.address": "127.0.0.1:0",
            "dfs.datanode.ipc.address": "127.0.0.1:0",
            # One datanode: files written with the client default of 3 replicas would stay under-replicated.
            "dfs.replication": "1",
            "dfs.permissions.enabled": "false",  # a local single-user cluster, like the local broker
        }
        return [
            "java",
            f"-Xmx{s.hdfs_heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration={LOG4J_CONFIG.as_uri()}",
            f"-Dhadoop.log.dir={self.logs_dir}",
            f"-Dtest.build.data={self.tmp_dir}",
            "-cp",
            f"{s.hdfs_libs}/*",
            MAIN_CLASS,
            "-nomr",
            *(["-format"] if format_storage else []),
            "-nnport",
            str(s.hdfs_namenode_port),
            "-nnhttpport",
            str(s.hdfs_http_port),
            *[arg for key, value in conf.items() for arg in ("-D", f"{key}={value}")],
        ]

    def takes_writes(self) -> bool:
        """True when this cluster's namenode answers, is out of safe mode and has a live datanode."""
        info = self._namenode_bean(NAMENODE_INFO)
        try:
            name_dirs = json.loads(info.get("NameDirStatuses", "{}")).get("active", {})
        except ValueError:
            return False
        # Another process on the port (a cluster of another DOCFLOW_HOME) must not pass for this one.
        if not any(Path(name_dir).parent == self.data_dir for name_dir in name_dirs):
            return False
        state = self._namenode_bean(NAMESYSTEM_STATE)
        return state.get("FSState") == "Operational" and state.get("NumLiveDataNodes", 0) >= 1

    def _namenode_bean(self, query: str) -> dict:
        try:
            with urllib.request.urlopen(self.http_url + query, timeout=2) as response:
                beans = json.load(response).get("beans", [])
        except (urllib.error.URLError, OSError, ValueError):
            return {}  # "connection refused" is expected while the JVM boots
        return beans[0] if beans else {}
