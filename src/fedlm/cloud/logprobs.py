"""The one reader of what an OpenAI-style server says about tokens, in either of the two shapes servers use.

- The legacy completion shape: `logprobs.tokens`, `token_logprobs`, `text_offset` and `top_logprobs` (a dict of
  candidates per token). Tokens are named by string: a partial UTF-8 token is spelled `bytes:\\xNN...`, and an
  end-of-text token by its name. Both are turned back into what they mean for the text.
- The chat shape: `logprobs.content[]`, each `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`.
  Chat APIs use it, and so does llama.cpp's server on completions too. It has no offsets: each token starts where
  the one before it ended, and `bytes` (when given) say exactly what it adds.

A token spans from its offset to the next token's; the last one as far as its own characters reach. Scoring
(`Scored`) and fusion (`CloudText`) both read through `read_tokens`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from fedlm.cloud.errors import CloudError
from fedlm.models.token_bytes import char_len

END_OF_TEXT = {"<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"}
_HEX = re.compile(r"\\x([0-9a-fA-F]{2})")


class LogprobsMissing(CloudError):
    """The reply holds no per-token logprobs where the request asked for them."""


@dataclass(frozen=True)
class CloudCandidate:
    raw: bytes  # the text this candidate adds, as UTF-8 bytes (empty for special tokens)
    logprob: float
    special: bool = False  # an end-of-text or control token: it maps to the edge's end of sequence


def candidate(token: str, logprob: float) -> CloudCandidate:
    """What a token named in the legacy format adds to the text."""
    if token in END_OF_TEXT:
        return CloudCandidate(b"", logprob, special=True)
    if token.startswith("bytes:"):
        return CloudCandidate(bytes(int(h, 16) for h in _HEX.findall(token)), logprob)
    return CloudCandidate(token.encode(), logprob)


@dataclass(frozen=True)
class CloudToken:
    """One token as the server read or wrote it; `start`/`end` are character offsets in the text."""

    text: str  # as the server named it
    raw: bytes
    logprob: float | None  # None for the first token of an echo, which nothing predicts
    start: int
    end: int
    top: tuple[CloudCandidate, ...]  # most likely first; empty where the server gave none


class MalformedLogprobs(CloudError):
    """The reply's logprobs are in neither shape this client reads."""


def read_tokens(response: dict[str, Any], start_offset: int = 0) -> list[CloudToken]:
    """The tokens of a completion's (or chat completion's) first choice, in either shape. With `echo`, offsets
    count from the start of the prompt; without, from the end of the prompt, so pass `start_offset=len(prompt)`.
    A reply in another shape is a `MalformedLogprobs`, never a crash in the caller."""
    try:
        return _read_tokens(response, start_offset)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as err:
        raise MalformedLogprobs(f"the reply's logprobs are in no shape this client reads ({err})") from err


def _read_tokens(response: dict[str, Any], start_offset: int) -> list[CloudToken]:
    logprobs = (response.get("choices") or [{}])[0].get("logprobs") or {}
    if isinstance(logprobs.get("content"), list):
        return _read_content(logprobs["content"], start_offset)
    names, values = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
    offsets, tops = logprobs.get("text_offset") or [], logprobs.get("top_logprobs") or []
    tokens = []
    for i, (name, offset) in enumerate(zip(names, offsets, strict=False)):
        raw = candidate(name, 0.0).raw
        end = offsets[i + 1] if i + 1 < len(offsets) else offset + char_len(raw)
        top = tops[i] if i < len(tops) and tops[i] else {}
        ranked = tuple(candidate(t, v) for t, v in sorted(top.items(), key=lambda item: -item[1]))
        value = values[i] if i < len(values) else None
        tokens.append(CloudToken(name, raw, value, start_offset + offset, start_offset + end, ranked))
    return tokens


