"""The cloud client, sync and async alike, against our service and against servers that lack features or fail.

Every test runs on both senders (`connect`), since they share one core and must behave the same."""

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from fedlm.cloud.client import AsyncCloudClient, CloudClient, CloudError, CloudUnavailable
from fedlm.net import LOOPBACK


@contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Run any ASGI app on a free loopback port (for fake servers)."""
    import socket

    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    try:
        yield f"http://{LOOPBACK}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(5)


class Blocking:
    """An `AsyncCloudClient` whose calls block on one event loop, so a test body reads the same for both senders."""

    def __init__(self, client: AsyncCloudClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.client, name)
        if name == "stream_chat":
            return lambda *args, **kwargs: iter(self.loop.run_until_complete(_collect(attr(*args, **kwargs))))
        if callable(attr):
            return lambda *args, **kwargs: self.loop.run_until_complete(attr(*args, **kwargs))
        return attr

    def __enter__(self) -> "Blocking":
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.run_until_complete(self.client.aclose())


async def _collect(chunks: AsyncIterator[dict]) -> list[dict]:
    return [chunk async for chunk in chunks]


Connect = Callable[..., CloudClient]


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Open a client with the given arguments: a `CloudClient`, or an `AsyncCloudClient` behind `Blocking`."""
    if request.param == "sync":
        yield CloudClient
        return
    loop = asyncio.new_event_loop()

    def open_async(*args: object, **kwargs: object) -> CloudClient:
        return Blocking(AsyncCloudClient(*args, **kwargs), loop)  # type: ignore[return-value]

    yield open_async
    loop.close()


def test_probe_reports_what_our_service_supports(connect: Connect, tiny_url: str) -> None:
    with connect(tiny_url) as client:
        caps = client.probe()
    assert caps.models == ["tiny-llama"]
    assert caps.chat and caps.chat_logprobs and caps.token_bytes and caps.completions and caps.echo
    assert caps.chat_top_logprobs == 20 and caps.completion_logprobs == 20
    assert caps.logprob_start  # it scores only the tail a client asks for
    assert caps.notes == []


def test_score_splits_context_and_target_at_the_boundary(connect: Connect, tiny_url: str) -> None:
    with connect(tiny_url) as client:
        scored = client.score("The capital of France is", " Paris.")
        assert "".join(t.text for t in scored.target_tokens) == " Paris."
        assert scored.target_logprob == pytest.approx(sum(t.logprob for t in scored.target_tokens))
        assert client.traffic.requests == 2 and client.traffic.bytes_sent > 0 and client.traffic.bytes_received > 0


def test_async_and_sync_clients_score_alike(tiny_url: str) -> None:
    async def run() -> float:
        async with AsyncCloudClient(tiny_url) as client:
            return (await client.score("Once upon", " a time")).target_logprob

    with CloudClient(tiny_url) as client:
        assert asyncio.run(run()) == pytest.approx(client.score("Once upon", " a time").target_logprob, abs=1e-6)


def test_streaming_chat_through_the_client(connect: Connect, tiny_url: str) -> None:
    with connect(tiny_url) as client:
        chunks = list(client.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0))
        whole = client.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]


def test_a_stream_ends_at_done(connect: Connect) -> None:
    app = FastAPI()
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    after_done = "data: this is not JSON and must never be read"

    @app.post("/v1/chat/completions")
    def stream() -> PlainTextResponse:
        events = [f"data: {json.dumps(chunk)}", "data: [DONE]", after_done]
        return PlainTextResponse("\n\n".join(events) + "\n\n", media_type="text/event-stream")

    with serve_app(app) as url, connect(url, model="m") as client:
        assert list(client.stream_chat([{"role": "user", "content": "Hi"}])) == [chunk]
        assert client.traffic.requests == 1


def test_server_without_logprobs_is_detected_and_scoring_fails_clearly(connect: Connect) -> None:
    app = FastAPI()
    reply = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "text": "hi", "finish_reason": "stop"}
        ]
    }

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "opaque", "object": "model"}]}

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    def complete() -> dict:
        return reply

    with serve_app(app) as url, connect(url) as client:
        caps = client.probe()
        assert caps.chat and not caps.chat_logprobs and caps.chat_top_logprobs == 0
        assert caps.completions and caps.completion_logprobs == 0 and not caps.echo
        with pytest.raises(CloudError, match="no prompt logprobs"):
            client.score("a", "b")


