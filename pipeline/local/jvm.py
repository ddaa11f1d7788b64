"""The local broker's and the local HDFS's jars, resolved from Maven Central by their pom files.

Both run as :class:`pipeline.local.server.LocalServer` processes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def fetch_jars(pom: Path, libs: Path, marker_glob: str, error: type[Exception], what: str) -> None:
    """Resolve a pom's dependencies from Maven Central into ``libs`` unless ``marker_glob`` is there already."""
    if any(libs.glob(marker_glob)):
        return
    command = ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={libs}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise error(f"fetching {what} jars with Maven failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
