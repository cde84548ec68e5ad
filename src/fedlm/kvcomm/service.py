"""The transmitter service: a client sends text and receives that text's KV cache as a wire blob.

It has the cloud service's shape (`fedlm.cloud.server`): bearer auth on `/v1/*`, OpenAI-style error bodies, a 400
naming the field for any bad request, never a 5xx for the client's mistake. The model's forward pass runs in a
worker thread, one request at a time, so the event loop keeps answering `/health` while a long text is read.

`/v1/kv/probe` answers before any cache is sent: how many tokens the text is and how sure the model is of its next
token, so that a receiver can weigh which transmitters know something (`kvcomm.select`). The cache read for a probe
is kept for a moment, and the request for it that follows costs no second prefill.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
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
    KVPayload,
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
RECENT_TOKENS = 1024  # of the texts just read, kept for a follow-up request: about 47 MB of SmolLM2's cache
BLOB_MEDIA_TYPE = "application/octet-stream"
BLOB_SCHEMA = {"type": "string", "format": "binary"}


class KVProbeRequest(p.Strict):
    """`POST /v1/kv/probe`: the text a receiver may ask this transmitter's cache of."""

    model: str
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class KVProbe(p.Strict):
    """What a receiver weighs before asking for a cache: its length, and how sure this model is of what comes next
    (exp(-entropy): 1 when sure, 1/8 when spread evenly over eight answers)."""

    object: str = "kv.probe"
    model: str
    tokens: int
    certainty: float


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
    recent: OrderedDict[str, KVPayload] = OrderedDict()  # texts just read: a probe, then that text's cache

    def captured(text: str) -> KVPayload:
        """The cache of `text`, read once: a receiver probes a text and then often asks for its cache."""
        with forward_lock:
            payload = recent.pop(text, None) or capture(model, text, fingerprint)
            recent[text] = payload
            while sum(kept.seq_len for kept in recent.values()) > RECENT_TOKENS and len(recent) > 1:
                recent.popitem(last=False)
        return payload

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model.name, "fingerprint": fingerprint}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return p.dump(p.ModelList(data=[p.ModelCard(id=model.name, max_model_len=max_tokens)]))

    def read(body: KVRequest) -> bytes:
        return encode(captured(body.text), body.format, body.layers, max_bytes)

    async def counted(text: str) -> int:
        """The text's token count, refused with a 400 past what the model reads (tokenised off the event loop)."""
        encoded = await asyncio.to_thread(model.tokenizer, text, add_special_tokens=True)
        tokens = len(encoded["input_ids"])
        if tokens > max_tokens:
            raise APIError(
                400,
                f"the text is {tokens} tokens; this model reads at most {max_tokens}",
                param="text",
                code="context_length_exceeded",
            )
        return tokens

    # the schema states this model's layers, so a client (and a fuzzer) knows which may be asked for
    layer = Annotated[int, Field(ge=0, le=num_layers - 1), BeforeValidator(p.whole_number)]
    served = create_model(
        "KVRequest", __base__=KVRequest, layers=(list[layer] | None, Field(default=None, min_length=1))
    )

    async def kv(body: KVRequest) -> Response:
        require_model(body.model, model.name, "transmitter")
        tokens = await counted(body.text)
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

    @app.post("/v1/kv/probe")
    async def probe(body: KVProbeRequest) -> KVProbe:
        """How sure this model is of the text's next token; the cache it read is kept for the request that follows."""
        require_model(body.model, model.name, "transmitter")
        await counted(body.text)
        payload = await asyncio.to_thread(captured, body.text)
        return KVProbe(model=model.name, tokens=payload.seq_len, certainty=payload.certainty or 0.0)

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
