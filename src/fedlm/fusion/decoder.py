"""Edge and cloud decoding together, token by token, under a real-time deadline.

Two schedules, chosen by `lookahead`:

- **Lockstep** (`lookahead=1`, the default). Nothing is drafted that fusion could throw away. The moment the answer
  so far is decided, one request asks the cloud for its top-k candidates for the next token (it continues the
  answer by one token, which any server with logprobs on generated tokens can do), and meanwhile the edge reads the
  token decided last, its one forward pass per token. Both beliefs in, they are fused and the next round starts. A
  round lasts as long as the slower of the two, so with a cloud that answers within one edge token fused decoding
  runs at nearly the edge's own speed, whatever fusion overturns. The first request leaves while the edge reads the
  prompt.
- **Drafting ahead** (`lookahead>1`), which hides a round trip longer than an edge token. With `echo`, the edge
  drafts greedily and one request scores the whole draft: the prompt is the cloud's own prefix, the answer so far
  and the draft, sent with `echo` and top-k logprobs, so the cloud returns its candidates at every position of its
  own tokenization. Wherever a cloud token starts exactly where an edge token starts (a shared text boundary) the
  two beliefs are fused; elsewhere the edge token stands. The first draft token that fusion overturns is replaced,
  the rest of the draft is rolled back, and the next round starts there. While the cloud reads, the edge drafts on
  (up to `lookahead` tokens) and stops the moment the answer is in; when every draft was kept, those speculative
  tokens are the next request, sent at once. A cloud read ahead (no `echo`) drafts instead: it continues the
  answer for `lookahead` tokens, and the edge checks that proposal in one pass. Every overturned token throws away
  what was drafted past it, so drafting pays only where overturns are rare or the round trip is long.

The cloud gets `deadline_ms` per round. A late or failed answer never stalls generation for longer: the edge
tokens stand and count as fallbacks; a cloud that errors is dropped for the rest of the generation with a warning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from fedlm.cloud.client import AsyncCloudClient, CloudError, CloudUnavailable
from fedlm.cloud.readers import AheadView, CloudProtocol, CloudReader, CloudView, Turn, protocol_of, reader_for
from fedlm.egress import EgressRefused
from fedlm.fusion.edge import Beliefs, EdgeDecoder
from fedlm.fusion.rules import FusionRule
from fedlm.fusion.step import fuse_at
from fedlm.fusion.vocab import VocabAligner
from fedlm.models import LoadedModel
from fedlm.models.chat import chat_prompt_ids, chat_stops
from fedlm.models.token_bytes import char_len, token_bytes_table, token_text

log = logging.getLogger(__name__)
Source = Literal["edge", "cloud", "fused"]
PLAIN_CLOUD_PREFIX = "User: {prompt}\nAssistant:"


@dataclass(frozen=True)
class FusionConfig:
    max_tokens: int = 128
    lookahead: int = 1
    deadline_ms: float = 2000.0
    top_logprobs: int = 20
    answer_top_k: int = 0  # alternatives kept per answered token (`FusedToken.top`), for clients that ask for them
    simulate_rtt_ms: float = 0.0  # sleeps (never spins) before each cloud answer is read: a stand-in network
    cloud_prefix: str = PLAIN_CLOUD_PREFIX  # how the cloud sees the conversation; `{prompt}` is the user's text
    cloud_separator: str = " "  # between the prefix and the answer, as the cloud reads it ("Assistant: The")
    protocol: CloudProtocol | Literal["auto"] = "auto"  # how to read the cloud (`fedlm.cloud.readers`); auto: ask it


@dataclass(frozen=True)
class FusedToken:
    token_id: int
    raw: bytes
    source: Source
    logprob: float = 0.0  # under the fused distribution it was chosen from
    top: tuple[tuple[int, float], ...] = ()  # that distribution's `answer_top_k` likeliest (token id, logprob)

    @property
    def text(self) -> str:
        return token_text(self.raw)


@dataclass
class _State:
    """What one generation has decided so far."""

    decoder: EdgeDecoder
    prompt_len: int
    start: float
    answer: bytes = b""
    chars: int = 0  # characters the answer's bytes start (`char_len`), kept as it grows rather than recounted
    on_token: Callable[[FusedToken], None] | None = None  # told of each token the moment it is decided


@dataclass(frozen=True)
class _Link:
    """The cloud as one generation reads it: the client, the reader, and whether that reader is known to fit."""

    client: AsyncCloudClient
    reader: CloudReader
    confirmed: bool


@dataclass
class FusionResult:
    tokens: list[FusedToken] = field(default_factory=list)
    prompt_tokens: int = 0  # what the edge read before answering (its chat template applied)
    cloud_calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    fallbacks: int = 0  # tokens whose cloud answer came late or not at all
    cloud_protocol: CloudProtocol = "none"  # how the cloud was read (`fedlm.cloud.readers`); none: it never was
    ttft_ms: float = 0.0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    cloud_ms: list[float] = field(default_factory=list)  # each answered request: from leaving to its reply being read

    @property
    def text(self) -> str:
        return b"".join(t.raw for t in self.tokens).decode("utf-8", "replace")

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


class FusedDecoder:
    """Co-decodes one edge model with one OpenAI-compatible cloud, under a fusion rule."""

    def __init__(
        self, edge: LoadedModel, rule: FusionRule, cloud: AsyncCloudClient | None, config: FusionConfig = FusionConfig()
    ) -> None:
        self.edge, self.rule, self.cloud, self.config = edge, rule, cloud, config
        self.token_bytes = token_bytes_table(edge.tokenizer)
        self.eos_ids = edge.eos_ids
        self.aligner = VocabAligner(edge.tokenizer, self.eos_ids)
        self.stops = chat_stops(edge.tokenizer)

    async def generate(
        self,
        prompt: str,
        history: Sequence[dict[str, str]] = (),
        on_token: Callable[[FusedToken], None] | None = None,
    ) -> FusionResult:
        """Answer `prompt`, the user's turn after the conversation's earlier messages in `history` (role, content):
        the edge reads them through its chat template, the cloud as a transcript before its own prefix. `on_token`
        hears each token as it is decided (a stop string's tokens are trimmed from the result afterwards)."""
        result = FusionResult()
        start = time.perf_counter()
        prompt_ids = chat_prompt_ids(self.edge.tokenizer, [*history, {"role": "user", "content": prompt}])
        result.prompt_tokens = len(prompt_ids)
        earlier = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in history)
        turn = Turn(prompt, earlier + self.config.cloud_prefix.format(prompt=prompt), tuple(history))
        link = self._link(self.cloud, result) if self.cloud is not None and self.rule.uses_cloud else None
        # in lockstep the first request leaves at once: the edge reads the prompt while the cloud reads it too
        asked = await self._send(link, turn, "", result) if link is not None and self.config.lookahead == 1 else None
        read_prompt = partial(EdgeDecoder, self.edge, prompt_ids, base=self.rule.needs_base)
        decoder = await asyncio.to_thread(read_prompt) if asked else read_prompt()
        state = _State(decoder, len(decoder.ids), start, on_token=on_token)
        drafts: list[tuple[int, Beliefs]] = []
        while True:
            if link is not None and self.config.lookahead == 1:
                done, link = await self._lockstep_round(link, turn, state, result, asked)
                asked = None
                if self._finished(done, state, result):
                    break
                continue
            if link is not None and self._cloud_drafts(link):
                if drafts:  # drafted before the cloud could draft: forget them
                    decoder.rollback(state.prompt_len + len(result.tokens), drafts[0][1])
                    drafts = []
                if self.rule.wants_cloud(decoder.next_beliefs.local):
                    done, link = await self._cloud_round(link, turn, state, result)
                    if self._finished(done, state, result):
                        break
                    continue
            drafts = drafts or self._draft(decoder, self._fresh_budget(link, len(result.tokens)))
            if not drafts:
                break
            sent, speculative, view = "", [], None
            if link is not None and self._wants_cloud(drafts):
                sent = _valid_text(state.answer + b"".join(self.token_bytes[t] for t, _ in drafts))
                answer = sent[: state.chars]
                ask = self._ask_cloud(link, turn, answer, sent[len(answer) :], result, len(drafts))
                asked = asyncio.create_task(ask)
                room = self.config.max_tokens - len(result.tokens) - len(drafts)
                if room > 0 and drafts[-1][0] not in self.eos_ids:  # draft on while the cloud reads
                    answered = threading.Event()
                    asked.add_done_callback(lambda _, event=answered: event.set())
                    speculative = await asyncio.to_thread(self._draft, decoder, room, answered)
                view, link = await asked  # the deadline runs inside, from when the request left
            kept_all, done = self._commit(drafts, view, sent, state, result)
            if self._finished(done, state, result):
                break
            drafts = speculative if kept_all else []
        result.seconds = time.perf_counter() - start
        self._trim_stop(result)
        return result

    def _finished(self, done: bool, state: _State, result: FusionResult) -> bool:
        return done or self._stopped(state.answer) or len(result.tokens) >= self.config.max_tokens

    def _cloud_drafts(self, link: _Link | None) -> bool:
        """Whether the cloud drafts: a cloud read ahead proposes `lookahead` tokens, which the edge checks in one
        pass."""
        return link is not None and link.confirmed and link.reader.protocol != "echo"

    async def _send(
        self, link: _Link, turn: Turn, answer: str, result: FusionResult
    ) -> asyncio.Task[tuple[CloudView | None, _Link | None]]:
        """Ask the cloud for its candidates after `answer`, and return once the request is out: the edge's thread
        then competes with it for the interpreter only after it has left."""
        asked = asyncio.create_task(self._ask_cloud(link, turn, answer, "", result, 1))
        await asyncio.sleep(0)
        return asked

    async def _lockstep_round(
        self,
        link: _Link,
        turn: Turn,
        state: _State,
        result: FusionResult,
        asked: asyncio.Task[tuple[CloudView | None, _Link | None]] | None = None,
    ) -> tuple[bool, _Link | None]:
        """One token, with nothing drafted that fusion could throw away: the request for the cloud's candidates
        after the answer so far leaves the moment that answer is decided (or is `asked` already), and meanwhile
        the edge reads the token it decided last (its one forward pass per token). The round lasts as long as the
        slower of the two. Returns (finished, link)."""
        answer = _valid_text(state.answer)
        if answer.encode() != state.answer:  # mid-character: the cloud would read a text that ends elsewhere
            before, view = state.decoder.next_beliefs, None
        else:
            asked = asked or await self._send(link, turn, answer, result)
            before = await asyncio.to_thread(lambda: state.decoder.next_beliefs)
            view = None
            if self.rule.wants_cloud(before.local):
                view, link = await asked
            else:  # the request left before the edge knew it would not need it: go on without its answer
                asked.cancel()
        drafts = [(int(before.local.argmax()), before)]
        _, done = self._commit(drafts, view, answer, state, result, ask_again=False, read=False)
        return done, link

    async def _cloud_round(
        self, link: _Link, turn: Turn, state: _State, result: FusionResult
    ) -> tuple[bool, _Link | None]:
        """One round where the cloud drafts: it continues the answer for a few tokens, the edge reads that proposal
        in one pass (its beliefs at every position), and fusion keeps the proposal up to the first token it
        overturns, as speculative decoding does with the roles swapped. Returns (finished, link)."""
        answer = _valid_text(state.answer)
        view, link = await self._ask_cloud(link, turn, answer, "", result, 1)
        text = _valid_text(view.proposal()) if isinstance(view, AheadView) else ""
        room = self.config.max_tokens - len(result.tokens)
        ids = self.edge.tokenizer(text, add_special_tokens=False)["input_ids"][:room] if text else []
        # nothing proposed (the end of the turn, or no answer in time): one edge token, fused where it can be
        drafts = list(zip(ids, state.decoder.extend(ids), strict=True)) if ids else self._draft(state.decoder, 1)
        sent = answer + b"".join(self.token_bytes[t] for t, _ in drafts).decode("utf-8", "replace")
        _, done = self._commit(drafts, view, sent, state, result, ask_again=False)
        return done, link

    def _commit(
        self,
        drafts: list[tuple[int, Beliefs]],
        view: CloudView | None,
        sent: str,
        state: _State,
        result: FusionResult,
        ask_again: bool = True,
        read: bool = True,
    ) -> tuple[bool, bool]:
        """Fuse and keep draft tokens up to the first one fusion overturns, or up to the first the cloud's reading
        no longer covers but a new request would (its proposal ended or was left): that one is drafted again and
        asked about. `read`: the edge has read the drafts already; else a kept one is read later, like a token
        that overturned a draft (`EdgeDecoder.defer`). Returns (kept every draft, finished)."""
        for token_id, before in drafts:
            candidates = view.candidates_at(state.chars, sent) if view else None
            if candidates is None and ask_again and view is not None and view.ask_again(state.chars, sent):
                state.decoder.rollback(state.prompt_len + len(result.tokens), before)
                return False, False
            fused = fuse_at(self.rule, self.aligner, before, candidates)
            choice = int(fused.logprobs.argmax())
            # "cloud": fusion chose otherwise than the edge alone would have; the draft may be the cloud's own
            agrees = choice == int(before.local.argmax())
            source: Source = ("fused" if agrees else "cloud") if fused.cloud_informed else "edge"
            if not result.tokens:
                result.ttft_ms = (time.perf_counter() - state.start) * 1000
            if choice in self.eos_ids:
                return False, True
            state.answer += self.token_bytes[choice]
            state.chars += char_len(self.token_bytes[choice])
            top: tuple[tuple[int, float], ...] = ()
            if self.config.answer_top_k:  # only when a client asked: a top-k over the vocabulary every token costs
                values, ids = fused.logprobs.topk(min(self.config.answer_top_k, fused.logprobs.numel()))
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            result.tokens.append(
                FusedToken(choice, self.token_bytes[choice], source, float(fused.logprobs[choice]), top)
            )
            if state.on_token is not None:
                state.on_token(result.tokens[-1])
            if choice != token_id:  # overturned: forget this draft's rest and anything drafted after it
                state.decoder.rollback(state.prompt_len + len(result.tokens) - 1, before)
                state.decoder.defer(choice)
                return False, False
            if not read:
                state.decoder.defer(choice)
            if len(result.tokens) >= self.config.max_tokens:
                return True, True
        return True, False

    def _fresh_budget(self, link: _Link | None, done: int) -> int:
        """Tokens to draft before a round starts: one when a cloud will read them (more come while it reads)."""
        room = self.config.max_tokens - done
        return min(1, room) if link is not None else room

    def _draft(
        self, decoder: EdgeDecoder, budget: int, stop: threading.Event | None = None
    ) -> list[tuple[int, Beliefs]]:
        """Greedy edge tokens with the distribution each was drawn from; stops at an end token, or once `stop`
        is set (the cloud has answered, so the next round can start)."""
        drafts = []
        for _ in range(min(self.config.lookahead, budget)):
            if stop is not None and stop.is_set():
                break
            before = decoder.next_beliefs
            token_id = int(before.local.argmax())
            drafts.append((token_id, before))
            if token_id in self.eos_ids:
                break
            decoder.append(token_id)
        return drafts

    def _wants_cloud(self, drafts: list[tuple[int, Beliefs]]) -> bool:
        """One request serves the whole draft, so it goes out if the rule wants the cloud at any of its positions."""
        return any(self.rule.wants_cloud(before.local) for _, before in drafts)

    def _link(self, client: AsyncCloudClient, result: FusionResult) -> _Link | None:
        """How this generation reads the cloud: the configured protocol, else the one this client already found,
        else echo on trial (the first reply says whether it fits, at no extra request)."""
        known = self.config.protocol if self.config.protocol != "auto" else client.cloud_protocol
        protocol = known or "echo"
        if self.config.lookahead == 1 and protocol == "echo":  # lockstep reads the next token only: any server can
            protocol = "ahead"
        reader = reader_for(protocol, self.config.lookahead, self.config.cloud_separator, client.logprob_start)
        if reader is None:
            self._warn(
                result,
                f"the cloud at {client.base_url} gives no logprobs (no prompt logprobs for echo, none on the tokens "
                "it generates), so nothing can be fused; answering on the edge alone",
            )
            return None
        return _Link(client, reader, confirmed=known is not None)

    def _warn(self, result: FusionResult, message: str) -> None:
        log.warning(message)
        result.warnings.append(message)

    async def _ask_cloud(
        self, link: _Link, turn: Turn, answer: str, draft: str, result: FusionResult, n_drafts: int
    ) -> tuple[CloudView | None, _Link | None]:
        """One request within the deadline; returns the cloud's reading and how to read the cloud from now on.

        A reader on trial is checked against its first reply: if the server did not read the text back (no
        prompt logprobs), the reply is never taken for a reading, and the same question is asked again the way
        the reply shows the server can be read, which is kept from then on."""
        cloud = link.client
        ask = link.reader.request(turn, answer, draft, self.config.top_logprobs)

        async def call() -> dict:
            if self.config.simulate_rtt_ms:
                await asyncio.sleep(self.config.simulate_rtt_ms / 1000)
            if ask.messages is not None:
                return await cloud.chat(ask.messages, **ask.fields)
            return await cloud.complete(ask.prompt or "", **ask.fields)

        sent_at = time.perf_counter()
        try:
            with self._counted(cloud, result):
                response = await asyncio.wait_for(call(), self.config.deadline_ms / 1000)
            result.cloud_ms.append((time.perf_counter() - sent_at) * 1000)
            found = link.reader.protocol if link.confirmed else protocol_of(response)
            if not link.confirmed and (link.reader.protocol == "echo" or found == "none"):
                cloud.cloud_protocol = found  # only an echo trial tells echo from ahead
        except TimeoutError:
            result.fallbacks += n_drafts
            return None, link
        except (CloudError, EgressRefused) as err:
            if not link.confirmed and isinstance(err, CloudError) and not isinstance(err, CloudUnavailable):
                found = await self._find_protocol(link, result)  # the server refused echo: ask it plainly
                return await self._ask_cloud(found, turn, answer, draft, result, n_drafts) if found else (None, None)
            self._warn(result, f"cloud failed ({err}); finishing on the edge alone")
            result.fallbacks += n_drafts
            return None, None
        finally:
            result.cloud_calls += 1
        try:
            view = link.reader.view(response, answer, draft)
        except CloudError as err:  # a reply in a shape nobody reads: the cloud is misbehaving
            self._warn(result, f"cloud failed ({err}); finishing on the edge alone")
            result.fallbacks += n_drafts
            return None, None
        if not link.confirmed:
            if found != link.reader.protocol:
                relinked = self._link(cloud, result)
                return (
                    await self._ask_cloud(relinked, turn, answer, draft, result, n_drafts) if relinked else (None, None)
                )
            link = dataclasses.replace(link, confirmed=True)
        result.cloud_protocol = link.reader.protocol
        return view, link

    async def _find_protocol(self, link: _Link, result: FusionResult) -> _Link | None:
        """Ask the server which way it can be read (`AsyncCloudClient.protocol`), counting what that costs."""
        requests = link.client.traffic.requests
        try:
            with self._counted(link.client, result):
                await link.client.protocol()
        except CloudError as err:
            self._warn(result, f"cloud failed ({err}); finishing on the edge alone")
            return None
        finally:
            result.cloud_calls += link.client.traffic.requests - requests
        return self._link(link.client, result)

    @contextmanager
    def _counted(self, client: AsyncCloudClient, result: FusionResult) -> Iterator[None]:
        """Add the bytes `client` sends and receives within the block to `result`, whatever happens in it."""
        before = dataclasses.replace(client.traffic)
        try:
            yield
        finally:
            result.bytes_sent += client.traffic.bytes_sent - before.bytes_sent
            result.bytes_received += client.traffic.bytes_received - before.bytes_received

    def _stopped(self, answer: bytes) -> bool:
        text = answer.decode("utf-8", "ignore")
        return any(stop in text for stop in self.stops)

    def _trim_stop(self, result: FusionResult) -> None:
        """Drop the tokens of a plain-transcript stop string, so the answer ends where the turn ends."""
        for stop in self.stops:
            while result.tokens and stop in result.text:
                result.tokens.pop()


def _valid_text(raw: bytes) -> str:
    """The longest prefix of `raw` that is text: the cloud is sent text, so bytes past a partial or invalid
    character stay on the device, and positions past them find no shared boundary."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return raw[: err.start].decode("utf-8")


def fuse_once(
    edge: LoadedModel,
    rule: FusionRule,
    prompt: str,
    config: FusionConfig,
    cloud_url: str | None = None,
    **client_options: Any,
) -> FusionResult:
    """Answer one prompt: open a client for `cloud_url` (none: edge alone), generate, close the client."""

    async def run() -> FusionResult:
        if cloud_url is None:
            return await FusedDecoder(edge, rule, None, config).generate(prompt)
        async with AsyncCloudClient(cloud_url, **client_options) as client:
            return await FusedDecoder(edge, rule, client, config).generate(prompt)

    return asyncio.run(run())
