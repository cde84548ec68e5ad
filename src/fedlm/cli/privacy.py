"""`fedlm privacy`: scan text for sensitive entities, and summarise the egress audit log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import typer

from fedlm.privacy.detector import DEFAULT_THRESHOLD

app = typer.Typer(help="Privacy gate: find sensitive content, review what left the device.", no_args_is_help=True)


def _rows(path: Path) -> Iterator[str]:
    """The `text` of each JSONL row; a row without one is a usage error naming its line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path}: {err.strerror}", param_hint="--data") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise typer.BadParameter(f"{path}:{number} is not JSON ({err.msg})", param_hint="--data") from err
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise typer.BadParameter(f'{path}:{number} needs a string "text" field', param_hint="--data")
        yield row["text"]


@app.command()
def scan(
    text: str | None = typer.Argument(None, help="Text to scan (or use --data)."),
    data: Path | None = typer.Option(None, "--data", help="JSONL file whose rows have a 'text' field."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per input row: text, sensitive, entities."),
    threshold: float = typer.Option(
        DEFAULT_THRESHOLD, "--threshold", min=0.0, max=1.0, help="Lowest score that counts as a finding."
    ),
) -> None:
    """Report sensitive entities (type, character offsets, score) in TEXT or in each row of --data."""
    if (text is None) == (data is None):
        raise typer.BadParameter("give either TEXT or --data FILE.jsonl, not both and not neither")
    from fedlm.privacy.detector import Detector

    detector = Detector(threshold=threshold)
    for item in _rows(data) if data is not None else [text or ""]:
        found = detector.scan(item)
        if json_out:
            typer.echo(json.dumps(found.to_dict(), ensure_ascii=False))
            continue
        typer.echo(f"{'SENSITIVE' if found.sensitive else 'clean':9}  {item}")
        for e in found.entities:
            typer.echo(f"           {e.type:<16} [{e.start}:{e.end}] {e.score:.2f}  {e.text!r}")


@app.command()
def audit(
    log: Path | None = typer.Option(
        None, "--log", help="Audit log (default: $FEDLM_AUDIT_LOG or ~/.fedlm/audit.jsonl)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Summarise the egress audit log: requests sent and blocked, bytes, destinations, entity types removed."""
    from fedlm.egress.audit import AuditLog, summarize

    if log is not None and not log.is_file():
        raise typer.BadParameter(f"no audit log at {log}", param_hint="--log")
    audit_log = AuditLog(log)
    try:
        summary = summarize(audit_log.records())
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--log") from err
    if json_out:
        typer.echo(json.dumps({"log": str(audit_log.path), **summary}))
        return
    typer.echo(f"audit log: {audit_log.path}")
    typer.echo(f"records: {summary['records']} (sent {summary['sent']}, blocked {summary['blocked']})")
    typer.echo(f"bytes sent: {summary['bytes_sent']}")
    if summary["records"]:
        typer.echo(f"period: {summary['first']} .. {summary['last']}")
    for title, key in (("by destination", "by_destination"), ("by policy", "by_policy"), ("removed", "removed")):
        if summary[key]:
            typer.echo(f"{title}: " + ", ".join(f"{k} {v}" for k, v in summary[key].items()))
