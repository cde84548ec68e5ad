"""`fedlm bench`: measurements that are not a single model evaluation."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import typer

from fedlm.privacy.detector import DEFAULT_THRESHOLD

app = typer.Typer(help="Benchmarks: detector quality, gate latency.", no_args_is_help=True)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


@app.command()
def privacy(
    data: Path | None = typer.Option(None, "--data", help="Labelled JSONL (default: the built-in set of prompts)."),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, "--threshold", min=0.0, max=1.0),
    json_out: bool = typer.Option(False, "--json", help="Print the full result as one JSON object."),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON result to this file."),
) -> None:
    """Recall and precision of the privacy detector per entity type, and the gate's latency once loaded."""
    from fedlm.bench.privacy import evaluate, load_labelled

    if data is not None and not data.is_file():
        raise typer.BadParameter(f"no such file: {data}", param_hint="--data")
    try:
        prompts = load_labelled(data)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from err
    result = evaluate(prompts, threshold=threshold)
    text = json.dumps(result, ensure_ascii=False, indent=None if json_out else 2)
    if out is not None:
        _write_atomically(out, text + "\n")
    if json_out:
        typer.echo(text)
        return
    _print_table(result)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"privacy detector: {result['n']} prompts, threshold {result['threshold']}")
    for column in ("entity type", "precision", "recall", "f1", "tp", "fp", "fn"):
        table.add_column(column, justify="left" if column == "entity type" else "right")

    def row(name: str, s: dict) -> list[str]:
        return [name, *(f"{s[k]:.3f}" if s[k] is not None else "-" for k in ("precision", "recall", "f1"))] + [
            str(s[k]) for k in ("tp", "fp", "fn")
        ]

    for name, scores in result["entities"]["by_type"].items():
        table.add_row(*row(name, scores))
    table.add_row(*row("all entities", result["entities"]["overall"]), style="bold")
    table.add_row(*row("sensitive prompts", result["prompts"]), style="bold")
    console = Console()
    console.print(table)
    gate, det = result["latency_ms"]["gate"], result["latency_ms"]["detector"]
    console.print(
        f"gate latency p50 {gate['p50']} ms, p95 {gate['p95']} ms (detector alone p50 {det['p50']} ms); "
        f"engine load {result['load_seconds']} s"
    )
    for policy, c in result["clean_prompts_changed"].items():
        console.print(f"clean prompts altered by {policy}: {c['changed']} of {c['of']}")
