"""A batching inference engine over any HF causal LM: generation and prompt scoring with log-probabilities.

One worker thread owns the model and decodes every running request together, one token per forward pass
(continuous batching): a new request is prefilled and joins the batch at the next step, and a finished one leaves
it, so nobody waits for a whole batch to drain. On a CPU a forward pass over four rows costs far less than four
passes over one, so concurrent clients share the model's throughput. Scoring (`echo`) is read off the prefill.

Reported log-probabilities are those of the model's own next-token distribution (log-softmax of the raw logits),
whatever temperature the request samples with: callers that fuse or score need the model's belief, not the
sampler's.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from fedlm.cloud import batch_cache
from fedlm.cloud.prefix_cache import Hit, PrefixCache, one_row
from fedlm.models import LoadedModel
from fedlm.models.chat import chat_prompt_ids, chat_stops
from fedlm.models.token_bytes import complete_prefix_len, token_bytes_table, token_starts, token_text

GREEDY_TEMPERATURE = 1e-4


class ContextLengthError(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's logprob plus the k most likely
    echo: bool = False  # also score the prompt tokens
    echo_from: int = 1  # with echo, the first prompt token scored; those before come back unscored (NaN)


@dataclass(frozen=True)
class Candidate:
    token_id: int
    text: str
    raw: bytes
    logprob: float


def named_candidate(
    tokenizer: PreTrainedTokenizerBase, token_bytes: list[bytes], token_id: int, logprob: float
) -> Candidate:
    """A token as the wire names it: its text (`bytes:\\xNN` for part of a character), or a special token's name."""
    raw = token_bytes[token_id]
    text = (
        token_text(raw)
        if raw or token_id not in tokenizer.all_special_ids
        else tokenizer.convert_ids_to_tokens(token_id)
    )
    return Candidate(token_id, text, raw, logprob)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token that stands there, its logprob (None for a first prompt token) and the top-k."""

    token: Candidate
    top: tuple[Candidate, ...] = ()


@dataclass
class Completion:
    """The full result of a request, also assembled from the stream by `Engine.complete`."""

    prompt_tokens: int
    text: str = ""
    finish_reason: str = "length"
    tokens: list[TokenLogprob] = field(default_factory=list)  # the generated tokens (an EOS is not kept)
    prompt: list[TokenLogprob] = field(default_factory=list)  # filled when echo was asked


@dataclass(frozen=True)
class StreamEvent:
    """A piece of output: new text with the tokens behind it, or the end of the request."""

    text: str = ""
    tokens: tuple[TokenLogprob, ...] = ()
    prompt: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[StreamEvent]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: StreamEvent) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Serves generation and scoring requests for one model from one worker thread."""

    def __init__(
        self, loaded: LoadedModel, max_batch: int = 8, max_model_len: int | None = None, prefix_cache: int = 8
    ) -> None:
        self.name = loaded.name
        self.model: PreTrainedModel = loaded.model
        self.tokenizer: PreTrainedTokenizerBase = loaded.tokenizer
        self.max_batch = max_batch
        config_len = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_model_len = min(max_model_len or config_len, config_len)
        self.token_bytes = token_bytes_table(self.tokenizer)
        self.eos_ids = loaded.eos_ids
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache > 0 else None  # prompts kept for reuse
        self.batch_sizes: list[int] = []  # rows in each decode step: lets benchmarks see the batching happen
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name=f"fedlm-engine-{self.name}", daemon=True)
        self._worker.start()

    # ---- public API -------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    @property
    def chat_stop(self) -> tuple[str, ...]:
        return chat_stops(self.tokenizer)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def check_length(self, prompt_ids: list[int], params: SamplingParams) -> None:
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {len(prompt_ids)} prompt "
                f"tokens plus max_tokens={params.max_tokens} need {need}. Shorten the prompt or lower max_tokens."
            )

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Yield text as it is decided, then one event with the finish reason. Cancels on early exit."""
        self.check_length(prompt_ids, params)
        request = _Request(prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue())
        self._queue.put(request)
        try:
            while True:
                event = await request.events.get()
                if event.error is not None:
                    raise RuntimeError(event.error)
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancelled.set()

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        result = Completion(prompt_tokens=len(prompt_ids))
        async for event in self.stream(prompt_ids, params):
            result.text += event.text
            result.tokens.extend(event.tokens)
            result.prompt.extend(event.prompt)
            result.finish_reason = event.finish_reason or result.finish_reason
        return result

    # ---- worker -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        running: _Batch | None = None
        while True:
            waiting = [] if running else [self._queue.get()]  # idle: block until work arrives
            room = self.max_batch - len(waiting) - (running.size if running else 0)
            if running is None or running.joinable:
                while room > 0:
                    try:
                        waiting.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                    room -= 1
            waiting = [r for r in waiting if not r.cancelled.is_set()]
            try:
                if waiting:
                    joined = self._prefill(waiting)
                    running = joined if running is None else running.merge(joined)
                if running is not None:
                    running = running.without_finished()
                if running is not None:
                    self.batch_sizes.append(running.size)
                    running.step()
            except Exception as err:  # a failure fails the requests in flight, never the worker
                failed = waiting + ([s.request for s in running.states] if running else [])
                for request in failed:
                    request.emit(StreamEvent(error=f"{type(err).__name__}: {err}"))
                running = None

    def _prefill(self, requests: list[_Request]) -> _Batch:
        """Read the prompts of newly admitted requests and pick their first tokens, reusing cached prefixes."""
        fresh, batches = [], []
        for request in requests:
            echo_k = (request.params.top_logprobs or 0) if request.params.echo else None
            hit = (
                self.prefix_cache.lookup(request.prompt_ids, echo_k, request.params.echo_from)
                if self.prefix_cache
                else None
            )
            if hit is None:
                fresh.append(request)
            else:
                batches.append(self._prefill_after(request, hit))
        if fresh:
            batches.insert(0, self._prefill_fresh(fresh))
        joined = batches[0]
        for other in batches[1:]:
            joined = joined.merge(other)
        return joined

    def _prefill_fresh(self, requests: list[_Request]) -> _Batch:
        """Prompts read in full, as one left-padded batch."""
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # the LM head runs only where some row wants logits: its last position, and the prompt tokens it scores
        keep = max(_scored(r.prompt_ids, r.params) + 1 for r in requests)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep
        )
        states = [_RowState(self, request) for request in requests]
        for row, state in enumerate(states):
            ids, k = state.request.prompt_ids, state.params.top_logprobs or 0
            rows = None
            if state.params.echo:
                scored = _scored(ids, state.params)
                logits = out.logits[row, keep - scored - 1 : -1].float().log_softmax(-1)
                rows = self.unscored(ids[1 : len(ids) - scored]) + self.positions(ids[len(ids) - scored :], logits, k)
                state.emit_prompt(rows)
            if self.prefix_cache:
                self.prefix_cache.store(ids, one_row(out.past_key_values, row, len(ids)), rows, k)
        batch = _Batch(self, states, out.past_key_values, mask, positions[:, -1:])
        batch.advance(out.logits[:, -1].float().log_softmax(-1))
        return batch

    def _prefill_after(self, request: _Request, hit: Hit) -> _Batch:
        """A prompt whose first `hit.length` positions come from the prefix cache: only the rest is read."""
        ids, k, echo = request.prompt_ids, request.params.top_logprobs or 0, request.params.echo
        positions = torch.arange(hit.length, len(ids))[None]
        mask = torch.ones((1, len(ids)), dtype=torch.long)
        scored = min(_scored(ids, request.params), len(ids) - hit.length - 1)  # the cached part brings its own
        out = self.model(
            input_ids=torch.tensor([ids[hit.length :]]),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=hit.cache,
            use_cache=True,
            logits_to_keep=scored + 1,
        )
        state = _RowState(self, request)
        rows = None
        if echo:
            logits = out.logits[0, :-1].float().log_softmax(-1)
            cut = min(max(request.params.echo_from, 1) - 1, len(hit.echo))  # cached rows the client did not ask for
            reused = self.unscored(ids[1 : 1 + cut]) + hit.echo[cut:]
            fresh = self.unscored(ids[hit.length + 1 : len(ids) - scored])
            rows = reused + fresh + self.positions(ids[len(ids) - scored :], logits, k)
            state.emit_prompt(rows)
        self.prefix_cache.store(ids, one_row(out.past_key_values, 0, len(ids)), rows, k)
        batch = _Batch(self, [state], out.past_key_values, mask, positions[:, -1:])
        batch.advance(out.logits[:, -1].float().log_softmax(-1))
        return batch

    def candidate(self, token_id: int, logprob: float) -> Candidate:
        return named_candidate(self.tokenizer, self.token_bytes, token_id, logprob)

    def first_token_reaching(self, prompt_ids: list[int], prompt: str, char: int) -> int:
        """The index of the first prompt token that carries a character at or after offset `char` of `prompt`."""
        starts, end = token_starts(((self.token_bytes[i], self.candidate(i, 0.0).text) for i in prompt_ids), prompt)
        ends = [*starts[1:], end]
        return next((i for i, token_end in enumerate(ends) if token_end > char), len(prompt_ids))

    def unscored(self, token_ids: list[int]) -> list[TokenLogprob]:
        """Prompt tokens that come back without a logprob (NaN) or candidates: the client did not ask for them."""
        return [TokenLogprob(self.candidate(token_id, float("nan"))) for token_id in token_ids]

    def positions(self, token_ids: list[int], logprobs: torch.Tensor, k: int) -> list[TokenLogprob]:
        """Each token with its logprob and the top-k, from its own row of `logprobs` (one row per token)."""
        chosen = logprobs.gather(-1, torch.tensor(token_ids)[:, None])[:, 0].tolist()
        values, ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], logprobs[:, :0].long())
        return [
            TokenLogprob(
                self.candidate(token_id, lp),
                tuple(self.candidate(i, v) for i, v in zip(top_ids, top_values, strict=True)),
            )
            for token_id, lp, top_ids, top_values in zip(token_ids, chosen, ids.tolist(), values.tolist(), strict=True)
        ]


def _scored(prompt_ids: list[int], params: SamplingParams) -> int:
    """How many prompt tokens at the end of the prompt a request has scored (echo): all from `echo_from` on."""
    return len(prompt_ids) - min(max(params.echo_from, 1), len(prompt_ids)) if params.echo else 0


class _Batch:
    """The requests being decoded together: their cache, padding mask, positions and next input tokens."""

    def __init__(
        self, engine: Engine, states: list[_RowState], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor
    ) -> None:
        self.engine, self.states, self.cache, self.mask, self.positions = engine, states, cache, mask, positions
        self.next_ids = torch.full((len(states),), engine.pad_id, dtype=torch.long)
        self.joinable = batch_cache.can_edit(cache)  # else new requests wait until this batch is done

    @property
    def size(self) -> int:
        return len(self.states)

    def advance(self, logprobs: torch.Tensor) -> None:
        for row, state in enumerate(self.states):
            if not state.done:
                try:
                    self.next_ids[row] = state.advance(logprobs[row])
                except Exception as err:  # one request's own failure (its sampling, its stop strings) is its own
                    state.fail(err)
                    self.next_ids[row] = self.engine.pad_id

    def step(self) -> None:
        """One forward pass for every row, then one new token each."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        self.positions = self.positions + 1
        out = self.engine.model(
            input_ids=self.next_ids[:, None],
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.advance(out.logits[:, -1].float().log_softmax(-1))

    def merge(self, other: _Batch) -> _Batch:
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.cache = batch_cache.merge(self.cache, other.cache)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.states += other.states
        return self

    def without_finished(self) -> _Batch | None:
        """Drop finished rows and the padding columns nobody needs any more; None when no row is left."""
        keep = [row for row, state in enumerate(self.states) if not state.done]
        if not keep:
            return None
        if len(keep) < self.size:
            if not self.joinable:
                return self  # cannot edit this cache: finished rows ride along until the batch ends
            index = torch.tensor(keep)
            batch_cache.select_rows(self.cache, index)
            self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
            self.states = [self.states[row] for row in keep]
        if self.joinable:
            unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
            batch_cache.drop_left(self.cache, unused)
            self.mask = self.mask[:, unused:]
        return self


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], width - mask.shape[1])), mask], dim=1)


