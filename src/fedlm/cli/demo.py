"""`fedlm demo`: the default models answering one question edge-only, cloud-only over HTTP, and fused."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from fedlm.cli.generate import provenance_line, source_legend
from fedlm.cli.options import Weights, egress_gate
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT, LoadedModel, load

if TYPE_CHECKING:
    from fedlm.fusion.decoder import FusionResult

QUESTION = "What is the capital of France?"


def demo_command(
    question: str = typer.Option(QUESTION, "--question"),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    lookahead: int = typer.Option(1, "--lookahead", min=1, help="1: lockstep; more: the edge drafts ahead."),
    cloud_weights: Weights = typer.Option(
        Weights.int8, "--cloud-weights", help="The cloud's weights: int8 answers within one edge token here."
    ),
) -> None:
    """Answer QUESTION three ways: the edge model alone, the cloud model alone over HTTP, and the two fused."""
    from fedlm.cloud.client import CloudClient, Traffic
    from fedlm.fusion.decoder import FusionConfig, fuse_once
    from fedlm.fusion.rules import make_rule
    from fedlm.models.cache import COMPLETE_MARKER, cached_model_dir
    from fedlm.models.registry import BUILTIN

    console = Console()
    cached = (cached_model_dir(BUILTIN[EDGE_DEFAULT]) / COMPLETE_MARKER).exists()
    edge = load(EDGE_DEFAULT)
    table = Table(title=f"fedlm demo: {question!r}")
    for column in ("mode", "tokens", "first token ms", "tokens/s", "cloud calls", "bytes sent / received"):
        table.add_column(column)
    config = FusionConfig(max_tokens=max_tokens, lookahead=lookahead)
    warm = FusionConfig(max_tokens=4, lookahead=lookahead)  # each mode runs once untimed, so none is timed cold

    console.print(f"starting the cloud ({CLOUD_DEFAULT}, {cloud_weights.value} weights) ...")
    with _cloud(cloud_weights.value) as (url, where), egress_gate(None) as gate:
        fuse_once(edge, make_rule("none"), question, warm)
        alone = _median_run(lambda: fuse_once(edge, make_rule("none"), question, config))
        console.print(f"[bold]edge only[/] ({EDGE_DEFAULT}, in process): {alone.text.strip()}")
        table.add_row(
            "edge only", str(len(alone.tokens)), f"{alone.ttft_ms:.0f}", f"{alone.tokens_per_s:.1f}", "0", "0 / 0"
        )
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
        console.print(f"[bold]cloud only[/] ({CLOUD_DEFAULT}, over HTTP, {where}): {text.strip()}")
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
        together = _median_run(lambda: fuse_once(edge, make_rule("router"), question, config, url, egress=gate))
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
    cloud_ms = statistics.median(together.cloud_ms) if together.cloud_ms else float("nan")
    console.print(
        f"fused speed {together.tokens_per_s / alone.tokens_per_s:.2f}x edge-only; the cloud answered in "
        f"{cloud_ms:.0f} ms a request ({cloud_ms * alone.tokens_per_s / 1000:.2f} edge tokens), on {where}"
    )
    console.print(f"load time: {EDGE_DEFAULT} {edge.load_seconds:.1f} s ({'cached' if cached else 'converted now'})")
    _kv_demo(console, edge)


def _median_run(run: Callable[[], FusionResult], times: int = 3) -> FusionResult:
    """The run of median speed out of `times`: a short answer is timed in a fraction of a second, where one
    scheduling hiccup would decide the comparison."""
    results = sorted((run() for _ in range(times)), key=lambda result: result.tokens_per_s)
    return results[len(results) // 2]


@contextmanager
def _cloud(weights: str) -> Iterator[tuple[str, str]]:
    """The default cloud model served with `weights`, on a core of its own as a remote cloud would be (this process
    keeps the others), or in this process on a machine with one core. Yields (base URL, where it runs)."""
    from fedlm.bench.placement import separate_cores

    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
        with separate_cores(CLOUD_DEFAULT, weights=weights) as placed:
            yield placed["url"], f"a core of its own (core {placed['cloud_cores'][0]})"
        return
    from fedlm.cloud.engine import Engine
    from fedlm.cloud.service import background_service
    from fedlm.models import load_weights

    with background_service(Engine(load_weights(CLOUD_DEFAULT, weights))) as url:
        yield url, "this process (one core: it shares it with the edge)"


def _kv_demo(console: Console, edge: LoadedModel) -> None:
    """KV communication: a device that knows what the receiver does not, read through the pair's fuser."""
    from fedlm.bench.kv_devices import one_device

    shown = one_device(edge, progress=lambda line: console.print(f"[bold]KV communication[/]: {line}"))
    made = shown["manifest"]
    source = f"shipped, trained {made['trained_at']} by `{made['command']}`" if made else "trained on this machine"
    asked = next(iter(shown["modes"].values()))["n"]
    table = Table(title=f"KV communication: {asked} questions that only the device can answer (chance 0.125)")
    for column in ("mode", "accuracy", "latency p50 ms", "bytes / question"):
        table.add_column(column)
    for name, m in shown["modes"].items():
        table.add_row(
            name, f"{m['accuracy']:.2f}", f"{m['latency_p50_s'] * 1000:.0f}", f"{m['bytes_per_question']:,.0f}"
        )
    console.print(table)
    example = shown["example"]
    console.print(f"{example['question']} (right: {example['answer']}): " + ", ".join(
        f"{name.split(' (')[0]} → {pick}" for name, pick in example["picks"].items()
    ))  # fmt: skip
    console.print(
        f"the device recalls {shown['device_recall']:.2f} of its facts on its own; fuser: {shown['fuser']} ({source})"
    )
