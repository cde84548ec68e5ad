"""`fedlm demo`: both default models, converted and loaded, answering a question edge-side and over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT

if TYPE_CHECKING:
    from fedlm.cloud.engine import Engine, SamplingParams

QUESTION = "What is the capital of France?"


class _Timer:
    """Time to first piece of text, and decode speed after it, for a stream of (text, tokens) pieces."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end = self.start
        self.tokens = 0
        self.text = ""

    def watch(self, pieces: Iterable[tuple[str, int]]) -> Iterator[str]:
        for text, tokens in pieces:
            if tokens and self.first is None:
                self.first = time.perf_counter()
            self.tokens += tokens
            self.text += text
            self.end = time.perf_counter()
            yield text

    def row(self) -> tuple[str, str, str]:
        first = self.first or self.end
        decode = (self.tokens - 1) / (self.end - first) if self.tokens > 1 and self.end > first else 0.0
        return str(self.tokens), f"{(first - self.start) * 1000:.0f}", f"{decode:.1f}"


def demo_command(
    question: str = typer.Option(QUESTION, "--question"),
    max_tokens: int = typer.Option(48, "--max-tokens", min=1),
) -> None:
    """Answer QUESTION with the edge model in process and with the cloud model through the embedded HTTP service."""
    from fedlm.cloud.client import CloudClient
    from fedlm.cloud.engine import Engine, SamplingParams
    from fedlm.cloud.service import background_service
    from fedlm.models import load
    from fedlm.models.cache import COMPLETE_MARKER, cached_model_dir
    from fedlm.models.registry import BUILTIN

    console = Console()
    messages = [{"role": "user", "content": question}]
    table = Table(title=f"fedlm demo: {question!r}")
    for column in ("model", "path", "load", "tokens", "first token ms", "decode tokens/s"):
        table.add_column(column)
    for name, where in ((EDGE_DEFAULT, "edge, in process"), (CLOUD_DEFAULT, "cloud, over HTTP")):
        was_cached = (cached_model_dir(BUILTIN[name]) / COMPLETE_MARKER).exists()
        loaded = load(name)
        engine = Engine(loaded)
        console.print(f"[bold]{name}[/] ({where}): ", end="")
        timer = _Timer()
        if name == EDGE_DEFAULT:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=engine.chat_stop)
            for text in timer.watch(_edge_pieces(engine, engine.encode_chat(messages), params)):
                console.print(text, end="", markup=False, highlight=False)
        else:
            with background_service(engine) as url, CloudClient(url) as client:
                timer = _Timer()
                chunks = client.stream_chat(messages, max_tokens=max_tokens, temperature=0, logprobs=True)
                for text in timer.watch(_cloud_pieces(chunks)):
                    console.print(text, end="", markup=False, highlight=False)
        console.print()
        load_kind = "cached" if was_cached else "converted now"
        table.add_row(name, where, f"{loaded.load_seconds:.1f} s ({load_kind})", *timer.row())
    console.print(table)


def _edge_pieces(engine: Engine, ids: list[int], params: SamplingParams) -> Iterator[tuple[str, int]]:
    """Drive the in-process engine's async stream from synchronous code, one event at a time."""
    loop = asyncio.new_event_loop()
    stream = engine.stream(ids, params)
    try:
        while True:
            try:
                event = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            yield event.text, len(event.tokens)
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def _cloud_pieces(chunks: Iterable[dict]) -> Iterator[tuple[str, int]]:
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            content = (choice.get("logprobs") or {}).get("content") or []
            yield choice["delta"].get("content") or "", len(content)
