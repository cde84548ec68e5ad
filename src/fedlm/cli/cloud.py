"""`fedlm cloud`: serve a model over the OpenAI protocol, or probe what a server supports."""

from __future__ import annotations

import dataclasses
import json
import os

import typer
from rich.console import Console

from fedlm.cli.options import ApiKey, Json, Weights, api_key_or_env, egress_gate, warn_if_open
from fedlm.cloud.server import Limits
from fedlm.models import CLOUD_DEFAULT

app = typer.Typer(help="The OpenAI-compatible cloud service and client.", no_args_is_help=True)


@app.command()
def serve(
    model: str = typer.Option(CLOUD_DEFAULT, "--model", help="A built-in name or a local HF model folder."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require 'Authorization: Bearer KEY' (default: $FEDLM_API_KEY; none: open)."
    ),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Requests decoded together in one batch."),
    weights: Weights = typer.Option(
        Weights.float32, "--weights", help="Weights as served; logprobs are float32 either way."
    ),
    max_body_bytes: int = typer.Option(
        Limits.max_body_bytes, "--max-body-bytes", min=1, help="Larger request bodies get a 413."
    ),
    max_tokens_limit: int = typer.Option(
        Limits.max_tokens, "--max-tokens-limit", min=1, help="The most tokens one request may ask to generate."
    ),
    max_pending: int = typer.Option(
        Limits.max_pending, "--max-pending", min=1, help="Requests in hand at once; more get a 503 with Retry-After."
    ),
) -> None:
    """Serve MODEL at http://HOST:PORT/v1 (models, completions, chat/completions) and /health."""
    from fedlm.cloud.engine import Engine
    from fedlm.cloud.service import serve as run_service
    from fedlm.models import load_weights

    key = api_key if api_key is not None else os.environ.get("FEDLM_API_KEY")
    console = Console(stderr=True)
    warn_if_open(console, host, key)
    loaded = load_weights(model, weights.value)
    console.print(
        f"[bold]fedlm cloud[/] serving {model!r} with {weights.value} weights on http://{host}:{port}/v1 "
        f"(loaded in {loaded.load_seconds:.1f}s)"
    )
    limits = Limits(max_body_bytes, max_tokens_limit, max_pending)
    run_service(Engine(loaded, max_batch=max_batch), host, port, key, limits)


@app.command()
def probe(
    cloud: str = typer.Option(..., "--cloud", help="Server base URL, e.g. http://127.0.0.1:8000/v1"),
    model: str | None = typer.Option(None, "--model"),
    api_key: str | None = ApiKey,
    as_json: bool = Json,
) -> None:
    """Report what an OpenAI-compatible server supports: chat, logprobs (how many), bytes, echo scoring."""
    from fedlm.cloud.client import CloudClient

    with (
        egress_gate(None) as gate,
        CloudClient(cloud, api_key_or_env(api_key), model, retries=0, egress=gate) as client,
    ):
        caps = client.probe()
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(caps)))
        return
    console = Console()
    for name, value in dataclasses.asdict(caps).items():
        console.print(f"{name:>20}: {value}")
