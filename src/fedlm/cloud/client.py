"""A client for any OpenAI-compatible server: ours, vLLM, llama.cpp's server, or a hosted API.

It finds out what the server supports (`probe`), since many servers return no logprobs, fewer than asked, or no
prompt logprobs at all, and callers must degrade rather than crash. Every request body passes through one
`EgressHook` before it leaves, so a privacy gate sees, and may change or block, each byte that is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import httpx

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class CloudError(RuntimeError):
    """A request failed; the message says what the server said or why it could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class CloudUnavailable(CloudError):
    """The server could not be reached, timed out, or kept failing after the retries."""


class EgressRefused(CloudError):
    """The egress hook kept a request on the device (a privacy policy): nothing was sent."""


class EgressHook(Protocol):
    """The one place where request bodies become bytes on the wire (see `fedlm.privacy`).

    `outbound` may raise `EgressRefused` to keep a request on the device."""

    def outbound(self, destination: str, body: dict[str, Any]) -> bytes: ...

    def inbound(self, destination: str, body: dict[str, Any]) -> dict[str, Any]: ...


def configured_egress() -> EgressHook:
    """The privacy gate under the policy in `$FEDLM_PRIVACY` (default `off`, which still audits every byte), so
    every path that talks to a cloud obeys one setting unless a caller passes its own gate."""
    from fedlm.privacy import EgressGate  # the gate's detector loads only for policies that scan

    return EgressGate(os.environ.get("FEDLM_PRIVACY") or "off")


def default_api_key() -> str | None:
    return os.environ.get("FEDLM_API_KEY") or os.environ.get("OPENAI_API_KEY")


