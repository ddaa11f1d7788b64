"""A role's worker process as `docflow worker` configures it."""

from __future__ import annotations

import logging

from pipeline.local.workers import role_worker
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
