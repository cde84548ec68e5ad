"""The co-decoding loop on tiny models over real loopback HTTP: identity, deadline, a cloud that dies."""

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from fedlm.bench.scorers import FusedScorer, LocalScorer
from fedlm.cloud.client import AsyncCloudClient
from fedlm.cloud.engine import Engine
from fedlm.cloud.server import create_app
from fedlm.fusion.decoder import FusedDecoder, FusionConfig
from fedlm.fusion.rules import make_rule
from fedlm.models import LoadedModel

RULES = ["linear", "router", "proxy", "route"]


def _same_prompt_as_edge(edge: LoadedModel) -> str:
    """The cloud prefix that makes the cloud see exactly the edge's prompt."""
    return edge.tokenizer.apply_chat_template(
        [{"role": "user", "content": "{prompt}"}], tokenize=False, add_generation_prompt=True
    )


async def _generate(edge: LoadedModel, url: str | None, rule: str, **config: object) -> object:
    cloud = AsyncCloudClient(url, retries=0) if url else None
    try:
        decoder = FusedDecoder(edge, make_rule(rule), cloud, FusionConfig(**config))
        return await decoder.generate("The capital of France")
    finally:
        if cloud:
            await cloud.aclose()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lookahead", [1, 4])
def test_fusing_a_model_with_itself_changes_nothing(
    tiny_llama: LoadedModel, tiny_url: str, rule: str, lookahead: int
) -> None:
    prefix = _same_prompt_as_edge(tiny_llama)
    alone = asyncio.run(_generate(tiny_llama, None, "none", max_tokens=16))
    fused = asyncio.run(_generate(tiny_llama, tiny_url, rule, max_tokens=16, lookahead=lookahead, cloud_prefix=prefix))
    assert [t.token_id for t in fused.tokens] == [t.token_id for t in alone.tokens]
    assert fused.cloud_calls >= 16 // lookahead and "fused" in {t.source for t in fused.tokens}
    assert fused.bytes_sent > 0 and fused.bytes_received > 0 and fused.fallbacks == 0


def test_text_is_exactly_the_chosen_tokens(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    with _serve(Engine(tiny_gemma)) as (url, _):
        result = asyncio.run(_generate(tiny_llama, url, "router", max_tokens=24, lookahead=3))
    table = FusedDecoder(tiny_llama, make_rule("none"), None).token_bytes
    assert b"".join(table[t.token_id] for t in result.tokens) == b"".join(t.raw for t in result.tokens)
    assert result.text == b"".join(t.raw for t in result.tokens).decode("utf-8", "replace")
    assert len(result.tokens) == 24


def test_a_late_cloud_leaves_the_edge_tokens_standing(tiny_llama: LoadedModel, tiny_url: str) -> None:
    alone = asyncio.run(_generate(tiny_llama, None, "none", max_tokens=8))
    start = time.perf_counter()
    late = asyncio.run(
        _generate(tiny_llama, tiny_url, "router", max_tokens=8, lookahead=2, deadline_ms=20, simulate_rtt_ms=200)
    )
    elapsed = time.perf_counter() - start
    assert [t.token_id for t in late.tokens] == [t.token_id for t in alone.tokens]
    assert {t.source for t in late.tokens} == {"edge"} and late.fallbacks == 8 and late.cloud_calls == 4
    assert elapsed < 4 * 0.2  # each round waited for its deadline, never for the full simulated round trip


def test_generation_finishes_on_the_edge_when_the_cloud_dies(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    with _serve(Engine(tiny_gemma), die_after=3) as (url, served):
        result = asyncio.run(_generate(tiny_llama, url, "router", max_tokens=20))
    assert 3 <= served["requests"] < 20  # it answered for a while, then went away mid-generation
    assert len(result.tokens) == 20
    assert result.warnings and "edge alone" in result.warnings[0] and result.fallbacks == 1
    assert result.tokens[-1].source == "edge" and any(t.source != "edge" for t in result.tokens)
    assert result.cloud_calls == served["requests"]  # once the cloud failed it was never asked again


@pytest.mark.parametrize("rule", RULES)
def test_fused_scoring_of_a_model_with_itself_equals_the_edge(
    tiny_llama: LoadedModel, tiny_url: str, rule: str
) -> None:
    pairs = [("The capital of France is", " Paris."), ("Question: What is two plus two?\nAnswer:", " four")]
    fused = FusedScorer(tiny_llama, make_rule(rule), tiny_url)
    assert fused.score(pairs) == pytest.approx(LocalScorer(tiny_llama).score(pairs), abs=1e-4)
    assert fused.fused_tokens == fused.target_tokens > 0


class _serve:
    """Serve an engine on loopback; with `die_after`, the server shuts down after that many requests."""

    def __init__(self, engine: Engine, die_after: int | None = None) -> None:
        self.engine, self.die_after, self.counts = engine, die_after, {"requests": 0}

    def __enter__(self) -> tuple[str, dict]:
        app = create_app(self.engine)
        counts, die_after = self.counts, self.die_after

        @app.middleware("http")
        async def count(request, call_next):
            counts["requests"] += 1
            response = await call_next(request)
            if die_after is not None and counts["requests"] >= die_after:
                self.server.should_exit = True
            return response

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", counts

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)