@dataclass
class Traffic:
    """Bytes of request and response bodies, counted as they cross the wire."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class ScoredToken:
    text: str
    logprob: float | None
    start: int  # character offset in the scored text
    end: int


@dataclass(frozen=True)
class Scored:
    """Prompt log-probabilities of `context + target`, split at the boundary between them."""

    tokens: tuple[ScoredToken, ...]
    boundary: int

    @property
    def target_tokens(self) -> tuple[ScoredToken, ...]:
        """Tokens that carry any character of the target (a token straddling the boundary counts as target)."""
        return tuple(t for t in self.tokens if t.end > self.boundary)

    @property
    def target_logprob(self) -> float:
        missing = [t for t in self.target_tokens if t.logprob is None]
        if missing:
            raise CloudError("the server returned no logprob for a target token; put some context before the target")
        return sum(t.logprob for t in self.target_tokens)  # type: ignore[misc]


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
    notes: list[str] = field(default_factory=list)


def scored_from_echo(response: dict[str, Any], text: str, boundary: int) -> Scored:
    """Read an `echo` + `logprobs` completion: token spans run from each `text_offset` to the next one."""
    logprobs = response["choices"][0].get("logprobs") or {}
    tokens, values, offsets = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("text_offset")
    if not tokens or values is None or offsets is None:
        raise CloudError(
            "the server returned no prompt logprobs for echo=true; it cannot score text (see `fedlm cloud probe`)"
        )
    ends = [*offsets[1:], len(text)]
    return Scored(tuple(ScoredToken(*token) for token in zip(tokens, values, offsets, ends, strict=True)), boundary)


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str | None,
        timeout: float,
        retries: int,
        backoff_s: float,
        egress: EgressHook | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"cloud URL must start with http:// or https://, got {base_url!r}")
        self.api_key = api_key if api_key is not None else default_api_key()
        self.model = model
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.egress: EgressHook = egress or configured_egress()
        self.traffic = Traffic()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _body(self, path: str, body: dict[str, Any]) -> bytes:
        return self.egress.outbound(self.base_url + path, body)

    def _should_retry(self, attempt: int, status: int | None) -> bool:
        return attempt < self.retries and (status is None or status in RETRY_STATUS)

    def _settle(
        self, path: str, attempt: int, content: bytes | None, outcome: httpx.Response | httpx.TransportError
    ) -> httpx.Response | None:
        """After one try: the response to hand back, None to try again, or the error to raise."""
        if isinstance(outcome, httpx.TransportError):
            if not self._should_retry(attempt, None):
                raise _unreachable(self.base_url + path, outcome) from outcome
            return None
        self.traffic.requests += 1
        self.traffic.bytes_sent += len(content or b"")
        return outcome if outcome.is_success or not self._should_retry(attempt, outcome.status_code) else None

    def _result(self, path: str, response: httpx.Response) -> dict[str, Any]:
        self.traffic.bytes_received += response.num_bytes_downloaded
        if response.is_success:
            return self.egress.inbound(self.base_url + path, response.json())
        raise error_from(self.base_url + path, response)

    @staticmethod
    def _score_body(model: str, text: str) -> dict[str, Any]:
        return {"model": model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}


def error_from(url: str, response: httpx.Response) -> CloudError:
    try:
        error = response.json().get("error") or {}
        message, code = error.get("message") or response.text, error.get("code")
    except (ValueError, AttributeError):
        message, code = response.text[:500], None
    cls = CloudUnavailable if response.status_code in RETRY_STATUS else CloudError
    return cls(f"{url} answered {response.status_code}: {message}", response.status_code, code)


def _unreachable(url: str, err: Exception) -> CloudUnavailable:
    kind = "timed out" if isinstance(err, httpx.TimeoutException) else "could not be reached"
    return CloudUnavailable(f"{url} {kind} ({type(err).__name__}: {err}). Is the server running, and is the URL right?")


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


class SyncClient(_Base):
    """The synchronous plumbing shared by every client of an OpenAI-style server: one connection pool, requests
    through the egress hook with retries, the model list. `model=None` uses the first model the server lists."""

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
        super().__init__(base_url, api_key, model, timeout, retries, backoff_s, egress)
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        content = self._body(path, body) if body is not None else None
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, self.base_url + path, content=content, headers=self._headers())
            except httpx.TransportError as err:
                response = self._settle(path, attempt, content, err)
            else:
                response = self._settle(path, attempt, content, response)
            if response is not None:
                return response
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._result(path, self._send("POST", path, body))

    def models(self) -> list[str]:
        return [m["id"] for m in self._result("/models", self._send("GET", "/models")).get("data", [])]

    def resolve_model(self) -> str:
        if self.model is None:
            names = self.models()
            if not names:
                raise CloudError(f"{self.base_url}/models lists no model; pass one explicitly")
            self.model = names[0]
        return self.model


class CloudClient(SyncClient):
    """Synchronous client of a cloud model: completions, chat, streaming, scoring and a capability probe."""

    def complete(self, prompt: str, **fields: Any) -> dict[str, Any]:
        return self._post("/completions", {"model": self.resolve_model(), "prompt": prompt, **fields})

    def chat(self, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return self._post("/chat/completions", {"model": self.resolve_model(), "messages": messages, **fields})

    def stream_chat(self, messages: list[dict[str, Any]], **fields: Any) -> Iterator[dict[str, Any]]:
        path = "/chat/completions"
        content = self._body(path, {"model": self.resolve_model(), "messages": messages, "stream": True, **fields})
        try:
            with self._http.stream("POST", self.base_url + path, content=content, headers=self._headers()) as response:
                self.traffic.requests += 1
                self.traffic.bytes_sent += len(content)
                if not response.is_success:
                    response.read()
                    raise error_from(self.base_url + path, response)
                try:
                    for event in _sse_events(response.iter_lines()):
                        yield self.egress.inbound(self.base_url + path, event)
                finally:
                    self.traffic.bytes_received += response.num_bytes_downloaded
        except httpx.TransportError as err:
            raise _unreachable(self.base_url + path, err) from err

    def score(self, context: str, target: str) -> Scored:
        """Log-probabilities of `target` after `context`, from the server's prompt logprobs (`echo`)."""
        text = context + target
        return scored_from_echo(
            self._post("/completions", self._score_body(self.resolve_model(), text)), text, len(context)
        )

    def probe(self) -> Capabilities:
        """Try each feature once with a tiny request and record what came back."""
        caps = Capabilities(self.base_url)
        try:
            caps.models = self.models()
        except CloudError as err:
            caps.notes.append(f"/models: {err}")
        model = self.model or (caps.models[0] if caps.models else None)
        if model is None:
            caps.notes.append("no model known: pass --model")
            return caps
        self.model = model
        messages = [{"role": "user", "content": "Say hi."}]
        try:
            reply = self.chat(messages, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
            caps.chat = True
            content = ((reply["choices"][0].get("logprobs") or {}).get("content")) or []
            caps.chat_logprobs = bool(content)
            caps.chat_top_logprobs = len(content[0].get("top_logprobs") or []) if content else 0
            caps.token_bytes = bool(content) and content[0].get("bytes") is not None
        except CloudError as err:
            caps.notes.append(f"chat with logprobs: {err}")
            try:
                self.chat(messages, max_tokens=1)
                caps.chat = True
            except CloudError as err2:
                caps.notes.append(f"chat: {err2}")
        for k in (20, 5, 1):
            try:
                reply = self.complete("Hello there", max_tokens=1, temperature=0, logprobs=k)
            except CloudError as err:
                caps.notes.append(f"completions logprobs={k}: {err}")
                continue
            caps.completions = True
            top = ((reply["choices"][0].get("logprobs") or {}).get("top_logprobs")) or []
            caps.completion_logprobs = len(top[-1] or {}) if top else 0
            break
        try:
            scored = self.score("Hello", " there")
            caps.echo = scored.target_logprob <= 0
        except CloudError as err:
            caps.notes.append(f"echo scoring: {err}")
        return caps


class AsyncCloudClient(_Base):
    """Asynchronous client for the real-time paths, with the same behaviour as `CloudClient`."""

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
        super().__init__(base_url, api_key, model, timeout, retries, backoff_s, egress)
        self._http = httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCloudClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        content = self._body(path, body) if body is not None else None
        for attempt in range(self.retries + 1):
            try:
                outcome = await self._http.request(
                    method, self.base_url + path, content=content, headers=self._headers()
                )
            except httpx.TransportError as err:
                response = self._settle(path, attempt, content, err)
            else:
                response = self._settle(path, attempt, content, outcome)
            if response is not None:
                return response
            await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._result(path, await self._send("POST", path, body))

    async def models(self) -> list[str]:
        return [m["id"] for m in self._result("/models", await self._send("GET", "/models")).get("data", [])]

    async def resolve_model(self) -> str:
        if self.model is None:
            names = await self.models()
            if not names:
                raise CloudError(f"{self.base_url}/models lists no model; pass one explicitly")
            self.model = names[0]
        return self.model

    async def complete(self, prompt: str, **fields: Any) -> dict[str, Any]:
        return await self._post("/completions", {"model": await self.resolve_model(), "prompt": prompt, **fields})

    async def chat(self, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return await self._post(
            "/chat/completions", {"model": await self.resolve_model(), "messages": messages, **fields}
        )

    async def stream_chat(self, messages: list[dict[str, Any]], **fields: Any) -> AsyncIterator[dict[str, Any]]:
        path = "/chat/completions"
        content = self._body(
            path, {"model": await self.resolve_model(), "messages": messages, "stream": True, **fields}
        )
        try:
            async with self._http.stream(
                "POST", self.base_url + path, content=content, headers=self._headers()
            ) as response:
                self.traffic.requests += 1
                self.traffic.bytes_sent += len(content)
                if not response.is_success:
                    await response.aread()
                    raise error_from(self.base_url + path, response)
                try:
                    async for line in response.aiter_lines():
                        for event in _sse_events(iter([line])):
                            yield self.egress.inbound(self.base_url + path, event)
                finally:
                    self.traffic.bytes_received += response.num_bytes_downloaded
        except httpx.TransportError as err:
            raise _unreachable(self.base_url + path, err) from err

    async def score(self, context: str, target: str) -> Scored:
        text = context + target
        return scored_from_echo(
            await self._post("/completions", self._score_body(await self.resolve_model(), text)), text, len(context)
        )
