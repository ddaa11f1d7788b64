"""The ``docflow`` command line: one module per command group, gathered here.

Exit codes: 0 success, 1 a document failed, 2 usage error, 3 the service is unreachable, 4 an unsafe
configuration refused.
"""

from __future__ import annotations

import click

from pipeline.cli.analytics import analytics
from pipeline.cli.dlq import dlq
from pipeline.cli.documents import list_documents, search, status, upload
from pipeline.cli.keys import keys
from pipeline.cli.lifecycle import cancel, delete
from pipeline.cli.servers import hdfs, kafka, milvus
from pipeline.cli.stack import up, worker
from pipeline.cli.storage import storage


@click.group()
def main() -> None:
    """docflow: streaming document ingestion on Kafka."""


for command in (up, worker, upload, status, list_documents, search, analytics, keys, kafka, hdfs, milvus):
    main.add_command(command)
main.add_command(storage)
main.add_command(dlq)
main.add_command(cancel)
main.add_command(delete)
