"""`fedlm kv`: serve a model's KV caches, make a KV blob, and look inside one."""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedlm import atomic
from fedlm.cli.options import Json, egress_gate, warn_if_open
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT

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

    key = api_key if api_key is not None else os.environ.get("FEDLM_API_KEY")
    console = Console(stderr=True)
    warn_if_open(console, host, key)
    loaded = load(model)
    console.print(
        f"[bold]fedlm kv[/] transmitting {model!r} on http://{host}:{port}/v1/kv (loaded in {loaded.load_seconds:.1f}s)"
    )
    run_service(loaded, host, port, key)


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
    atomic.write_bytes(out, blob)  # a reader never sees half a blob
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


class TrainData(StrEnum):
    plays = "plays"
    gsm8k = "gsm8k"


@app.command()
def train(
    receiver: str = typer.Option(EDGE_DEFAULT, "--receiver", help="The model whose cache is fused into."),
    transmitter: str = typer.Option(
        CLOUD_DEFAULT, "--transmitter", help="The model whose cache is sent: MODEL, or MODEL+ADAPTER_DIR (merged)."
    ),
    data: TrainData = typer.Option(
        TrainData.plays,
        "--data",
        help="plays: which-play questions (train split) with their answers; gsm8k: questions with worked answers.",
    ),
    train_rows: int = typer.Option(1200, "--train-rows", min=1, help="Training pairs."),
    heldout_rows: int = typer.Option(40, "--heldout-rows", min=0, help="Held-out pairs for the learning curve."),
    steps: int = typer.Option(300, "--steps", min=1),
    accumulate: int = typer.Option(4, "--accumulate", min=1, help="Pairs per optimizer step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0),
    hidden: int = typer.Option(256, "--hidden", min=1, help="Width of each projector's MLP."),
    align: str = typer.Option("last", "--align", help="Layer alignment: last or depth."),
    transmitter_layers: str | None = typer.Option(
        None,
        "--transmitter-layers",
        help="Transmitter layers the fuser reads, e.g. 9-17 (default: all); only these then cross the wire.",
    ),
    eval_every: int = typer.Option(25, "--eval-every", min=1),
    device: str = typer.Option("cpu", "--device", help="Torch device for both models and the fuser, e.g. cuda."),
    out: Path | None = typer.Option(
        None, "--out", help="Fuser folder (default: <cache>/fusers/RECEIVER--TRANSMITTER--DATA)."
    ),
) -> None:
    """Train a C2C cache fuser for RECEIVER <- TRANSMITTER (both frozen) and save it with its learning curve."""
    from fedlm.data.plays import play_questions
    from fedlm.eval.mcq import answer_pair
    from fedlm.kvcomm.fuser import trained_fuser_dir
    from fedlm.kvcomm.train import FuserTrainConfig, PairSetupError, gsm8k_pairs, train_pair
    from fedlm.models import load
    from fedlm.models.loader import load_spec

    if align not in ("last", "depth"):
        raise typer.BadParameter(f"expected last or depth, got {align!r}", param_hint="--align")
    keep = parse_layers(transmitter_layers)
    r = load(receiver)
    try:
        t = load_spec(transmitter)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--transmitter") from err
    if data is TrainData.plays:
        rows = play_questions(train_rows + heldout_rows, "train")
        pairs = [answer_pair(row) for row in rows]
    else:
        pairs = gsm8k_pairs(r, train_rows + heldout_rows)
    train_pairs, heldout_pairs = pairs[:train_rows], pairs[train_rows:]
    # Keeping prefills in memory (tens of KB per token) pays only when training comes back to an example.
    reused = steps * accumulate > len(train_pairs)
    schedule = FuserTrainConfig(steps=steps, accumulate=accumulate, lr=lr, eval_every=eval_every, cache_prefills=reused)
    console = Console(stderr=True)

    def log_step(step: int, loss: float) -> None:  # a progress bar needs a terminal; a log file gets lines
        if not console.is_terminal and (step % eval_every == 0 or step == steps):
            console.print(f"step {step}/{steps}: training loss {loss:.4f}")

    try:
        fuser, curve = train_pair(
            r,
            t,
            train_pairs,
            heldout_pairs,
            schedule,
            data=data.value,
            align=align,  # type: ignore[arg-type]
            hidden=hidden,
            transmitter_layers=keep,
            device=device,
            on_step=log_step,
        )
    except PairSetupError as err:
        raise typer.BadParameter(str(err), param_hint=f"--{err.option.replace('_', '-')}") from err
    folder = out or trained_fuser_dir(r.name, t.name, data.value)
    fuser.save(folder)

    def shown(loss: float | None) -> str:
        return "-" if loss is None else f"{loss:.4f}"

    fused = "-"
    if curve.best_step is not None:
        fused = f"{curve.eval_loss[curve.eval_steps.index(curve.best_step)]:.4f} (step {curve.best_step})"
    console.print(
        f"[bold]fedlm kv train[/]: {steps} steps in {curve.seconds:.0f}s; held-out loss per token: receiver alone "
        f"{shown(curve.receiver_alone_loss)}, fused {fused}, fused with the transmitter's cache zeroed "
        f"{shown(curve.zeroed_transmitter_loss)}; saved {folder}"
    )


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question the receiver answers."),
    receiver: str = typer.Option(EDGE_DEFAULT, "--receiver"),
    transmitter: str = typer.Option(
        CLOUD_DEFAULT, "--transmitter", help="MODEL or MODEL+ADAPTER_DIR (merged), served on loopback for this call."
    ),
    fuser: Path | None = typer.Option(
        None, "--fuser", help="Fuser folder (default: the pair's, trained here with `fedlm kv train` or shipped)."
    ),
    fmt: Format = typer.Option(Format.int8, "--format", help="Wire format of the transmitter's cache."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    as_json: bool = Json,
) -> None:
    """Answer QUESTION with the receiver alone, then with the transmitter's KV cache fused in (C2C)."""
    import time

    from fedlm.kvcomm.fuser import FuserError
    from fedlm.kvcomm.receiver import KVReceiver
    from fedlm.kvcomm.shipped import find_fuser
    from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters
    from fedlm.models.loader import load_spec

    try:
        r, t = load_spec(receiver, quiet=True), load_spec(transmitter, quiet=True)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--transmitter") from err
    folder = fuser or find_fuser(r.name, t.name)
    ids = r.tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]
    start = time.perf_counter()
    alone = KVReceiver(r, []).generate(ids, max_tokens)
    alone_s = time.perf_counter() - start
    try:
        with (
            egress_gate(None) as gate,
            serve_transmitters(r, [TransmitterSpec(t, folder)], fmt.value, gate) as (transmitters, clients),
        ):
            start = time.perf_counter()
            fused = KVReceiver(r, transmitters).generate(ids, max_tokens, {t.name: True})
            fused_s, received = time.perf_counter() - start, clients[0].traffic.bytes_received
    except FuserError as err:
        raise typer.BadParameter(str(err), param_hint="--fuser") from err
    report = {
        "question": question,
        "fuser": str(folder),
        "receiver_alone": {"answer": alone.strip(), "seconds": round(alone_s, 3)},
        "c2c": {"answer": fused.strip(), "seconds": round(fused_s, 3), "bytes_received": received, "format": fmt.value},
    }
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
        return
    console = Console()
    console.print(f"[bold]receiver alone[/] ({alone_s:.2f}s): {alone.strip()}")
    console.print(
        f"[bold]C2C with {t.name}[/] ({fused_s:.2f}s, {received:,} bytes of {fmt.value} cache): {fused.strip()}"
    )
