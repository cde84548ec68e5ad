"""The OpenAI-compatible HTTP service: FastAPI routes that translate protocol models to engine calls."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedlm.cloud import protocol as p
from fedlm.cloud.engine import Completion, ContextLengthError, Engine, SamplingParams, TokenLogprob
from fedlm.models.token_bytes import token_starts

DEFAULT_CHAT_MAX_TOKENS = 256
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
T = TypeVar("T")
ModelT = TypeVar("ModelT", bound=BaseModel)
log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client caused or must know about, sent as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.body = (
            status,
            p.ErrorResponse(error=p.ErrorDetail(message=message, type=type_, param=param, code=code)),
        )
        self.headers = headers or {}


# every error status a route may answer with, documented in the schema with the body it carries
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": p.ErrorResponse, "description": "A field is missing or invalid, or the prompt does not fit."},
    401: {"model": p.ErrorResponse, "description": "Missing or wrong API key (only when the server has one)."},
    404: {"model": p.ErrorResponse, "description": "The model is not served here."},
    413: {"model": p.ErrorResponse, "description": "The request body is over the server's limit."},
    503: {
        "model": p.ErrorResponse,
        "description": "The server is at capacity; try again after Retry-After seconds.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}},
    },
}
# with `stream: true`: server-sent events, each a JSON chunk, then `[DONE]`
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": {}}}}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a server: its body's size, and how many tokens it may generate."""

    max_body_bytes: int = 4 * 2**20
    max_tokens: int = 4096
    max_pending: int = 64  # requests admitted at once (decoding or queued); more get a 503 with Retry-After
    retry_after_s: int = 1


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(p.dump(APIError(status, message, type_, param, code).body), status_code=status)


def openai_app(title: str, api_key: str | None = None, max_body_bytes: int = Limits.max_body_bytes) -> FastAPI:
    """A FastAPI app that speaks OpenAI's conventions: bearer auth on `/v1/*`, and every error (a bad key, a bad
    field, a body over `max_body_bytes`, an `APIError` raised by a route) as an OpenAI error body with the status it
    deserves, never a 5xx for the client's mistake. The cloud service and the KV transmitter both start from it."""
    app = FastAPI(title=title, version="1", responses=ERROR_RESPONSES)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(p.dump(err.body), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'unreadable')})")
        kind = request.headers.get("content-type", "")
        if first.get("loc") == ("body",) and "json" not in kind:
            return _error(400, f"send the body as JSON with 'Content-Type: application/json' (got {kind or 'none'!r})")
        loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _type_tag(part)]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        response = _error(err.status_code, str(err.detail), kind)
        response.headers.update(err.headers or {})  # a 405 keeps its Allow header
        return response

    return app


def require_model(name: str, served: str, kind: str) -> None:
    """A 404 in OpenAI's words unless `name` is the model this `kind` of service serves."""
    if name != served:
        raise APIError(
            404,
            f"model {name!r} is not served here; this {kind} serves {served!r} (see /v1/models)",
            param="model",
            code="model_not_found",
        )


def bounded(request: type[ModelT], max_tokens: int) -> type[ModelT]:
    """`request` with its token budgets bounded by a server's limit, so that its schema states the limit and a
    request over it is invalid on its face."""
    budget = Annotated[int, Field(ge=0, le=max_tokens), BeforeValidator(p.whole_number)]
    fields: dict[str, Any] = {}
    for name in ("max_tokens", "max_completion_tokens"):
        if name in request.model_fields:
            default = request.model_fields[name].default
            fields[name] = (budget if default is not None else budget | None, default)
    return create_model(request.__name__, __base__=request, **fields)