class _RowState:
    """Decoding state of one request inside a batch: sampling, detokenisation, stop strings, emission."""

    def __init__(self, engine: Engine, request: _Request) -> None:
        self.engine = engine
        self.request = request
        self.params = request.params
        seed = self.params.seed
        self.generator = torch.Generator().manual_seed(seed % 2**64) if seed is not None else None  # any int seeds
        self.raw = b""  # generated bytes so far
        self.sent_chars = 0  # characters of the decoded text already emitted
        self.pending: list[TokenLogprob] = []  # tokens whose text is not emitted yet
        self.count = 0
        self.done = self.params.max_tokens == 0
        if self.done and not self.params.echo:
            request.emit(StreamEvent(finish_reason="length"))

    def emit_prompt(self, rows: list[TokenLogprob]) -> None:
        """Send the echo: `rows` score every prompt token after the first, which has nothing to condition on."""
        scored = [TokenLogprob(self.engine.candidate(self.request.prompt_ids[0], float("nan"))), *rows]
        self.request.emit(StreamEvent(prompt=tuple(scored), finish_reason="length" if self.done else None))

    def _sample(self, logprobs: torch.Tensor) -> int:
        # below GREEDY_TEMPERATURE the distribution is one-hot to float precision, and dividing by it overflows
        if self.params.temperature < GREEDY_TEMPERATURE:
            return int(logprobs.argmax())
        probs = (logprobs.double() / self.params.temperature).softmax(-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < self.params.top_p
            keep[0] = True  # the most likely token always stays, however small top_p is
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def fail(self, err: Exception) -> None:
        """End this request with an error, leaving the others in its batch to go on."""
        self.done = True
        self.request.emit(StreamEvent(error=f"{type(err).__name__}: {err}"))

    def advance(self, logprobs: torch.Tensor) -> int:
        """Pick the next token, emit whatever text is now final, and return the token id."""
        if self.request.cancelled.is_set():
            self.done = True
            return self.engine.pad_id
        token_id = self._sample(logprobs)
        self.count += 1
        if token_id in self.engine.eos_ids:
            return self._finish("stop")
        self.pending.append(self.engine.positions([token_id], logprobs[None], self.params.top_logprobs or 0)[0])
        self.raw += self.engine.token_bytes[token_id]
        text = self.raw[: complete_prefix_len(self.raw)].decode("utf-8", errors="ignore")  # hold back partial chars
        for stop in self.params.stop:
            at = text.find(stop, max(0, self.sent_chars - len(stop)))
            if at != -1:
                self._send(text[:at])
                return self._finish("stop")
        if self.count >= self.params.max_tokens:
            self._send(self.raw.decode("utf-8", errors="replace"))
            return self._finish("length")
        hold = max((len(s) - 1 for s in self.params.stop), default=0)  # a stop string may still be forming
        self._send(text[: max(self.sent_chars, len(text) - hold)])
        return token_id

    def _send(self, text: str) -> None:
        delta = text[self.sent_chars :]
        if delta or self.pending:
            self.request.emit(StreamEvent(text=delta, tokens=tuple(self.pending)))
            self.sent_chars = len(text)
            self.pending = []

    def _finish(self, reason: str) -> int:
        self.done = True
        self.request.emit(StreamEvent(tokens=tuple(self.pending), finish_reason=reason))
        self.pending = []
        return self.engine.pad_id