def test_retries_transient_failures_then_succeeds(connect: Connect) -> None:
    app, calls = FastAPI(), {"n": 0}

    @app.get("/v1/models")
    def flaky() -> JSONResponse:
        calls["n"] += 1
        if calls["n"] < 3:
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        return JSONResponse({"data": [{"id": "m"}]})

    with serve_app(app) as url:
        assert connect(url, retries=2, backoff_s=0.01).models() == ["m"]
        calls["n"] = 0
        with pytest.raises(CloudUnavailable, match="503: overloaded"):
            connect(url, retries=1, backoff_s=0.01).models()


def test_client_errors_are_not_retried(connect: Connect, tiny_url: str) -> None:
    with connect(tiny_url, model="nope", retries=3) as client:
        with pytest.raises(CloudError, match="404") as err:
            client.complete("x")
        assert err.value.code == "model_not_found"
        assert client.traffic.requests == 1


def test_unreachable_server_and_timeouts_give_clear_errors(connect: Connect) -> None:
    import socket

    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    with pytest.raises(CloudUnavailable, match="could not be reached"):
        connect(f"http://{LOOPBACK}:{port}/v1", retries=1, backoff_s=0.01).models()
    with pytest.raises(ValueError, match="http://"):
        connect("127.0.0.1:8000")

    app = FastAPI()

    @app.get("/v1/models")
    async def slow() -> dict:
        await asyncio.sleep(2)
        return {"data": []}

    with serve_app(app) as url, pytest.raises(CloudUnavailable, match="timed out"):
        connect(url, timeout=0.2, retries=0).models()


def test_egress_hook_sees_every_request_body(connect: Connect, tiny_url: str) -> None:
    seen: list[bytes] = []

    class Recorder:
        def outbound(self, destination: str, body: dict) -> bytes:
            data = httpx.Request("POST", destination, json=body).content
            seen.append(data)
            return data

        def inbound(self, destination: str, body: dict) -> dict:
            return body

    with connect(tiny_url, model="tiny-llama", egress=Recorder()) as client:
        client.complete("secret prompt", max_tokens=1)
        client.chat([{"role": "user", "content": "another"}], max_tokens=1)
        assert sum(len(b) for b in seen) == client.traffic.bytes_sent
    assert b"secret prompt" in seen[0] and b"another" in seen[1]


def test_every_request_is_audited_by_default(
    connect: Connect, tiny_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("FEDLM_AUDIT_LOG", str(log))
    with connect(tiny_url, model="tiny-llama") as client:
        client.complete("an ordinary prompt", max_tokens=1)
        client.chat([{"role": "user", "content": "hello"}], max_tokens=1)
        sent = client.traffic.bytes_sent
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["policy"] for r in records] == ["off", "off"]
    assert sum(r["bytes"] for r in records) == sent and all(r["destination"].startswith(tiny_url) for r in records)


def test_probe_names_the_way_fusion_will_read_a_server(connect: Connect, tiny_url: str) -> None:
    """Ours echoes prompt logprobs; a llama-server-shaped one gives chat-shape logprobs on generated tokens only."""
    with connect(tiny_url) as client:
        assert client.probe().protocol == "echo"
    app = FastAPI()
    entry = {"token": " there", "logprob": -0.5, "bytes": list(b" there")}

    @app.get("/v1/models")
    def models() -> dict:
        return {"data": [{"id": "ahead"}]}

    @app.post("/v1/completions")
    def complete(body: dict) -> dict:
        top = [entry, {"token": "!", "logprob": -1.5, "bytes": [33]}][: body.get("logprobs") or 0]
        content = [{**entry, "top_logprobs": top}]
        return {
            "choices": [{"index": 0, "text": " there", "logprobs": {"content": content}, "finish_reason": "length"}]
        }

    with serve_app(app) as url, connect(url) as client:
        caps = client.probe()
    assert caps.protocol == "ahead" and not caps.echo and caps.completions and caps.completion_logprobs == 2
    assert not caps.logprob_start


def test_a_server_that_refuses_the_tail_extension_is_still_read_by_echo(connect: Connect, tiny_url: str) -> None:
    """A strict server answers an unknown field with a 400: protocol detection asks again without it."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"data": [{"id": "tiny-llama"}]}

    @app.post("/v1/completions")
    def complete(body: dict) -> Any:
        if "logprob_start_char" in body:
            return JSONResponse({"error": {"message": "unknown field"}}, status_code=400)
        return httpx.post(tiny_url + "/completions", json=body, timeout=30).json()

    with serve_app(app) as url, connect(url) as client:
        caps = client.probe()
    assert caps.protocol == "echo" and caps.echo and not caps.logprob_start
