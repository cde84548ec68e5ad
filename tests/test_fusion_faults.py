"""Fault injection for fusion: a cloud that is slow, answers 500s, answers garbage or a shape it should not, gives
fewer candidates than asked, or drops the connection in the middle of its reply. Whatever it does, the user gets
a whole answer from the edge, with the fault counted as fallbacks or named in a warning, and never an exception.

The cloud here is a raw asyncio HTTP server on loopback, so that it can misbehave below HTTP too."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fedlm.cloud.client import AsyncCloudClient
from fedlm.fusion.decoder import FusedDecoder, FusionConfig, FusionResult
from fedlm.fusion.rules import make_rule
from fedlm.models import LoadedModel

PROMPT = "The capital of France"
MODELS = json.dumps({"object": "list", "data": [{"id": "faulty", "object": "model"}]}).encode()


def _reply(fault: str, request: dict) -> bytes:
    """The bytes the faulty cloud writes back for one completion request."""
    if fault == "500":
        body = json.dumps({"error": {"message": "overloaded", "type": "server_error"}}).encode()
        return _http(500, body)
    if fault == "garbage":
        return _http(200, b"<html>this is not json</html>")
    if fault == "wrong-shape":
        return _http(200, json.dumps({"choices": "none", "logprobs": 7}).encode())
    if fault == "drop":  # a status line and half a body, then the connection closes
        return b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"choices": [{"te'
    if fault == "fewer":  # one candidate where twenty were asked: a valid, poorer reading
        top = [{"token": " Paris", "logprob": -0.1, "bytes": list(b" Paris"), "top_logprobs": []}]
        entry = {**top[0], "top_logprobs": top}
        choice = {"index": 0, "text": " Paris", "logprobs": {"content": [entry]}, "finish_reason": "length"}
        return _http(200, json.dumps({"id": "x", "choices": [choice]}).encode())
    raise ValueError(fault)


def _http(status: int, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@contextmanager
def faulty_cloud(fault: str, delay_s: float = 0.0) -> Iterator[tuple[str, dict]]:
    """Serve /v1/models properly and every completion with `fault`, on a free loopback port, in a thread."""
    seen = {"completions": 0}
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length) if length else b""
                if b"/v1/models" in head.split(b"\r\n")[0]:
                    writer.write(_http(200, MODELS))
                else:
                    seen["completions"] += 1
                    await asyncio.sleep(delay_s)
                    writer.write(_reply(fault, json.loads(body or b"{}")))
                    if fault == "drop":
                        await writer.drain()
                        writer.close()
                        return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        box["port"], box["stop"] = server.sockets[0].getsockname()[1], asyncio.Event()
        started.set()
        await box["stop"].wait()
        server.close()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:  # connections kept alive, waiting for a next request that will not come
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield f"http://127.0.0.1:{box['port']}/v1", seen
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(timeout=5)


def _fuse(edge: LoadedModel, url: str | None, **config: object) -> FusionResult:
    async def run() -> FusionResult:
        if url is None:
            return await FusedDecoder(edge, make_rule("none"), None, FusionConfig(max_tokens=12)).generate(PROMPT)
        async with AsyncCloudClient(url, retries=0, timeout=5) as cloud:
            decoder = FusedDecoder(edge, make_rule("router"), cloud, FusionConfig(max_tokens=12, **config))
            return await decoder.generate(PROMPT)

    return asyncio.run(run())


@pytest.mark.parametrize("lookahead", [1, 4])
@pytest.mark.parametrize("fault", ["500", "garbage", "wrong-shape", "drop"])
def test_a_failing_cloud_leaves_a_whole_answer_from_the_edge_and_a_warning(
    tiny_llama: LoadedModel, fault: str, lookahead: int
) -> None:
    alone = _fuse(tiny_llama, None)
    with faulty_cloud(fault) as (url, seen):
        result = _fuse(tiny_llama, url, lookahead=lookahead, protocol="echo" if lookahead > 1 else "ahead")
    assert [t.token_id for t in result.tokens] == [t.token_id for t in alone.tokens]
    assert {t.source for t in result.tokens} == {"edge"}
    assert result.warnings and "edge alone" in result.warnings[0], result.warnings
    assert seen["completions"] >= 1 and result.cloud_calls == seen["completions"]  # dropped after it failed


@pytest.mark.parametrize("lookahead", [1, 4])
def test_a_slow_cloud_costs_fallbacks_not_the_answer(tiny_llama: LoadedModel, lookahead: int) -> None:
    alone = _fuse(tiny_llama, None)
    with faulty_cloud("fewer", delay_s=0.3) as (url, _):
        result = _fuse(tiny_llama, url, lookahead=lookahead, deadline_ms=50, protocol="ahead")
    assert [t.token_id for t in result.tokens] == [t.token_id for t in alone.tokens]
    assert result.fallbacks > 0 and not result.warnings


def test_fewer_candidates_than_asked_are_still_a_reading(tiny_llama: LoadedModel) -> None:
    with faulty_cloud("fewer") as (url, _):
        result = _fuse(tiny_llama, url, lookahead=1, protocol="ahead")
    assert len(result.tokens) == 12 and not result.warnings and result.fallbacks == 0
    assert all(t.source != "edge" for t in result.tokens)  # one candidate is still the cloud's word