class Admission:
    """At most `limit` requests in hand at once (decoding or queued for the engine); one more gets a 503 with
    Retry-After at once, never a place in a queue without bound. A streamed answer holds its place until the
    stream ends. Counted on the server's event loop, so no lock is needed."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit, self.retry_after_s, self.inside = limit, retry_after_s, 0

    @contextmanager
    def held(self) -> Iterator[Ticket]:
        if self.inside >= self.limit:
            raise APIError(
                503,
                f"the server is at capacity ({self.inside} requests in hand); retry in {self.retry_after_s} s",
                "server_error",
                code="overloaded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.inside += 1
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            if not ticket.handed_on:
                self.inside -= 1


class Ticket:
    """One admitted request's place; a stream takes it along and gives it back when the stream is done."""

    def __init__(self, admission: Admission) -> None:
        self.admission, self.handed_on = admission, False

    async def carried(self, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        self.handed_on = True
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.admission.inside -= 1


class BearerAuth:
    """Require `Authorization: Bearer <key>` on `/v1/*`, the key compared in constant time. Plain ASGI, so what
    passes is untouched: a route still sees its client hang up (`Request.is_disconnected`)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token, self.api_key):
                response = _error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code="invalid_api_key",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _type_tag(part: object) -> bool:
    """Whether a part of a validation error's location names a type pydantic tried (a union member such as `str`,
    `list[str]` or `function-after[...]`), not a field: the client is told the field alone."""
    return isinstance(part, str) and (not part.isidentifier() or part in {"str", "int", "float", "bool", "list"})


class BodyLimit:
    """Refuse a request body over `max_bytes` with a 413 before it is read into memory: by its Content-Length when
    it declares one, else as its chunks arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen, refused = 0, False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # answer now, and tell the app its client has gone
                    refused = True
                    await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:  # whatever the app answers after the 413 went out is dropped
                await send(message)

        await self.app(scope, counted, unless_refused)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(413, f"the request body is over this server's limit of {self.max_bytes:,} bytes")
        await response(scope, receive, send)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """`work`'s result, or a bare 499 once the client has hung up: the work is cancelled then, so a request nobody
    waits for stops decoding (the engine drops a request whose stream was cancelled)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)  # "client closed request": no one reads it


def create_app(engine: Engine, api_key: str | None = None, limits: Limits = Limits()) -> FastAPI:
    app = openai_app("fedlm cloud", api_key, limits.max_body_bytes)

    admission = Admission(limits.max_pending, limits.retry_after_s)

    def check_length(prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            engine.check_length(prompt_ids, params)
        except ContextLengthError as err:
            raise APIError(400, str(err), param=param, code="context_length_exceeded") from err

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return p.dump(p.ModelList(data=[p.ModelCard(id=engine.name, max_model_len=engine.max_model_len)]))

    # the schema states this server's generation limit, so a request over it is invalid on its face
    completion_request = bounded(p.CompletionRequest, limits.max_tokens)
    chat_request = bounded(p.ChatCompletionRequest, limits.max_tokens)

    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        require_model(body.model, engine.name, "server")
        with admission.held() as ticket:
            return await _complete(body, request, ticket)

    async def _complete(body: p.CompletionRequest, request: Request, ticket: Ticket) -> Any:
        ids = await asyncio.to_thread(engine.encode_prompt, body.prompt)  # a long prompt never stalls the loop
        start = body.logprob_start_char
        params = SamplingParams(
            body.max_tokens,
            body.temperature,
            body.top_p,
            body.seed,
            tuple(body.stop or ()),
            body.logprobs,
            body.echo,
            engine.first_token_reaching(ids, body.prompt, start) if start else 1,
        )
        check_length(ids, params, "prompt")
        if body.stream:
            return _sse(ticket.carried(_completion_chunks(engine, ids, params, body.prompt)))
        result = await _unless_disconnected(request, engine.complete(ids, params))
        if isinstance(result, Response):
            return result
        text = (body.prompt if body.echo else "") + result.text
        logprobs = None
        if body.logprobs is not None:
            logprobs, _ = completion_logprobs(result.prompt + result.tokens, body.logprobs, text)
        choice = p.CompletionChoice(text=text, logprobs=logprobs, finish_reason=result.finish_reason)
        return p.dump(p.CompletionResponse(model=engine.name, choices=[choice], usage=_usage(result)))

    async def chat(body: p.ChatCompletionRequest, request: Request) -> Any:
        require_model(body.model, engine.name, "server")
        with admission.held() as ticket:
            return await _chat(body, request, ticket)

    async def _chat(body: p.ChatCompletionRequest, request: Request, ticket: Ticket) -> Any:
        top = (body.top_logprobs or 0) if body.logprobs else None
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        ids = await asyncio.to_thread(engine.encode_chat, messages)
        # no budget given: as many tokens as fit, up to the default, as OpenAI's API does
        room = max(engine.max_model_len - len(ids), 1)
        params = SamplingParams(
            body.token_budget(min(DEFAULT_CHAT_MAX_TOKENS, room)),
            body.temperature,
            body.top_p,
            body.seed,
            tuple(body.stop or ()) + engine.chat_stop,
            top,
        )
        check_length(ids, params, "messages")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(ticket.carried(_chat_chunks(engine, ids, params, include_usage)))
        result = await _unless_disconnected(request, engine.complete(ids, params))
        if isinstance(result, Response):
            return result
        logprobs = p.ChoiceLogprobs(content=[chat_logprob(t) for t in result.tokens]) if body.logprobs else None
        choice = p.ChatChoice(
            message=p.AssistantMessage(content=result.text), logprobs=logprobs, finish_reason=result.finish_reason
        )
        return p.dump(p.ChatCompletionResponse(model=engine.name, choices=[choice], usage=_usage(result)))

    completions.__annotations__["body"], chat.__annotations__["body"] = completion_request, chat_request
    app.post("/v1/completions", responses=STREAMED)(completions)
    app.post("/v1/chat/completions", responses=STREAMED)(chat)
    return app


def _usage(result: Completion) -> p.Usage:
    return p.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.tokens),
        total_tokens=result.prompt_tokens + len(result.tokens),
    )


def completion_logprobs(
    positions: list[TokenLogprob], k: int, text: str, start_offset: int = 0
) -> tuple[p.CompletionLogprobs, int]:
    """Legacy logprobs, with `text_offset` as character offsets into the returned text; also where they end."""
    offsets, end = token_starts(((t.token.raw, t.token.text) for t in positions), text, start_offset)
    return (
        p.CompletionLogprobs(
            tokens=[t.token.text for t in positions],
            token_logprobs=[
                None if t.token.logprob != t.token.logprob else t.token.logprob for t in positions
            ],  # NaN: unscored
            top_logprobs=[
                None if t.token.logprob != t.token.logprob else {c.text: c.logprob for c in t.top[:k]}
                for t in positions
            ],
            text_offset=offsets,
        ),
        end,
    )


def chat_logprob(position: TokenLogprob) -> p.ChatTokenLogprob:
    token = position.token
    top = [p.TopLogprob(token=c.text, logprob=c.logprob, bytes=list(c.raw)) for c in position.top]
    return p.ChatTokenLogprob(token=token.text, logprob=token.logprob, bytes=list(token.raw), top_logprobs=top)


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events, ended by `[DONE]`. A failure after the 200 went out ends the stream with an error event
    (an OpenAI error body) before `[DONE]`, so a client never mistakes a cut-off answer for a whole one."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        except Exception as err:  # the 200 is sent: the error must travel in the stream
            log.exception("a stream failed midway")
            error = APIError(500, f"the answer failed midway: {type(err).__name__}: {err}", "server_error").body
            yield f"data: {json.dumps(p.dump(error), separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_chunks(
    engine: Engine, ids: list[int], params: SamplingParams, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    chunk_id, created, count = p.new_id("chatcmpl"), int(time.time()), 0

    def chunk(choice: p.ChatChunkChoice | None, usage: p.Usage | None = None) -> dict[str, Any]:
        return p.dump(
            p.ChatCompletionChunk(
                id=chunk_id, created=created, model=engine.name, choices=[choice] if choice else [], usage=usage
            )
        )

    yield chunk(p.ChatChunkChoice(delta=p.Delta(role="assistant", content="")))
    async for event in engine.stream(ids, params):
        count += len(event.tokens)
        logprobs = (
            p.ChoiceLogprobs(content=[chat_logprob(t) for t in event.tokens])
            if params.top_logprobs is not None and event.tokens
            else None
        )
        if event.text or logprobs or event.finish_reason:
            yield chunk(
                p.ChatChunkChoice(
                    delta=p.Delta(content=event.text or None), logprobs=logprobs, finish_reason=event.finish_reason
                )
            )
    if include_usage:
        yield chunk(None, p.Usage(prompt_tokens=len(ids), completion_tokens=count, total_tokens=len(ids) + count))


async def _completion_chunks(
    engine: Engine, ids: list[int], params: SamplingParams, prompt: str
) -> AsyncIterator[dict[str, Any]]:
    chunk_id, created = p.new_id("cmpl"), int(time.time())
    emitted, offset = "", 0
    async for event in engine.stream(ids, params):
        positions = list(event.prompt) + list(event.tokens)
        text = (prompt if event.prompt else "") + event.text
        emitted += text
        logprobs = None
        if params.top_logprobs is not None:
            logprobs, offset = completion_logprobs(positions, params.top_logprobs, emitted, offset)
        choice = p.CompletionChoice(text=text, logprobs=logprobs, finish_reason=event.finish_reason)
        yield p.dump(p.CompletionResponse(id=chunk_id, created=created, model=engine.name, choices=[choice]))
