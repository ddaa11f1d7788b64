"""A role's worker process as `docflow worker` configures it."""

from __future__ import annotations

import logging

from pipeline.local.workers import role_metrics_ports, role_worker
from pipeline.settings import Settings


def test_a_quiet_worker_leaves_the_root_logger_at_its_level(tmp_path):
    # `docflow up` runs its workers at warning. Had the root logger gone to DEBUG, every debug
    # line of aiokafka and Faust (one per message sent) would be formatted and then dropped.
    worker = role_worker(Settings(home=tmp_path, embedding_backend="hashing"), "chunker", "warning")
    root = logging.Logger("root-under-test")
    root.addHandler(logging.NullHandler())
    root.setLevel(logging.WARNING)

    worker.on_setup_root_logger(root, logging.WARNING)  # what Faust calls when the worker sets up logging

    assert root.level == logging.WARNING
    assert not root.isEnabledFor(logging.DEBUG)


def test_docflow_up_gives_each_role_its_own_metrics_port_from_the_configured_one(tmp_path):
    assert role_metrics_ports(Settings(home=tmp_path, metrics_port=8000)) == {
        "web": 8000,
        "chunker": 8001,
        "embedder": 8002,
        "indexer": 8003,
    }
    assert role_metrics_ports(Settings(home=tmp_path)) == {}
