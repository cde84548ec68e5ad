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
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, StreamingResponse

from fedlm.cloud import protocol as p
from fedlm.cloud.client import AsyncCloudClient
from fedlm.cloud.engine import Candidate, TokenLogprob, named_candidate
from fedlm.cloud.errors import CloudError
from fedlm.cloud.logprobs import LogprobsMissing, read_cloud_text
from fedlm.cloud.server import (
    STREAMED,
    Admission,
    APIError,
    Limits,
    Ticket,
    bounded,
    chat_logprob,
    completion_logprobs,
    openai_app,
    require_model,
)
from fedlm.egress import EgressRefused
from fedlm.egress.audit import AuditRecord
from fedlm.eval.scorers import LocalScorer, ReadToken, fused_reading
from fedlm.federated.routing import AdapterRouter
from fedlm.fusion.decoder import FusedDecoder, FusedToken, FusionConfig, FusionResult
from fedlm.fusion.rules import FusionRule
from fedlm.fusion.vocab import VocabAligner
from fedlm.models import LoadedModel
from fedlm.models.chat import chat_stops
from fedlm.models.token_bytes import complete_prefix_len
from fedlm.privacy import EgressGate
from fedlm.serve.provenance import provenance

MODEL_NAME = "fedlm-fused"
PLAYGROUND = resources.files("fedlm.serve").joinpath("playground.html").read_text(encoding="utf-8")


class GatewayCompletionRequest(p.SamplingFields):
    """A completion as the endpoint serves it: `echo` + `logprobs` score the prompt with the fused model (how
    evaluation tools ask for a text's log-likelihood); no stream, so the schema offers none."""

    prompt: p.NonEmptyText
    max_tokens: p.Count = 16
    logprobs: p.TopK | None = None
    echo: bool = False
    stream: Literal[False] = False


@dataclass
class PromptReading:
    """A prompt scored by the fused model, and what asking the cloud about it cost."""

    tokens: list[ReadToken]
    cloud_calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """What one request's work made: the fused answer, the prompt's reading when it was asked for (`echo`), the
    adapter that answered, and the audit records of everything the work sent."""

    result: FusionResult
    reading: PromptReading | None = None
    audit: list[AuditRecord] = field(default_factory=list)
    adapter: str | None = None  # the adapter on the edge, routed to or fixed
    routing: dict[str, float] | None = None  # with routing: each cluster adapter's loss on the prompt