def _chat_candidate(entry: dict[str, Any]) -> CloudCandidate:
    """A chat-shape entry: its `bytes` say what it adds, unless it names an end-of-text token."""
    token, logprob = str(entry.get("token", "")), float(entry.get("logprob", float("-inf")))
    if token in END_OF_TEXT or not isinstance(entry.get("bytes"), list):
        return candidate(token, logprob)
    return CloudCandidate(bytes(entry["bytes"]), logprob)


def _read_content(content: list[dict[str, Any]], start_offset: int) -> list[CloudToken]:
    tokens, at = [], start_offset
    for entry in content:
        own = _chat_candidate(entry)
        ranked = sorted((_chat_candidate(t) for t in entry.get("top_logprobs") or []), key=lambda c: -c.logprob)
        end = at + char_len(own.raw)
        tokens.append(CloudToken(str(entry.get("token", "")), own.raw, own.logprob, at, end, tuple(ranked)))
        at = end
    return tokens


@dataclass(frozen=True)
class Scored:
    """Prompt log-probabilities of `context + target`, split at the boundary between them."""

    tokens: tuple[CloudToken, ...]
    boundary: int

    @property
    def target_tokens(self) -> tuple[CloudToken, ...]:
        """Tokens that carry any character of the target (a token straddling the boundary counts as target)."""
        return tuple(t for t in self.tokens if t.end > self.boundary)

    @property
    def target_logprob(self) -> float:
        if any(t.logprob is None for t in self.target_tokens):
            raise LogprobsMissing("the server returned no logprob for a target token; put context before the target")
        return sum(t.logprob for t in self.target_tokens)  # type: ignore[misc]


def read_echo(response: dict[str, Any], text: str) -> list[CloudToken]:
    """The tokens of an `echo` reply (with no new token) that reads `text` back, with offsets into `text`.

    Offsets are anchored at the end of the text, since servers disagree about its start: vLLM counts the `<bos>`
    it added in `text_offset` though the text it returns has none. The reply must read the text back: a server that
    ignores `echo` and gives logprobs on a token it generated (llama.cpp's server) must never be taken for a
    reading of the text."""
    tokens = read_tokens(response)
    shift = tokens[-1].end - len(text) if tokens else 0
    moved = [replace(t, start=t.start - shift, end=t.end - shift) for t in tokens]
    read_back = b"".join(t.raw for t in moved if t.start >= 0)
    tail = text.encode()[-16:]
    if len(tokens) < 2 or not read_back.endswith(tail) or all(t.logprob is None for t in tokens):
        raise LogprobsMissing(
            "the server returned no prompt logprobs for echo=true; it cannot score text (see `fedlm cloud probe`)"
        )
    return moved


def read_scored(response: dict[str, Any], context: str, target: str) -> Scored:
    """An `echo` + `logprobs` completion of `context + target`, split at the end of `context`."""
    return Scored(tuple(read_echo(response, context + target)), len(context))


@dataclass(frozen=True)
class CloudText:
    """The cloud's reading of a text, by where each of its tokens starts: what the token spells, its logprob (None
    where nothing predicts it) and the candidates it weighed there."""

    tokens: dict[int, CloudToken]

    def candidates_at(self, offset: int) -> list[CloudCandidate] | None:
        token = self.tokens.get(offset)
        return list(token.top) if token and token.top else None

    def logprob_between(self, start: int, end: int) -> float:
        """The cloud's log-probability of the text from character `start` to `end`, both where its tokens start
        (or `end` at the end of the text): the sum over its own tokens in between."""
        inside = [t for at, t in self.tokens.items() if start <= at < end]
        if any(t.logprob is None for t in inside):
            raise LogprobsMissing("the server returned no logprob for a scored token; put context before the target")
        return sum(t.logprob for t in inside)  # type: ignore[misc]


def read_cloud_text(response: dict[str, Any], text: str) -> CloudText:
    """The cloud's reading of an `echo` reply with `logprobs=k` that reads `text` back."""
    return CloudText({t.start: t for t in read_echo(response, text) if t.start >= 0})
