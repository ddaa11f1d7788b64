"""`docflow dlq list|replay`: the messages stages gave up on (documents.dlq), and their re-injection.

These talk to Kafka, not to the web API, as an operator does (pipeline/dlq.py says what is
read and what a replay sends). Exit codes as every command's (pipeline/cli/api.py): 0
success, 1 a letter was refused (or the confirmation declined), 2 usage or configuration
error, 3 the broker is unreachable.
"""

from __future__ import annotations

import json
import sys

import click

from pipeline.cli.api import EXIT_FAILED, EXIT_UNREACHABLE, run_or_exit, utc_time
from pipeline.dlq import READ_TIMEOUT_SECONDS, ListedDeadLetter, ReplayOutcome, ReplayReport, dead_letters, replay
from pipeline.errors import DlqUnavailable
from pipeline.settings import get_settings

UNAVAILABLE = {DlqUnavailable: EXIT_UNREACHABLE}
ERROR_WIDTH = 60


def shortened(text: str, width: int = ERROR_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table_lines(letters: list[ListedDeadLetter]) -> list[str]:
    """What `docflow dlq list` prints: one line per letter, oldest first, and the count."""
    lines = [f"{'failed':23}  {'stage':10}  {'topic':16}  {'document':36}  {'company':16}  error"]
    lines += [
        f"{utc_time(letter.failed_ms):23}  {letter.stage:10}  {letter.topic:16}  {letter.document_id:36}  "
        f"{letter.company_id:16}  {shortened(letter.error)}"
        for letter in letters
    ]
    lines.append(f"{len(letters)} dead letter{'' if len(letters) == 1 else 's'}")
    return lines


def filters(command):
    command = click.option(
        "--timeout",
        type=click.FloatRange(min=1),
        default=READ_TIMEOUT_SECONDS,
        show_default=True,
        help="Seconds to wait for the broker and to read documents.dlq to its end.",
    )(command)
    command = click.option("--company", "company_id", default=None, help="Only this company's letters.")(command)
    command = click.option(
        "--stage", default=None, help="Only letters of this stage: validate, download, extract, embed, index or decode."
    )(command)
    return click.option("--document", "document_id", default=None, help="Only this document's letters.")(command)


@click.group()
def dlq() -> None:
    """The messages stages gave up on (documents.dlq): list them, replay them once the cause is fixed."""


@dlq.command("list")
@filters
@click.option("--json", "as_json", is_flag=True, help="Print the letters as JSON (with partition and offset).")
def list_letters(document_id, stage, company_id, timeout, as_json) -> None:
    """List the dead letters, oldest first."""
    settings = get_settings()
    letters = run_or_exit(
        dead_letters(settings, document_id=document_id, stage=stage, company_id=company_id, timeout=timeout),
        UNAVAILABLE,
    )
    if as_json:
        click.echo(json.dumps([letter.asdict() for letter in letters], indent=2))
        return
    for line in table_lines(letters):
        click.echo(line)


@dlq.command("replay")
@filters
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; produce nothing.")
@click.option(
    "--include-undecodable",
    is_flag=True,
    help="Also replay messages no stage could decode, as they were (they will most likely fail again).",
)
@click.option("--yes", is_flag=True, help="Replay every letter without asking (when no filter is given).")
def replay_letters(document_id, stage, company_id, timeout, dry_run, include_undecodable, yes) -> None:
    """Re-inject dead letters into their original topic, reopening their failed documents.

    Replaying a letter twice is safe: chunk ids are deterministic and every stage downstream is idempotent.
    """
    settings = get_settings()
    letters = run_or_exit(
        dead_letters(settings, document_id=document_id, stage=stage, company_id=company_id, timeout=timeout),
        UNAVAILABLE,
    )
    if not letters:
        click.echo("no dead letters match")
        return
    if not (document_id or stage or company_id or dry_run or yes):
        click.confirm(f"replay all {len(letters)} dead letters of every company?", abort=True, err=True)
    report = run_or_exit(
        replay(settings, letters, dry_run=dry_run, include_undecodable=include_undecodable, timeout=timeout),
        UNAVAILABLE,
    )
    for line in report_lines(report):
        click.echo(line)
    if report.refused:
        sys.exit(EXIT_FAILED)


def report_lines(report: ReplayReport) -> list[str]:
    """What `docflow dlq replay` prints: each letter's outcome, then the summary."""

    def line(outcome: ReplayOutcome) -> str:
        letter = outcome.letter
        text = f"{outcome.action}  {letter.topic}  {letter.document_id}  {letter.company_id}  ({letter.stage})"
        return f"{text}: {outcome.reason}" if outcome.reason else text

    lines = [line(outcome) for outcome in report.outcomes]
    verb = "would be replayed (dry run)" if report.dry_run else "replayed"
    lines.append(f"{len(report.replayed)} {verb}, {len(report.skipped)} skipped, {len(report.refused)} refused")
    return lines
