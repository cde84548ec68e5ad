"""`fedlm demo`: the default models answering one question edge-only, cloud-only over HTTP, and fused."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from fedlm.cli.generate import provenance_line, source_legend
from fedlm.cli.options import egress_gate
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT, LoadedModel

QUESTION = "What is the capital of France?"


def demo_command(
    question: str = typer.Option(QUESTION, "--question"),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    lookahead: int = typer.Option(4, "--lookahead", min=1),
) -> None:
    """Answer QUESTION three ways: the edge model alone, the cloud model alone over HTTP, and the two fused."""
    from fedlm.cloud.client import CloudClient, Traffic
    from fedlm.cloud.engine import Engine
    from fedlm.cloud.service import background_service
    from fedlm.fusion.decoder import FusionConfig, fuse_once
    from fedlm.fusion.rules import make_rule
    from fedlm.models import load
    from fedlm.models.cache import COMPLETE_MARKER, cached_model_dir
    from fedlm.models.registry import BUILTIN

    console = Console()
    cached = {
        name: (cached_model_dir(BUILTIN[name]) / COMPLETE_MARKER).exists() for name in (EDGE_DEFAULT, CLOUD_DEFAULT)
    }
    edge, cloud = load(EDGE_DEFAULT), load(CLOUD_DEFAULT)
    table = Table(title=f"fedlm demo: {question!r}")
    for column in ("mode", "tokens", "first token ms", "tokens/s", "cloud calls", "bytes sent / received"):
        table.add_column(column)
    config = FusionConfig(max_tokens=max_tokens, lookahead=lookahead)
    warm = FusionConfig(max_tokens=4, lookahead=lookahead)  # each mode runs once untimed, so none is timed cold

    fuse_once(edge, make_rule("none"), question, warm)
    alone = fuse_once(edge, make_rule("none"), question, config)
    console.print(f"[bold]edge only[/] ({EDGE_DEFAULT}, in process): {alone.text.strip()}")
    table.add_row(
        "edge only", str(len(alone.tokens)), f"{alone.ttft_ms:.0f}", f"{alone.tokens_per_s:.1f}", "0", "0 / 0"
    )

    with egress_gate(None) as gate, background_service(Engine(cloud)) as url:
        with CloudClient(url, egress=gate) as client:
            client.chat([{"role": "user", "content": question}], max_tokens=4, temperature=0)
            client.traffic = Traffic()  # count the timed answer only
            start, first, tokens, text = time.perf_counter(), None, 0, ""
            for chunk in client.stream_chat(
                [{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0, logprobs=True
            ):
                for choice in chunk.get("choices", []):
                    content = (choice.get("logprobs") or {}).get("content") or []
                    if content and first is None:
                        first = time.perf_counter()
                    tokens += len(content)
                    text += choice["delta"].get("content") or ""
            seconds = time.perf_counter() - start
            traffic = client.traffic
        console.print(f"[bold]cloud only[/] ({CLOUD_DEFAULT}, over HTTP): {text.strip()}")
        ttft = ((first or time.perf_counter()) - start) * 1000
        table.add_row(
            "cloud only",
            str(tokens),
            f"{ttft:.0f}",
            f"{tokens / seconds:.1f}",
            str(traffic.requests),
            f"{traffic.bytes_sent} / {traffic.bytes_received}",
        )
        fuse_once(edge, make_rule("router"), question, warm, url, egress=gate)
        together = fuse_once(edge, make_rule("router"), question, config, url, egress=gate)
    console.print(f"[bold]fused[/] (router, lookahead {lookahead}, cloud read by {together.cloud_protocol}): ", end="")
    console.print(provenance_line(together))
    console.print(source_legend())
    table.add_row(
        f"fused (router, lookahead {lookahead}, {together.cloud_protocol})",
        str(len(together.tokens)),
        f"{together.ttft_ms:.0f}",
        f"{together.tokens_per_s:.1f}",
        str(together.cloud_calls),
        f"{together.bytes_sent} / {together.bytes_received}",
    )
    console.print(table)
    loads = ", ".join(
        f"{m.name} {m.load_seconds:.1f} s ({'cached' if cached[m.name] else 'converted now'})" for m in (edge, cloud)
    )
    console.print(f"load times: {loads}")
    _kv_demo(console, edge, cloud)


def _kv_demo(console: Console, edge: LoadedModel, cloud: LoadedModel) -> None:
    """C2C on one held-out which-play question, when a fuser for the pair has been trained (`fedlm kv train`)."""
    from fedlm.data.plays import play_questions
    from fedlm.eval.kv_scorer import KVScorer
    from fedlm.eval.mcq import mcq_pairs
    from fedlm.kvcomm.fuser import is_trained, trained_fuser_dir
    from fedlm.kvcomm.receiver import KVReceiver
    from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters

    folder = trained_fuser_dir(edge.name, cloud.name)
    if not is_trained(folder):
        console.print(
            "[bold]KV communication[/]: no trained fuser yet; `fedlm kv train` (about 45 minutes on 2 CPU cores) "
            "makes one, and the demo then shows the receiver with and without Gemma's cache."
        )
        return
    row = play_questions(1)[0]
    pairs = mcq_pairs(row)
    alone = KVScorer(KVReceiver(edge, [])).score(pairs)
    with (
        egress_gate(None) as gate,
        serve_transmitters(edge, [TransmitterSpec(cloud, folder)], "int8", gate) as (transmitters, clients),
    ):
        fused = KVScorer(KVReceiver(edge, transmitters), {cloud.name: True}).score(pairs)
        received = clients[0].traffic.bytes_received
    pick = {name: row.choices[max(range(len(s)), key=s.__getitem__)] for name, s in (("alone", alone), ("c2c", fused))}
    console.print(f"[bold]KV communication[/] (held-out question; right answer: {row.choices[row.answer]})")
    console.print(
        f"  receiver alone picks {pick['alone']!r}; with Gemma's int8 cache ({received:,} bytes) {pick['c2c']!r}"
    )
