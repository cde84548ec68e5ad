"""A client for any OpenAI-compatible server: ours, vLLM, llama.cpp's server, or a hosted API.

It finds out what the server supports (`probe`), since many servers return no logprobs, fewer than asked, or no
prompt logprobs at all, and callers must degrade rather than crash. Every request body passes through one
`EgressHook` before it leaves, so a privacy gate sees, and may change or block, each byte that is sent; without
one, `AuditOnly` sends it unchanged and audits it.

Built as the official `openai` client is: `ClientCore` holds the configuration, builds every request and reads
every reply, with each operation written once as a generator that yields what to send (`Attempt`) or how long to
wait (`Pause`) and receives what came back. `CloudClient` and `AsyncCloudClient` only drive those generators
with blocking or async I/O, so retries, the probe and the readers behave the same in both.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

import httpx

from fedlm.cloud.errors import CloudError, CloudUnavailable
from fedlm.cloud.logprobs import Scored, read_scored, read_tokens
from fedlm.cloud.readers import CloudProtocol, protocol_of
from fedlm.egress import AuditOnly, EgressHook

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
T = TypeVar("T")


def default_api_key() -> str | None:
    return os.environ.get("FEDLM_API_KEY") or os.environ.get("OPENAI_API_KEY")


@dataclass
class Traffic:
    """Bytes of request and response bodies, counted as they cross the wire."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class Capabilities:
    """What a server was seen to support. Zero means "not supported"."""

    base_url: str
    models: list[str] = field(default_factory=list)
    chat: bool = False
    chat_logprobs: bool = False
    chat_top_logprobs: int = 0
    token_bytes: bool = False
    completions: bool = False
    completion_logprobs: int = 0
    echo: bool = False
    logprob_start: bool = False  # echo scores only the tail asked for (fedlm's `logprob_start_char` extension)
    protocol: CloudProtocol = "none"  # how fusion will read it (`fedlm.cloud.readers`)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Attempt:
    """One HTTP request to make."""

    method: str
    url: str
    content: bytes | None
    headers: dict[str, str]


@dataclass(frozen=True)
class Pause:
    """Wait this long before the next attempt."""

    seconds: float


Outcome = httpx.Response | httpx.TransportError | None
Exchange = Generator[Attempt | Pause, Outcome, T]  # an operation, written once for both senders


def error_from(url: str, response: httpx.Response) -> CloudError:
    try:
        error = response.json().get("error") or {}
        message, code = error.get("message") or response.text, error.get("code")
    except (ValueError, AttributeError):
        message, code = response.text[:500], None
    cls = CloudUnavailable if response.status_code in RETRY_STATUS else CloudError
    return cls(f"{url} answered {response.status_code}: {message}", response.status_code, code)


def unreachable(url: str, err: Exception) -> CloudUnavailable:
    kind = "timed out" if isinstance(err, httpx.TimeoutException) else "could not be reached"
    return CloudUnavailable(f"{url} {kind} ({type(err).__name__}: {err}). Is the server running, and is the URL right?")


class StreamEnd(Exception):
    """The server sent `data: [DONE]`."""


