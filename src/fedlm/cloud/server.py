"""The OpenAI-compatible HTTP service: FastAPI routes that translate protocol models to engine calls."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedlm.cloud import protocol as p
from fedlm.cloud.engine import Completion, ContextLengthError, Engine, SamplingParams, TokenLogprob
from fedlm.models.token_bytes import token_starts

DEFAULT_CHAT_MAX_TOKENS = 256


class APIError(Exception):
    """An error the client caused or must know about, sent as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.body = (
            status,
            p.ErrorResponse(error=p.ErrorDetail(message=message, type=type_, param=param, code=code)),
        )


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(p.dump(APIError(status, message, type_, param, code).body), status_code=status)


def openai_app(title: str, api_key: str | None = None) -> FastAPI:
    """A FastAPI app that speaks OpenAI's conventions: bearer auth on `/v1/*`, and every error (a bad key, a bad
    field, an `APIError` raised by a route) as an OpenAI error body with the status it deserves, never a 5xx for
    the client's mistake. The cloud service and the KV transmitter both start from it."""
    app = FastAPI(title=title, version="1")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
                return _error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code="invalid_api_key",
                )
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(p.dump(err.body), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(
            err.status_code, str(err.detail), "invalid_request_error" if err.status_code < 500 else "server_error"
        )

    return app


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = openai_app("fedlm cloud", api_key)

    def check_model(name: str) -> None:
        if name != engine.name:
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {engine.name!r} (see /v1/models)",
                param="model",
                code="model_not_found",
            )

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

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest) -> Any:
        check_model(body.model)
        ids = engine.encode_prompt(body.prompt)
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
            return _sse(_completion_chunks(engine, ids, params, body.prompt))
        result = await engine.complete(ids, params)
        text = (body.prompt if body.echo else "") + result.text
        logprobs = None
        if body.logprobs is not None:
            logprobs, _ = _completion_logprobs(result.prompt + result.tokens, body.logprobs, text)
        choice = p.CompletionChoice(text=text, logprobs=logprobs, finish_reason=result.finish_reason)
        return p.dump(p.CompletionResponse(model=engine.name, choices=[choice], usage=_usage(result)))

    @app.post("/v1/chat/completions")
    async def chat(body: p.ChatCompletionRequest) -> Any:
        check_model(body.model)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = SamplingParams(
            body.token_budget(DEFAULT_CHAT_MAX_TOKENS),
            body.temperature,
            body.top_p,
            body.seed,
            tuple(body.stop or ()) + engine.chat_stop,
            top,
        )
        ids = engine.encode_chat(
            [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        )
        check_length(ids, params, "messages")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_chunks(engine, ids, params, include_usage))
        result = await engine.complete(ids, params)
        logprobs = p.ChoiceLogprobs(content=[_chat_logprob(t) for t in result.tokens]) if body.logprobs else None
        choice = p.ChatChoice(
            message=p.AssistantMessage(content=result.text), logprobs=logprobs, finish_reason=result.finish_reason
        )
        return p.dump(p.ChatCompletionResponse(model=engine.name, choices=[choice], usage=_usage(result)))

    return app


def _usage(result: Completion) -> p.Usage:
    return p.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.tokens),
        total_tokens=result.prompt_tokens + len(result.tokens),
    )


def _completion_logprobs(
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


def _chat_logprob(position: TokenLogprob) -> p.ChatTokenLogprob:
    token = position.token
    top = [p.TopLogprob(token=c.text, logprob=c.logprob, bytes=list(c.raw)) for c in position.top]
    return p.ChatTokenLogprob(token=token.text, logprob=token.logprob, bytes=list(token.raw), top_logprobs=top)


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
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
            p.ChoiceLogprobs(content=[_chat_logprob(t) for t in event.tokens])
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
            logprobs, offset = _completion_logprobs(positions, params.top_logprobs, emitted, offset)
        choice = p.CompletionChoice(text=text, logprobs=logprobs, finish_reason=event.finish_reason)
        yield p.dump(p.CompletionResponse(id=chunk_id, created=created, model=engine.name, choices=[choice]))
