"""`fedlm kv`: serve a model's KV caches, make a KV blob, and look inside one."""

from __future__ import annotations

import json
import os
import tempfile
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedlm.cli.options import Json
from fedlm.models import CLOUD_DEFAULT

app = typer.Typer(help="KV-cache communication: transmitter service and wire blobs.", no_args_is_help=True)

DEFAULT_PORT = 8100


class Format(StrEnum):
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"


def parse_layers(value: str | None) -> list[int] | None:
    """`0,2,4` or `0-8` (inclusive) or a mix; None for all layers."""
    if value is None:
        return None
    layers: list[int] = []
    try:
        for part in value.split(","):
            first, dash, last = part.strip().partition("-")
            layers.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    except ValueError as err:
        raise typer.BadParameter(
            f"expected layer indices like 0,2,4 or 0-8, got {value!r}", param_hint="--layers"
        ) from err
    if not layers or min(layers) < 0:
        raise typer.BadParameter(f"expected non-negative layer indices, got {value!r}", param_hint="--layers")
    return sorted(set(layers))


@app.command()
def serve(
    model: str = typer.Option(CLOUD_DEFAULT, "--model", help="A built-in name or a local HF model folder."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=1, max=65535),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require 'Authorization: Bearer KEY' (default: $FEDLM_API_KEY; none: open)."
    ),
) -> None:
    """Serve MODEL's KV caches at http://HOST:PORT/v1/kv (POST text, receive a blob), /v1/models and /health."""
    from fedlm.kvcomm.service import serve as run_service
    from fedlm.models import load

    loaded = load(model)
    Console(stderr=True).print(
        f"[bold]fedlm kv[/] transmitting {model!r} on http://{host}:{port}/v1/kv (loaded in {loaded.load_seconds:.1f}s)"
    )
    run_service(loaded, host, port, api_key if api_key is not None else os.environ.get("FEDLM_API_KEY"))


@app.command()
def encode(
    text: str = typer.Option(..., "--text", help="The text whose KV cache to capture."),
    out: Path = typer.Option(..., "--out", help="Where to write the blob."),
    model: str = typer.Option(CLOUD_DEFAULT, "--model", help="A built-in name or a local HF model folder."),
    fmt: Format = typer.Option(Format.fp16, "--format", help="Wire format: fp16, int8 or int4 (per-channel scales)."),
    layers: str | None = typer.Option(None, "--layers", help="Layers to keep, e.g. 0,2,4 or 0-8 (default: all)."),
) -> None:
    """Read TEXT with MODEL in-process and write its KV cache as a blob (no service needed)."""
    from fedlm.kvcomm.wire import KVWireError, capture
    from fedlm.kvcomm.wire import encode as encode_blob
    from fedlm.models import load

    keep = parse_layers(layers)
    payload = capture(load(model, quiet=True), text)
    try:
        blob = encode_blob(payload, fmt.value, keep)
    except KVWireError as err:
        raise typer.BadParameter(str(err), param_hint="--layers" if keep else "--text") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}-", delete=False) as tmp:
        tmp.write(blob)
    os.replace(tmp.name, out)  # a reader never sees half a blob
    typer.echo(
        f"wrote {out}: {len(blob):,} bytes, {payload.seq_len} tokens, {len(blob) / payload.seq_len:,.1f} bytes/token "
        f"({fmt.value}, layers {keep or 'all'})",
        err=True,
    )


@app.command()
def inspect(
    blob: Path = typer.Argument(..., help="A KV blob file (from `fedlm kv encode` or POST /v1/kv)."),
    as_json: bool = Json,
) -> None:
    """Check BLOB (envelope, checksum, header, tensors) and show its header, layer shapes and bytes/token."""
    from fedlm.kvcomm.wire import FORMAT_VERSION, KVWireError, decode, read_header

    try:
        data = blob.read_bytes()
        header = read_header(data)
        decode(data)  # the body too: every tensor must match what the header says
    except OSError as err:
        raise typer.BadParameter(f"cannot read {blob}: {err.strerror}", param_hint="BLOB") from err
    except KVWireError as err:
        raise typer.BadParameter(f"{blob} is not a valid KV blob: {err}", param_hint="BLOB") from err
    summary = {
        "version": FORMAT_VERSION,
        "model": header.model,
        "fingerprint": header.fingerprint,
        "format": header.format,
        "source_dtype": header.source_dtype,
        "tokens": header.seq_len,
        "bytes": len(data),
        "bytes_per_token": len(data) / header.seq_len,
        "num_layers": header.num_layers,
        "layers": header.layers,
        "layout": [entry.model_dump() for entry in header.layout],
        "text": header.text,
    }
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False))
        return
    console = Console()
    for name in ("version", "model", "fingerprint", "format", "source_dtype", "tokens", "bytes"):
        console.print(f"{name:>16}: {summary[name]}")
    console.print(f"{'bytes/token':>16}: {summary['bytes_per_token']:,.1f}")
    console.print(f"{'text':>16}: {header.text[:120]!r}{'…' if len(header.text) > 120 else ''}")
    table = Table("layer", "present", "shape (kv_heads, seq, head_dim)", "sliding window")
    for index, entry in enumerate(header.layout):
        table.add_row(
            str(index),
            "yes" if index in header.layers else "-",
            f"({entry.kv_heads}, {header.seq_len}, {entry.head_dim})",
            str(entry.sliding_window or "-"),
        )
    console.print(table)
