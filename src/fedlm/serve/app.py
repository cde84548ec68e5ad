"""The device's OpenAI-compatible endpoint: chat and completions answered by the edge model fused, token by token,
with the upstream cloud, every cloud request through the privacy gate.

Routes, protocol models and serving are kept apart as in the cloud service: the request and response models are
the cloud service's own (`cloud/protocol.py`), and so are its error bodies, auth, body limit and admission
(`openai_app`, `Admission`). Each answer carries a `fedlm` extension object (`serve/provenance.py`) that standard
clients ignore.

One generation runs at a time, by design: the edge model is one set of weights on a device's CPU, and two
generations side by side would only share its cores. Requests beyond it wait their turn, up to `max_pending` in
hand. A streamed chat answer goes out token by token as fusion decides it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from fedlm.cloud import protocol as p
from fedlm.cloud.client import AsyncCloudClient
from fedlm.cloud.server import STREAMED, Admission, APIError, Limits, Ticket, bounded, openai_app, require_model
from fedlm.fusion.decoder import FusedDecoder, FusedToken, FusionConfig, FusionResult
from fedlm.fusion.rules import FusionRule
from fedlm.models import LoadedModel
from fedlm.models.chat import chat_stops
from fedlm.models.token_bytes import complete_prefix_len
from fedlm.privacy import EgressGate
from fedlm.serve.provenance import provenance

MODEL_NAME = "fedlm-fused"


class GatewayCompletionRequest(p.SamplingFields):
    """A completion as the endpoint serves it so far: no echo, logprobs or stream, so the schema offers none."""

    prompt: p.NonEmptyText
    max_tokens: p.Count = 16
    stream: Literal[False] = False


@dataclass
class Gateway:
    """What answers: the edge (with its adapter, if any), the rule, the cloud and the gate every request leaves by."""

    edge: LoadedModel
    rule: FusionRule
    config: FusionConfig
    cloud_url: str | None
    gate: EgressGate
    adapter: str | None = None
    cloud_model: str | None = None
    cloud_api_key: str | None = None


def create_gateway_app(gateway: Gateway, api_key: str | None = None, limits: Limits = Limits()) -> FastAPI:
    app = openai_app("fedlm serve", api_key, limits.max_body_bytes)
    completion_request = bounded(GatewayCompletionRequest, limits.max_tokens)
    chat_request = bounded(p.ChatCompletionRequest, limits.max_tokens)
    admission = Admission(limits.max_pending, limits.retry_after_s)
    # one generation at a time (see the module's docstring), and one cloud client kept across requests: both belong
    # to the event loop that serves (a server has one; a test transport may run each request on a loop of its own)
    per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[asyncio.Lock, AsyncCloudClient | None]]
    per_loop = weakref.WeakKeyDictionary()
    max_model_len = int(getattr(gateway.edge.model.config, "max_position_embeddings", 2048))
    live = not chat_stops(gateway.edge.tokenizer)  # a turn that ends at a stop string is streamed when complete

    async def fused(
        prompt: str,
        history: list[dict[str, str]],
        max_tokens: int,
        on_token: Callable[[FusedToken], None] | None = None,
    ) -> FusionResult:
        config = dataclasses.replace(gateway.config, max_tokens=max_tokens)
        loop = asyncio.get_running_loop()
        if loop not in per_loop:
            cloud = None
            if gateway.cloud_url is not None:
                cloud = AsyncCloudClient(
                    gateway.cloud_url, gateway.cloud_api_key, gateway.cloud_model, egress=gateway.gate
                )
            per_loop[loop] = (asyncio.Lock(), cloud)
        turn, cloud = per_loop[loop]
        async with turn:
            decoder = FusedDecoder(gateway.edge, gateway.rule, cloud, config)
            return await decoder.generate(prompt, history, on_token)

    def extension(result: FusionResult) -> dict[str, Any]:
        return provenance(result, gateway.gate.policy.value, gateway.adapter).model_dump()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": MODEL_NAME}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return p.dump(p.ModelList(data=[p.ModelCard(id=MODEL_NAME, max_model_len=max_model_len)]))

    async def chat(body: p.ChatCompletionRequest) -> Any:
        require_model(body.model, MODEL_NAME, "endpoint")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise APIError(
                400,
                "the last message must be the user's: it is the turn answered",
                param="messages",
                code="last_message_not_user",
            )
        budget = body.token_budget(gateway.config.max_tokens)
        if body.stream:
            with admission.held() as ticket:
                tokens: asyncio.Queue[FusedToken | None] = asyncio.Queue()
                work = fused(messages[-1]["content"], messages[:-1], budget, tokens.put_nowait)
                return _chat_stream(ticket, asyncio.ensure_future(work), tokens, budget, extension, live)
        with admission.held():
            result = await fused(messages[-1]["content"], messages[:-1], budget)
        usage = _usage(result)
        finish = "length" if len(result.tokens) >= budget else "stop"
        choice = p.ChatChoice(message=p.AssistantMessage(content=result.text), finish_reason=finish)
        reply = p.dump(p.ChatCompletionResponse(model=MODEL_NAME, choices=[choice], usage=usage))
        return {**reply, "fedlm": extension(result)}

    async def completions(body: GatewayCompletionRequest) -> Any:
        require_model(body.model, MODEL_NAME, "endpoint")
        with admission.held():
            result = await fused(body.prompt, [], body.max_tokens)
        finish = "length" if len(result.tokens) >= body.max_tokens else "stop"
        choice = p.CompletionChoice(text=result.text, finish_reason=finish)
        reply = p.dump(p.CompletionResponse(model=MODEL_NAME, choices=[choice], usage=_usage(result)))
        return {**reply, "fedlm": extension(result)}

    chat.__annotations__["body"], completions.__annotations__["body"] = chat_request, completion_request
    app.post("/v1/chat/completions", responses=STREAMED)(chat)
    app.post("/v1/completions")(completions)
    return app


def _usage(result: FusionResult) -> p.Usage:
    total = result.prompt_tokens + len(result.tokens)
    return p.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.tokens), total_tokens=total)


def _chat_stream(
    ticket: Ticket,
    work: asyncio.Future[FusionResult],
    tokens: asyncio.Queue[FusedToken | None],
    budget: int,
    extension: Callable[[FusionResult], dict[str, Any]],
    live: bool,
) -> StreamingResponse:
    """The answer as chat chunks while it is decided, then the finish with the provenance, then `[DONE]`. Text is
    sent once its characters are whole; with `live` off (an edge without a chat template, whose turn ends at a stop
    string that is trimmed afterwards) it is sent at the end. A client that hangs up cancels the generation."""
    chunk_id, created = p.new_id("chatcmpl"), int(time.time())
    work.add_done_callback(lambda _: tokens.put_nowait(None))

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
        body = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL_NAME,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

    async def events() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        pending, sent = b"", 0  # bytes not sent yet (a character still incomplete), and characters sent
        try:
            while (token := await tokens.get()) is not None:
                pending += token.raw
                ready = complete_prefix_len(pending)
                if live and ready:
                    text, pending = pending[:ready].decode("utf-8", "replace"), pending[ready:]
                    yield chunk({"content": text})
                    sent += len(text)
            result = await work
        finally:
            work.cancel()  # a no-op once done; a client that left stops the generation here
        if len(result.text) > sent:
            yield chunk({"content": result.text[sent:]})
        finish = "length" if len(result.tokens) >= budget else "stop"
        yield chunk({}, finish, fedlm=extension(result))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        ticket.carried(events()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
