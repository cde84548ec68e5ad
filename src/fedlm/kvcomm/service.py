"""The transmitter service: a client sends text and receives that text's KV cache as a wire blob.

It has the cloud service's shape (`fedlm.cloud.server`): bearer auth on `/v1/*`, OpenAI-style error bodies, a 400
naming the field for any bad request, never a 5xx for the client's mistake. The model's forward pass runs in a
worker thread, one request at a time, so the event loop keeps answering `/health` while a long text is read.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedlm.cloud import protocol as p
from fedlm.cloud.server import APIError
from fedlm.kvcomm.wire import DEFAULT_MAX_BYTES, KVWireError, WireFormat, capture, encode, model_fingerprint
from fedlm.models.loader import LoadedModel

LOOPBACK = "127.0.0.1"
MAX_TEXT_CHARS = 32_000
BLOB_MEDIA_TYPE = "application/octet-stream"


class KVRequest(p.Strict):
    """`POST /v1/kv`: the text to read, the wire format, and optionally which layers to send."""

    model: str
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    format: WireFormat = "fp16"
    layers: list[int] | None = Field(default=None, min_length=1)


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(p.dump(APIError(status, message, type_, param, code).body), status_code=status)


def create_transmitter_app(
    model: LoadedModel, api_key: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> FastAPI:
    """The HTTP app serving `model`'s KV caches; blobs over `max_bytes` are refused with a 400."""
    app = FastAPI(title="fedlm kv transmitter", version="1")
    fingerprint = model_fingerprint(model)
    config = model.model.config
    num_layers, max_tokens = config.num_hidden_layers, config.max_position_embeddings
    forward_lock = threading.Lock()  # one forward at a time: the model is not re-entrant and the CPU is shared

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
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(
            err.status_code, str(err.detail), "invalid_request_error" if err.status_code < 500 else "server_error"
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model.name, "fingerprint": fingerprint}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return p.dump(p.ModelList(data=[p.ModelCard(id=model.name, max_model_len=max_tokens)]))

    def read(body: KVRequest) -> bytes:
        with forward_lock:
            payload = capture(model, body.text, fingerprint)
        return encode(payload, body.format, body.layers, max_bytes)

    @app.post("/v1/kv")
    async def kv(body: KVRequest) -> Response:
        if body.model != model.name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this transmitter serves {model.name!r} (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        if body.layers is not None and any(not 0 <= layer < num_layers for layer in body.layers):
            raise APIError(400, f"layers must lie in 0..{num_layers - 1}, got {body.layers}", param="layers")
        tokens = len(model.tokenizer(body.text, add_special_tokens=True)["input_ids"])
        if tokens > max_tokens:
            raise APIError(
                400,
                f"the text is {tokens} tokens; this model reads at most {max_tokens}",
                param="text",
                code="context_length_exceeded",
            )
        try:
            blob = await asyncio.to_thread(read, body)
        except KVWireError as err:
            raise APIError(400, str(err), param="text", code="kv_too_large") from err
        return Response(blob, media_type=BLOB_MEDIA_TYPE)

    return app


def serve(model: LoadedModel, host: str = LOOPBACK, port: int = 8100, api_key: str | None = None) -> None:
    uvicorn.run(create_transmitter_app(model, api_key), host=host, port=port, log_level="warning")


@contextmanager
def background_transmitter(
    model: LoadedModel, api_key: str | None = None, startup_timeout_s: float = 30.0
) -> Iterator[str]:
    """Serve `model`'s KV caches on a free 127.0.0.1 port until the block exits; yields the base URL (`.../v1`).

    For tests and demos: a transmitter in-process still goes through real HTTP, auth and the privacy gate."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    app = create_transmitter_app(model, api_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fedlm-kv-transmitter", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the KV transmitter did not start on {LOOPBACK}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{LOOPBACK}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