@dataclass
class Gateway:
    """What answers: the edge (with its adapter, if any), the rule, the cloud and the gate every request leaves by.
    With a `router` the edge is the router's, and each request goes to the cluster adapter that fits its prompt."""

    edge: LoadedModel
    rule: FusionRule
    config: FusionConfig
    cloud_url: str | None
    gate: EgressGate
    adapter: str | None = None
    cloud_model: str | None = None
    cloud_api_key: str | None = None
    router: AdapterRouter | None = None


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
    reader, aligner = LocalScorer(gateway.edge), VocabAligner(gateway.edge.tokenizer, gateway.edge.eos_ids)
    special = set(gateway.edge.tokenizer.all_special_ids)

    def loop_state() -> tuple[asyncio.Lock, AsyncCloudClient | None]:
        loop = asyncio.get_running_loop()
        if loop not in per_loop:
            cloud = None
            if gateway.cloud_url is not None:
                cloud = AsyncCloudClient(
                    gateway.cloud_url, gateway.cloud_api_key, gateway.cloud_model, egress=gateway.gate
                )
            per_loop[loop] = (asyncio.Lock(), cloud)
        return per_loop[loop]

    async def choose_adapter(prompt: str) -> tuple[str | None, dict[str, float] | None]:
        """The adapter that answers `prompt`: routed to (made the active one) when there is a router."""
        if gateway.router is None:
            return gateway.adapter, None
        name, losses = await asyncio.to_thread(gateway.router.route, prompt)
        return name, {adapter: round(loss, 4) for adapter, loss in losses.items()}

    async def fused(
        prompt: str,
        history: list[dict[str, str]],
        max_tokens: int,
        *,
        on_token: Callable[[FusedToken], None] | None = None,
        top_k: int = 0,
        read: bool = False,
    ) -> Answer:
        """One request's work, in one turn: the adapter is chosen once, the prompt is scored first when `read`
        (`echo`), then up to `max_tokens` are answered; `top_k` alternatives are kept per token for logprobs."""
        turn, cloud = loop_state()
        async with turn:  # one piece of work at a time: what the audit log gains meanwhile is this request's
            adapter, routing = await choose_adapter(prompt)
            mark = gateway.gate.audit.appended
            reading = await read_prompt(cloud, prompt, top_k) if read else None
            result = FusionResult()
            if max_tokens:
                config = dataclasses.replace(gateway.config, max_tokens=max_tokens, answer_top_k=top_k)
                decoder = FusedDecoder(gateway.edge, gateway.rule, cloud, config)
                result = await decoder.generate(prompt, history, on_token)
            return Answer(result, reading, gateway.gate.audit.since(mark), adapter, routing)

    async def read_prompt(cloud: AsyncCloudClient | None, prompt: str, top_k: int) -> PromptReading:
        """The prompt scored by the fused model, as `fedlm eval --mode fused` scores a text. A cloud that cannot
        score text is a 400 and a failing one a 503 (a client retries): either way no score is passed off as fused
        that is not. The privacy gate keeping the prompt back is its policy, reported in the provenance."""
        reading, view = PromptReading([]), None
        if cloud is not None:
            before = dataclasses.replace(cloud.traffic)
            try:
                if (protocol := await cloud.protocol()) != "echo":
                    raise APIError(
                        400,
                        f"this endpoint cannot score text with the fused model: its cloud ({gateway.cloud_url}) "
                        f"returns no prompt logprobs (it is read by '{protocol}'). Ask without echo, or serve with a "
                        "cloud that echoes prompt logprobs (fedlm cloud serve, vLLM, llama-cpp-python)",
                        param="echo",
                        code="cloud_cannot_score",
                    )
                top = gateway.config.top_logprobs
                reply = await cloud.complete(prompt, max_tokens=0, echo=True, logprobs=top, temperature=0)
                view = read_cloud_text(reply, prompt)
            except EgressRefused as err:
                reading.warnings.append(f"the privacy gate kept the prompt on the device: scored by the edge ({err})")
            except LogprobsMissing as err:
                reading.warnings.append(f"the cloud did not read this text back (rewritten by the gate?): {err}")
            except CloudError as err:
                raise APIError(
                    503, f"the cloud failed while scoring the prompt: {err}", "server_error", code="cloud_failed"
                ) from err
            finally:
                reading.cloud_calls = cloud.traffic.requests - before.requests
                reading.bytes_sent = cloud.traffic.bytes_sent - before.bytes_sent
                reading.bytes_received = cloud.traffic.bytes_received - before.bytes_received
        tokens = await asyncio.to_thread(fused_reading, reader, aligner, gateway.rule, prompt, view, top_k)
        # tokens the tokenizer adds around the text (a start-of-text token) are not the prompt's
        reading.tokens = [t for t in tokens if not (t.token_id in special and not reader.token_bytes[t.token_id])]
        return reading

    def extension(answer: Answer) -> dict[str, Any]:
        info = provenance(answer.result, gateway.gate.policy.value, answer.adapter, answer.routing, answer.audit)
        reading = answer.reading
        if reading is None:
            return info.model_dump(exclude={"prompt_sources"})
        info.prompt_sources = ["fused" if t.cloud_informed else "edge" for t in reading.tokens if t.logprob is not None]
        info.cloud_calls += reading.cloud_calls
        info.bytes_sent += reading.bytes_sent
        info.bytes_received += reading.bytes_received
        info.warnings = reading.warnings + info.warnings
        if info.cloud_protocol == "none" and any(t.cloud_informed for t in reading.tokens):
            info.cloud_protocol = "echo"
        return info.model_dump()

    def named(token_id: int, logprob: float) -> Candidate:
        return named_candidate(gateway.edge.tokenizer, reader.token_bytes, token_id, logprob)

    def positions(tokens: Sequence[ReadToken | FusedToken], top_k: int) -> list[TokenLogprob]:
        """Tokens as the wire gives them, each with its `top_k` alternatives; one that nothing predicts has NaN."""
        return [
            TokenLogprob(
                named(t.token_id, math.nan if t.logprob is None else t.logprob),
                tuple(named(i, v) for i, v in t.top[:top_k]),
            )
            for t in tokens
        ]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": MODEL_NAME}

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        """A page to try the endpoint in a browser: the answer streams in, each token coloured by its source."""
        return HTMLResponse(PLAYGROUND)

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
        top_k = (body.top_logprobs or 0) if body.logprobs else 0
        if body.stream:
            with admission.held() as ticket:
                tokens: asyncio.Queue[FusedToken | None] = asyncio.Queue()
                work = fused(messages[-1]["content"], messages[:-1], budget, on_token=tokens.put_nowait)
                return _chat_stream(ticket, asyncio.ensure_future(work), tokens, budget, extension, live)
        with admission.held():
            answer = await fused(messages[-1]["content"], messages[:-1], budget, top_k=top_k)
        result = answer.result
        usage = _usage(result)
        finish = "length" if len(result.tokens) >= budget else "stop"
        logprobs = None
        if body.logprobs:
            logprobs = p.ChoiceLogprobs(content=[chat_logprob(t) for t in positions(result.tokens, top_k)])
        choice = p.ChatChoice(message=p.AssistantMessage(content=result.text), logprobs=logprobs, finish_reason=finish)
        reply = p.dump(p.ChatCompletionResponse(model=MODEL_NAME, choices=[choice], usage=usage))
        return {**reply, "fedlm": extension(answer)}

    async def completions(body: GatewayCompletionRequest) -> Any:
        require_model(body.model, MODEL_NAME, "endpoint")
        top_k = body.logprobs or 0
        with admission.held():
            answer = await fused(body.prompt, [], body.max_tokens, top_k=top_k, read=body.echo)
        result, reading = answer.result, answer.reading
        finish = "length" if len(result.tokens) >= body.max_tokens else "stop"
        text = body.prompt + result.text if reading else result.text
        logprobs = None
        if body.logprobs is not None:
            read = reading.tokens if reading else []
            logprobs, _ = completion_logprobs(positions([*read, *result.tokens], top_k), top_k, text)
        choice = p.CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)
        usage = _usage(result)
        if reading:
            usage = p.Usage(
                prompt_tokens=len(reading.tokens),
                completion_tokens=len(result.tokens),
                total_tokens=len(reading.tokens) + len(result.tokens),
            )
        reply = p.dump(p.CompletionResponse(model=MODEL_NAME, choices=[choice], usage=usage))
        return {**reply, "fedlm": extension(answer)}

    chat.__annotations__["body"], completions.__annotations__["body"] = chat_request, completion_request
    app.post("/v1/chat/completions", responses=STREAMED)(chat)
    app.post("/v1/completions")(completions)
    return app


def _usage(result: FusionResult) -> p.Usage:
    total = result.prompt_tokens + len(result.tokens)
    return p.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.tokens), total_tokens=total)


def _chat_stream(
    ticket: Ticket,
    work: asyncio.Future[Answer],
    tokens: asyncio.Queue[FusedToken | None],
    budget: int,
    extension: Callable[[Answer], dict[str, Any]],
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
        sources: list[str] = []  # the source of each token whose text is pending: each chunk says its tokens'
        try:
            while (token := await tokens.get()) is not None:
                pending += token.raw
                sources.append(token.source)
                ready = complete_prefix_len(pending)
                if live and ready:
                    text, pending = pending[:ready].decode("utf-8", "replace"), pending[ready:]
                    yield chunk({"content": text}, fedlm={"sources": sources})
                    sent, sources = sent + len(text), []
            answer = await work
        finally:
            work.cancel()  # a no-op once done; a client that left stops the generation here
        result = answer.result
        if len(result.text) > sent:
            yield chunk(
                {"content": result.text[sent:]}, fedlm={"sources": sources or [t.source for t in result.tokens]}
            )
        finish = "length" if len(result.tokens) >= budget else "stop"
        yield chunk({}, finish, fedlm=extension(answer))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        ticket.carried(events()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
