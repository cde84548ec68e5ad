"""`fedlm eval`: MCQ accuracy or bits per byte of one model, in process (edge) or over HTTP (cloud)."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedlm.cli.options import ApiKey, Cloud, CloudModel, Edge, Json, api_key_or_env, cloud_url


class Task(StrEnum):
    mcq = "mcq"
    bpb = "bpb"


class Mode(StrEnum):
    edge = "edge"
    cloud = "cloud"
    fused = "fused"


def eval_command(
    task: Task = typer.Option(
        ..., "--task", help="mcq: accuracy by choice log-likelihood; bpb: bits per UTF-8 byte of the target."
    ),
    data: Path = typer.Option(..., "--data", help="JSONL rows: mcq {question, choices, answer}; bpb {prompt, target}."),
    mode: Mode = typer.Option(
        Mode.edge,
        "--mode",
        help="edge: the edge model in process; cloud: the cloud model through its HTTP API; fused: both, fused.",
    ),
    edge: str = Edge,
    cloud: str = Cloud,
    cloud_model: str | None = CloudModel,
    fusion: str = typer.Option("router", "--fusion", help="Fusion rule for --mode fused: router|linear|proxy|route."),
    api_key: str | None = ApiKey,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score only the first N rows."),
    as_json: bool = Json,
) -> None:
    """Score a JSONL file with the edge model or the cloud model."""
    from fedlm.bench.evaluate import evaluate_bpb, evaluate_mcq
    from fedlm.bench.scorers import CloudScorer, FusedScorer, LocalScorer
    from fedlm.data.jsonl import BpbRow, DataError, McqRow, read_rows
    from fedlm.fusion.rules import make_rule
    from fedlm.models import UnknownModelError, load

    try:
        rule = make_rule(fusion)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--fusion") from err

    try:
        rows = read_rows(data, McqRow if task is Task.mcq else BpbRow, limit)
    except DataError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from err
    texts = sum(len(r.choices) for r in rows) if task is Task.mcq else len(rows)
    run = evaluate_mcq if task is Task.mcq else evaluate_bpb
    console = Console(stderr=True)
    columns = (
        TextColumn(f"[bold]{task.value}/{mode.value}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console, disable=as_json and not console.is_terminal) as progress:
            bar = progress.add_task("score", total=texts)

            def advance(n: int) -> None:
                progress.update(bar, advance=n)

            if mode is Mode.edge:
                scorer = LocalScorer(load(edge, quiet=as_json))
                result = run(rows, scorer, advance)
            else:
                with cloud_url(cloud, cloud_model, quiet=as_json) as (url, model):
                    if mode is Mode.cloud:
                        scorer = CloudScorer(url, api_key_or_env(api_key), model)
                    else:
                        scorer = FusedScorer(load(edge, quiet=as_json), rule, url, api_key_or_env(api_key), model)
                    result = run(rows, scorer, advance)
                if mode is Mode.fused:
                    result["fused_token_share"] = round(scorer.fused_tokens / max(scorer.target_tokens, 1), 4)
    except UnknownModelError as err:
        raise typer.BadParameter(str(err), param_hint="--edge/--cloud-model") from err
    report = {"task": task.value, "mode": mode.value, "model": scorer.name, "data": str(data), **result}
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"fedlm eval: {task.value} on {data.name}")
    for key in ("key", "value"):
        table.add_column(key)
    for key, value in report.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
