"""`fedlm demo`: both default models, converted and loaded, answering a question edge-side and over HTTP."""

from __future__ import annotations

import asyncio
import time

import typer
from rich.console import Console
from rich.table import Table

from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT

QUESTION = "What is the capital of France?"


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
    rows = []
    for name, where in ((EDGE_DEFAULT, "edge, in process"), (CLOUD_DEFAULT, "cloud, over HTTP")):
        was_cached = (cached_model_dir(BUILTIN[name]) / COMPLETE_MARKER).exists()
        loaded = load(name)
        engine = Engine(loaded)
        start = time.perf_counter()
        if name == EDGE_DEFAULT:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=engine.chat_stop)
            result = asyncio.run(engine.complete(engine.encode_chat(messages), params))
            answer, tokens = result.text, len(result.tokens)
        else:
            with background_service(engine) as url, CloudClient(url) as client:
                start = time.perf_counter()
                reply = client.chat(messages, max_tokens=max_tokens, temperature=0)
                answer, tokens = reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]
        seconds = time.perf_counter() - start
        console.print(f"[bold]{name}[/] ({where}): {answer.strip()}")
        load_kind = "cached" if was_cached else "converted"
        rows.append((name, where, f"{loaded.load_seconds:.1f} s ({load_kind})", str(tokens), f"{tokens / seconds:.1f}"))
    table = Table(title=f"fedlm demo: {question!r}")
    for column in ("model", "path", "load", "tokens", "tokens/s"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
