"""Where benchmark results go, the machine they came from, and BENCHMARKS.md made from them.

Every benchmark writes its figures twice, as JSON (with the machine) and as the Markdown
table it printed; `python bench/report.py` gathers the latest tables into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"

E2E_HASHING = "python bench/e2e.py --backend hashing --scaling --profile bench/results/profile-hashing"
# The sections of BENCHMARKS.md: the table, the JSON naming its machine, a title, the command.
SECTIONS = (
    ("e2e-hashing.md", "e2e-hashing.json", "End to end, hashing backend", E2E_HASHING),
    (
        "profile-hashing/summary.md",
        "e2e-hashing.json",
        "Where the workers' CPU goes (py-spy, hashing backend, 1 chunker / 1 embedder)",
        E2E_HASHING,
    ),
    (
        "e2e-local.md",
        "e2e-local.json",
        "End to end, local model (all-MiniLM-L6-v2 on ONNX Runtime)",
        "python bench/e2e.py CORPUS --backend local",
    ),
    (
        "e2e-local-int8.md",
        "e2e-local-int8.json",
        "End to end, local model with int8 matrix products (DOCFLOW_LOCAL_MODEL_PRECISION=int8)",
        "python bench/e2e.py CORPUS --backend local --precision int8",
    ),
    ("extract.md", "extract.json", "PDF extraction: pypdfium2 against pypdf", "python bench/extract.py"),
    ("embed.md", "embed.json", "Embedding backends", "python bench/embed.py"),
    ("search.md", "search.json", "Search and indexing (Milvus)", "python bench/search.py"),
)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def save(path: Path, results: dict, table: str) -> None:
    """Write ``results`` as JSON with the machine they were measured on, and ``table`` beside it as .md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "machine": machine()}, indent=2) + "\n")
    path.with_suffix(".md").write_text(table.rstrip("\n") + "\n")
    print(f"\nwritten to {path} and {path.with_suffix('.md').name}")


def write_benchmarks_md(results_dir: Path = RESULTS_DIR, output: Path = BENCHMARKS_MD) -> list[str]:
    """BENCHMARKS.md from the latest tables in ``results_dir``; returns the sections it found none for."""
    parts = [
        "# Benchmarks",
        "",
        "The latest figures of `make bench`, written by `python bench/report.py` from `bench/results/`.",
        "",
    ]
    missing = []
    for table_name, json_name, title, command in SECTIONS:
        table = results_dir / table_name
        if not table.exists():
            missing.append(table_name)
            continue
        measured = _measured_on(results_dir / json_name)
        parts += [f"## {title}", "", f"`{command}`{measured}", "", table.read_text().rstrip("\n"), ""]
    output.write_text("\n".join(parts))
    return missing


def _measured_on(json_path: Path) -> str:
    try:
        found = json.loads(json_path.read_text())["machine"]
    except (OSError, ValueError, KeyError):
        return ""
    return (
        f", measured on {found['cpus']} CPUs ({found.get('cpu', 'model not recorded')}), "
        f"{found['memory_gib']} GiB, {found['system']}, Python {found['python']}"
    )


if __name__ == "__main__":
    left_out = write_benchmarks_md()
    print(f"written {BENCHMARKS_MD}" + (f" (no results yet for: {', '.join(left_out)})" if left_out else ""))
