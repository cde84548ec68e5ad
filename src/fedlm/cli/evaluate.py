"""`fedlm eval`: MCQ accuracy or bits per byte of one model, in process (edge) or over HTTP (cloud)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedlm.cli.options import ApiKey, Cloud, CloudModel, Edge, Json, api_key_or_env, cloud_url, egress_gate
from fedlm.models import CLOUD_DEFAULT

if TYPE_CHECKING:
    from fedlm.egress import EgressHook


class Task(StrEnum):
    mcq = "mcq"
    bpb = "bpb"


class Mode(StrEnum):
    edge = "edge"
    cloud = "cloud"
    fused = "fused"
    kv = "kv"
    t2t = "t2t"


def eval_command(
    task: Task = typer.Option(
        ..., "--task", help="mcq: accuracy by choice log-likelihood; bpb: bits per UTF-8 byte of the target."
    ),
    data: Path = typer.Option(..., "--data", help="JSONL rows: mcq {question, choices, answer}; bpb {prompt, target}."),
    mode: Mode = typer.Option(
        Mode.edge,
        "--mode",
        help="edge: the edge model in process; cloud: the cloud model through its HTTP API; fused: both, fused; "
        "kv: the edge reads its context with the transmitter's KV cache fused in (C2C); t2t: the edge reads a hint "
        "the cloud model wrote.",
    ),
    edge: str = Edge,
    cloud: str = Cloud,
    cloud_model: str | None = CloudModel,
    fusion: str = typer.Option("router", "--fusion", help="Fusion rule for --mode fused: router|linear|proxy|route."),
    transmitter: str = typer.Option(
        CLOUD_DEFAULT,
        "--transmitter",
        help="--mode kv: the transmitter, MODEL or MODEL+ADAPTER_DIR (merged), served on loopback.",
    ),
    fuser: Path | None = typer.Option(
        None,
        "--fuser",
        help="--mode kv: the fuser folder (default: one trained here with `fedlm kv train`, else the one fedlm ships "
        "for the pair).",
    ),
    api_key: str | None = ApiKey,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score only the first N rows."),
    as_json: bool = Json,
) -> None:
    """Score a JSONL file with the edge model or the cloud model."""
    from fedlm.cloud.client import CloudClient
    from fedlm.data.jsonl import BpbRow, DataError, McqRow, read_rows
    from fedlm.eval.bpb import evaluate_bpb
    from fedlm.eval.kv_scorer import KVScorer
    from fedlm.eval.mcq import evaluate_mcq
    from fedlm.eval.scorers import CloudScorer, FusedScorer, LocalScorer
    from fedlm.fusion.rules import make_rule
    from fedlm.kvcomm.receiver import KVReceiver
    from fedlm.kvcomm.t2t import TextTransmitter
    from fedlm.models import UnknownModelError, load
    from fedlm.models.loader import load_spec

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
        with (
            egress_gate(None) as gate,
            Progress(*columns, console=console, disable=as_json and not console.is_terminal) as progress,
        ):
            bar = progress.add_task("score", total=texts)

            def advance(n: int) -> None:
                progress.update(bar, advance=n)

            if mode is Mode.edge:
                scorer = LocalScorer(load_spec(edge, quiet=as_json))
                result = run(rows, scorer, advance)
            elif mode is Mode.kv:
                result, scorer = _kv(rows, run, advance, edge, transmitter, fuser, as_json, gate)
            else:
                with ExitStack() as stack:
                    url, model = stack.enter_context(cloud_url(cloud, cloud_model, quiet=as_json))
                    if mode is Mode.cloud:
                        scorer = CloudScorer(url, api_key_or_env(api_key), model, egress=gate)
                    elif mode is Mode.t2t:
                        hints = stack.enter_context(CloudClient(url, api_key_or_env(api_key), model=model, egress=gate))
                        receiver = KVReceiver(load(edge, quiet=as_json), [])
                        scorer = KVScorer(receiver, hint=TextTransmitter(hints), name=f"{edge}+t2t:{model or url}")
                    else:
                        scorer = FusedScorer(
                            load(edge, quiet=as_json), rule, url, api_key_or_env(api_key), model, egress=gate
                        )
                    result = run(rows, scorer, advance)
                if mode is Mode.fused:
                    result["fused_token_share"] = scorer.fused_token_share
    except UnknownModelError as err:
        raise typer.BadParameter(str(err), param_hint="--edge/--cloud-model") from err
    result.pop("right", None)  # per-row marks: the library's, for subsets; the command reports the whole
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


def _kv(
    rows: list,
    run: Callable,
    advance: Callable[[int], None],
    edge: str,
    transmitter: str,
    fuser: Path | None,
    quiet: bool,
    gate: EgressHook,
) -> tuple[dict, Any]:
    """--mode kv: the transmitter served on loopback, its cache fused into the edge's context through `fuser`."""
    from fedlm.eval.kv_scorer import c2c_scorer
    from fedlm.kvcomm.fuser import FuserError
    from fedlm.kvcomm.shipped import find_fuser
    from fedlm.models.loader import load_spec

    try:
        receiver, sender = load_spec(edge, quiet=quiet), load_spec(transmitter, quiet=quiet)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--transmitter") from err
    fuser = fuser or find_fuser(receiver.name, sender.name)
    try:
        with c2c_scorer(receiver, sender, fuser, name=f"{edge}+kv:{transmitter}", egress=gate) as scorer:
            result = run(rows, scorer, advance)
    except FuserError as err:
        raise typer.BadParameter(str(err), param_hint="--fuser") from err
    result["bytes_per_text"] = scorer.bytes_per_text
    result["fuser"] = str(fuser)
    return result, scorer