def sse_event(line: str) -> dict[str, Any] | None:
    """The JSON event on one server-sent-events line, None for any other line; `[DONE]` raises `StreamEnd`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        raise StreamEnd
    return json.loads(data)


class ClientCore:
    """Configuration, request builders and reply readers, with no I/O of its own.

    `model=None` uses the first model the server lists."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.25,
        egress: EgressHook | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"cloud URL must start with http:// or https://, got {base_url!r}")
        self.api_key = api_key if api_key is not None else default_api_key()
        self.model = model
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.egress: EgressHook = egress or AuditOnly()
        self.traffic = Traffic()
        self.cloud_protocol: CloudProtocol | None = None  # found on first need, then kept
        self.logprob_start = False  # the server scores only the tail asked for (`logprob_start_char`), once found
        self._http = self._connect()

    def _connect(self) -> httpx.Client | httpx.AsyncClient:
        raise NotImplementedError("a sender opens its own connection pool")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _outbound(self, path: str, body: dict[str, Any]) -> bytes:
        return self.egress.outbound(self.base_url + path, body)

    def _sent(self, content: bytes | None) -> None:
        self.traffic.requests += 1
        self.traffic.bytes_sent += len(content or b"")

    def _exchange(self, method: str, path: str, body: dict[str, Any] | None = None) -> Exchange[httpx.Response]:
        """Send once through the egress hook, retrying transport failures and transient statuses with backoff;
        return the last response, successful or not."""
        content = self._outbound(path, body) if body is not None else None
        for attempt in range(self.retries + 1):
            outcome = yield Attempt(method, self.base_url + path, content, self._headers())
            retry = attempt < self.retries
            if isinstance(outcome, httpx.TransportError):
                if not retry:
                    raise unreachable(self.base_url + path, outcome) from outcome
            else:
                assert outcome is not None
                self._sent(content)
                if outcome.is_success or not retry or outcome.status_code not in RETRY_STATUS:
                    return outcome
            yield Pause(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Exchange[dict[str, Any]]:
        """The reply's JSON as the device should read it (through the egress hook), or the server's error."""
        response = yield from self._exchange(method, path, body)
        self.traffic.bytes_received += response.num_bytes_downloaded
        if not response.is_success:
            raise error_from(self.base_url + path, response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise CloudError(
                f"{self.base_url + path} answered {response.status_code} with no JSON object: {response.text[:200]!r}"
            )
        return self.egress.inbound(self.base_url + path, body)

    def _models(self) -> Exchange[list[str]]:
        reply = yield from self._json("GET", "/models")
        return [m["id"] for m in reply.get("data", [])]

    def _resolve_model(self) -> Exchange[str]:
        if self.model is None:
            names = yield from self._models()
            if not names:
                raise CloudError(f"{self.base_url}/models lists no model; pass one explicitly")
            self.model = names[0]
        return self.model

    def _complete(self, prompt: str, fields: dict[str, Any]) -> Exchange[dict[str, Any]]:
        model = yield from self._resolve_model()
        return (yield from self._json("POST", "/completions", {"model": model, "prompt": prompt, **fields}))

    def _chat(self, messages: list[dict[str, Any]], fields: dict[str, Any]) -> Exchange[dict[str, Any]]:
        model = yield from self._resolve_model()
        return (yield from self._json("POST", "/chat/completions", {"model": model, "messages": messages, **fields}))

    def _score(self, context: str, target: str) -> Exchange[Scored]:
        """Log-probabilities of `target` after `context`, from the server's prompt logprobs (`echo`)."""
        reply = yield from self._complete(
            context + target, {"max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
        )
        return read_scored(reply, context, target)

    def _probe(self) -> Exchange[Capabilities]:
        """Try each feature once with a tiny request and record what came back."""
        caps = Capabilities(self.base_url)
        try:
            caps.models = yield from self._models()
        except CloudError as err:
            caps.notes.append(f"/models: {err}")
        self.model = self.model or (caps.models[0] if caps.models else None)
        if self.model is None:
            caps.notes.append("no model known: pass --model")
            return caps
        messages = [{"role": "user", "content": "Say hi."}]
        try:
            reply = yield from self._chat(
                messages, {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20}
            )
            caps.chat = True
            content = ((reply["choices"][0].get("logprobs") or {}).get("content")) or []
            caps.chat_logprobs = bool(content)
            caps.chat_top_logprobs = len(content[0].get("top_logprobs") or []) if content else 0
            caps.token_bytes = bool(content) and content[0].get("bytes") is not None
        except CloudError as err:
            caps.notes.append(f"chat with logprobs: {err}")
            try:
                yield from self._chat(messages, {"max_tokens": 1})
                caps.chat = True
            except CloudError as err2:
                caps.notes.append(f"chat: {err2}")
        for k in (20, 5, 1):
            try:
                reply = yield from self._complete("Hello there", {"max_tokens": 1, "temperature": 0, "logprobs": k})
            except CloudError as err:
                caps.notes.append(f"completions logprobs={k}: {err}")
                continue
            caps.completions = True
            tokens = read_tokens(reply)
            caps.completion_logprobs = len(tokens[-1].top) if tokens else 0
            break
        try:
            scored = yield from self._score("Hello", " there")
            caps.echo = scored.target_logprob <= 0
        except CloudError as err:
            caps.notes.append(f"echo scoring: {err}")
        caps.protocol = yield from self._protocol()
        caps.logprob_start = self.logprob_start
        return caps

    def _protocol(self) -> Exchange[CloudProtocol]:
        """How fusion can read this server (`echo`, `ahead` or `none`), found with one tiny request and kept."""
        if self.cloud_protocol is None:
            prompt, fields = "Hello there, friend", {"max_tokens": 1, "logprobs": 1, "temperature": 0}
            tail = {**fields, "echo": True, "logprob_start_char": len(prompt) - 1}  # fedlm's extension: the tail only
            # some servers refuse an unknown field, others `echo` itself; no completions with logprobs: perhaps chat
            reply: dict[str, Any] = {}
            for attempt in (tail, {**fields, "echo": True}, fields):
                try:
                    reply = yield from self._complete(prompt, attempt)
                except CloudUnavailable:
                    raise
                except CloudError:
                    continue
                # a server that honours the extension leaves the tokens before the tail unscored
                self.logprob_start = attempt is tail and any(t.logprob is None for t in read_tokens(reply)[1:])
                break
            self.cloud_protocol = protocol_of(reply)
            if self.cloud_protocol == "none":
                self.cloud_protocol = yield from self._chat_protocol()
        return self.cloud_protocol

    def _chat_protocol(self) -> Exchange[CloudProtocol]:
        """`chat` if chat completions give logprobs on what they generate, else `none`."""
        fields = {"max_tokens": 1, "logprobs": True, "top_logprobs": 1, "temperature": 0}
        try:
            reply = yield from self._chat([{"role": "user", "content": "Say hi."}], fields)
        except CloudUnavailable:
            raise
        except CloudError:
            return "none"
        return "chat" if any(t.logprob is not None for t in read_tokens(reply)) else "none"

    def _stream_body(self, messages: list[dict[str, Any]], fields: dict[str, Any]) -> Exchange[bytes]:
        model = yield from self._resolve_model()
        return self._outbound("/chat/completions", {"model": model, "messages": messages, "stream": True, **fields})

    def _stream_event(self, line: str) -> dict[str, Any] | None:
        event = sse_event(line)
        return None if event is None else self.egress.inbound(self.base_url + "/chat/completions", event)


class CloudClient(ClientCore):
    """Synchronous client of a cloud model: completions, chat, streaming, scoring and a capability probe."""

    _http: httpx.Client

    def _connect(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self, exchange: Exchange[T]) -> T:
        """Drive an operation with blocking I/O."""
        outcome: Outcome = None
        try:
            while True:
                step = exchange.send(outcome)
                if isinstance(step, Pause):
                    time.sleep(step.seconds)
                    outcome = None
                    continue
                try:
                    outcome = self._http.request(step.method, step.url, content=step.content, headers=step.headers)
                except httpx.TransportError as err:
                    outcome = err
        except StopIteration as done:
            return done.value

    def models(self) -> list[str]:
        return self._run(self._models())

    def resolve_model(self) -> str:
        return self._run(self._resolve_model())

    def complete(self, prompt: str, **fields: Any) -> dict[str, Any]:
        return self._run(self._complete(prompt, fields))

    def chat(self, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return self._run(self._chat(messages, fields))

    def score(self, context: str, target: str) -> Scored:
        return self._run(self._score(context, target))

    def probe(self) -> Capabilities:
        return self._run(self._probe())

    def protocol(self) -> CloudProtocol:
        return self._run(self._protocol())

    def stream_chat(self, messages: list[dict[str, Any]], **fields: Any) -> Iterator[dict[str, Any]]:
        """Chat chunks as they arrive, up to `[DONE]`."""
        content = self._run(self._stream_body(messages, fields))
        url = self.base_url + "/chat/completions"
        try:
            with self._http.stream("POST", url, content=content, headers=self._headers()) as response:
                self._sent(content)
                if not response.is_success:
                    response.read()
                    raise error_from(url, response)
                try:
                    for line in response.iter_lines():
                        if (event := self._stream_event(line)) is not None:
                            yield event
                except StreamEnd:
                    return
                finally:
                    self.traffic.bytes_received += response.num_bytes_downloaded
        except httpx.TransportError as err:
            raise unreachable(url, err) from err


class AsyncCloudClient(ClientCore):
    """Asynchronous client for the real-time paths, with the same operations as `CloudClient`."""

    _http: httpx.AsyncClient

    def _connect(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _run(self, exchange: Exchange[T]) -> T:
        """Drive an operation with async I/O."""
        outcome: Outcome = None
        try:
            while True:
                step = exchange.send(outcome)
                if isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                    outcome = None
                    continue
                try:
                    outcome = await self._http.request(
                        step.method, step.url, content=step.content, headers=step.headers
                    )
                except httpx.TransportError as err:
                    outcome = err
        except StopIteration as done:
            return done.value

    async def models(self) -> list[str]:
        return await self._run(self._models())

    async def resolve_model(self) -> str:
        return await self._run(self._resolve_model())

    async def complete(self, prompt: str, **fields: Any) -> dict[str, Any]:
        return await self._run(self._complete(prompt, fields))

    async def chat(self, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return await self._run(self._chat(messages, fields))

    async def score(self, context: str, target: str) -> Scored:
        return await self._run(self._score(context, target))

    async def probe(self) -> Capabilities:
        return await self._run(self._probe())

    async def protocol(self) -> CloudProtocol:
        return await self._run(self._protocol())

    async def stream_chat(self, messages: list[dict[str, Any]], **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """Chat chunks as they arrive, up to `[DONE]`."""
        content = await self._run(self._stream_body(messages, fields))
        url = self.base_url + "/chat/completions"
        try:
            async with self._http.stream("POST", url, content=content, headers=self._headers()) as response:
                self._sent(content)
                if not response.is_success:
                    await response.aread()
                    raise error_from(url, response)
                try:
                    async for line in response.aiter_lines():
                        if (event := self._stream_event(line)) is not None:
                            yield event
                except StreamEnd:
                    return
                finally:
                    self.traffic.bytes_received += response.num_bytes_downloaded
        except httpx.TransportError as err:
            raise unreachable(url, err) from err
