"""The transmitter service: a client sends text and receives that text's KV cache as a wire blob.

It has the cloud service's shape (`fedlm.cloud.server`): bearer auth on `/v1/*`, OpenAI-style error bodies, a 400
naming the field for any bad request, never a 5xx for the client's mistake. The model's forward pass runs in a
worker thread, one request at a time, so the event loop keeps answering `/health` while a long text is read.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BeforeValidator, Field, create_model

from fedlm.cloud import protocol as p
from fedlm.cloud.server import APIError, openai_app, require_model
from fedlm.cloud.service import background_app
from fedlm.kvcomm.fuser import kv_layout
from fedlm.kvcomm.wire import (
    DEFAULT_MAX_BYTES,
    KVWireError,
    WireFormat,
    capture,
    encode,
    least_bytes,
    model_fingerprint,
)
from fedlm.models.loader import LoadedModel
from fedlm.net import LOOPBACK

MAX_TEXT_CHARS = 32_000
BLOB_MEDIA_TYPE = "application/octet-stream"
BLOB_SCHEMA = {"type": "string", "format": "binary"}


class KVRequest(p.Strict):
    """`POST /v1/kv`: the text to read, the wire format, and optionally which layers to send."""

    model: str
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    format: WireFormat = "fp16"
    layers: list[Annotated[int, Field(ge=0), BeforeValidator(p.whole_number)]] | None = Field(
        default=None, min_length=1
    )


def create_transmitter_app(
    model: LoadedModel, api_key: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> FastAPI:
    """The HTTP app serving `model`'s KV caches; blobs over `max_bytes` are refused with a 400."""
    app = openai_app("fedlm kv transmitter", api_key)
    fingerprint = model_fingerprint(model)
    config = model.model.config
    max_tokens = config.max_position_embeddings
    num_layers, kv_heads, head_dim = kv_layout(model.model)
    forward_lock = threading.Lock()  # one forward at a time: the model is not re-entrant and the CPU is shared

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

    # the schema states this model's layers, so a client (and a fuzzer) knows which may be asked for
    layer = Annotated[int, Field(ge=0, le=num_layers - 1), BeforeValidator(p.whole_number)]
    served = create_model(
        "KVRequest", __base__=KVRequest, layers=(list[layer] | None, Field(default=None, min_length=1))
    )

    async def kv(body: KVRequest) -> Response:
        require_model(body.model, model.name, "transmitter")
        encoded = await asyncio.to_thread(model.tokenizer, body.text, add_special_tokens=True)  # off the loop
        tokens = len(encoded["input_ids"])
        if tokens > max_tokens:
            raise APIError(
                400,
                f"the text is {tokens} tokens; this model reads at most {max_tokens}",
                param="text",
                code="context_length_exceeded",
            )
        layers = body.layers or list(range(num_layers))
        floor = least_bytes([kv_heads] * num_layers, [head_dim] * num_layers, tokens, body.format, layers)
        if floor > max_bytes:  # refused before the prefill, which would cost minutes on a long text
            raise APIError(
                400,
                f"the blob would take at least {floor:,} bytes, over this transmitter's {max_bytes:,}-byte limit: "
                "send fewer tokens or layers, or a smaller format (int8, int4)",
                param="text",
                code="kv_too_large",
            )
        try:
            blob = await asyncio.to_thread(read, body)
        except KVWireError as err:
            raise APIError(400, str(err), param="text", code="kv_too_large") from err
        return Response(blob, media_type=BLOB_MEDIA_TYPE)

    kv.__annotations__["body"] = served
    app.post("/v1/kv", responses={200: {"content": {BLOB_MEDIA_TYPE: {"schema": BLOB_SCHEMA}}}})(kv)
    return app


def serve(model: LoadedModel, host: str = LOOPBACK, port: int = 8100, api_key: str | None = None) -> None:
    uvicorn.run(create_transmitter_app(model, api_key), host=host, port=port, log_level="warning")


@contextmanager
def background_transmitter(
    model: LoadedModel, api_key: str | None = None, startup_timeout_s: float = 30.0
) -> Iterator[str]:
    """Serve `model`'s KV caches on a free 127.0.0.1 port until the block exits; yields the base URL (`.../v1`).

    For tests and demos: a transmitter in-process still goes through real HTTP, auth and the privacy gate."""
    with background_app(create_transmitter_app(model, api_key), "the KV transmitter", startup_timeout_s) as url:
        yield url
