"""The ways a cloud can be read for fusion: one small reader each, behind one interface, chosen by the probe.

- `echo` (fedlm's server, vLLM, llama-cpp-python): the prompt, the answer so far and the edge's draft go out with
  `echo` and top-k logprobs, and the cloud returns its candidates at every position of the text it read.
- `ahead` (llama.cpp's server, hosted APIs: logprobs only on tokens they generate): the prompt and the answer so far
  go out, and the cloud continues them for a few tokens with top-k at each. Its candidates count at a position only
  while the edge's text has followed the cloud's own path up to there; where the two part, the rest of the
  proposal says nothing about the edge's text and is dropped.
- `chat` (servers with chat completions only): the same, through chat: the answer so far is a final assistant
  message that the server continues (`continue_final_message`, as llama.cpp's server and vLLM do), in the cloud's
  own chat template.
- `none`: the server gives no logprobs at all, and the edge answers alone.

A reader builds its request and reads the reply (no I/O of its own); the reply becomes a `CloudView` in the
answer's own character offsets. A plain-transcript cloud reads the answer after its prefix ("...Assistant:") with a
separator (one space) between, as a transcript is written; the separator belongs to the answer's first cloud
token, which is moved to the answer's first character without it, so a fused answer never starts with a stray
space. A chat-template prefix needs no separator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from fedlm.cloud.logprobs import CloudCandidate, CloudToken, read_tokens

CloudProtocol = Literal["echo", "ahead", "chat", "none"]


@dataclass(frozen=True)
class Turn:
    """The user's prompt, and the plain transcript prefix a completions server reads it in ("User: ...\nAssistant:");
    `history` holds the conversation's earlier messages, which a chat server is sent as they are."""

    prompt: str
    prefix: str
    history: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class Ask:
    """One request: to `/completions` with a prompt, or to `/chat/completions` with messages."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    fields: dict[str, Any]


class CloudView(Protocol):
    def candidates_at(self, at: int, text: str) -> list[CloudCandidate] | None:
        """The cloud's candidates for what follows character `at` of the answer, whose text the edge has as `text`
        (the answer and draft that were sent); None where the cloud said nothing that applies there."""
        ...

    def ask_again(self, at: int, text: str) -> bool:
        """Whether a new request from character `at` would get the candidates this reading lacks there."""
        ...


class CloudReader(Protocol):
    protocol: CloudProtocol

    def request(self, turn: Turn, answer: str, draft: str, top_k: int) -> Ask:
        """The request that asks the cloud about `draft` after `answer`, in answer to `turn`."""
        ...

    def view(self, reply: dict[str, Any], answer: str, draft: str) -> CloudView:
        """What the reply says, in the answer's character offsets."""
        ...


def _into_answer(tokens: list[CloudToken], shift: int, separator: str) -> dict[int, CloudToken]:
    """Tokens by where they start in the answer (cloud offset - `shift`). The token that starts at the separator
    before the answer takes the answer's first place, without the separator, and so do its candidates."""
    by_start, cut = {}, separator.encode()
    for token in tokens:
        start = token.start - shift
        if cut and start == -len(separator) and token.raw.startswith(cut):
            top = tuple(replace(c, raw=c.raw[len(cut) :]) if c.raw.startswith(cut) else c for c in token.top)
            token = replace(token, raw=token.raw[len(cut) :], start=0, end=token.end - shift, top=top)
        else:
            token = replace(token, start=start, end=token.end - shift)
        if token.start >= 0:
            by_start[token.start] = token
    return by_start


@dataclass(frozen=True)
class EchoView:
    """The cloud's reading of the whole text it was sent."""

    tokens: dict[int, CloudToken]

    def candidates_at(self, at: int, text: str) -> list[CloudCandidate] | None:
        token = self.tokens.get(at)
        if token is None or not token.top or at >= len(text):
            return None
        ahead = text[at:].encode()
        # the cloud's token must spell the text the edge has there, or the two readings are not aligned
        return list(token.top) if ahead.startswith(token.raw) or token.raw.startswith(ahead) else None

    def ask_again(self, at: int, text: str) -> bool:
        return False  # the cloud read this very text: where it has no token boundary, it never will


@dataclass(frozen=True)
class EchoReader:
    """Scores the answer and the draft with prompt logprobs (`echo`): every position in one request. With
    `tail_only` (a server that honours `logprob_start_char`), only the draft's positions are scored and sent back:
    the answer before it was read in earlier rounds."""

    separator: str = ""
    tail_only: bool = False
    protocol: CloudProtocol = "echo"

    def request(self, turn: Turn, answer: str, draft: str, top_k: int) -> Ask:
        fields: dict[str, Any] = {"max_tokens": 0, "echo": True, "logprobs": top_k, "temperature": 0}
        head = turn.prefix + self.separator + answer
        if self.tail_only:
            fields["logprob_start_char"] = len(head)
        return Ask(head + draft, None, fields)

    def view(self, reply: dict[str, Any], answer: str, draft: str) -> EchoView:
        tokens = read_tokens(reply)
        if not tokens:
            return EchoView({})
        # offsets are matched from the end of what was sent: the answer is the tail of what the cloud read, while its
        # prefix is the cloud's own (a template, and possibly rewritten by the privacy gate)
        return EchoView(_into_answer(tokens, tokens[-1].end - len(answer + draft), self.separator))


@dataclass(frozen=True)
class AheadView:
    """The cloud's own continuation of the answer, from character `start`: a path with candidates along it."""

    tokens: dict[int, CloudToken]
    start: int

    def candidates_at(self, at: int, text: str) -> list[CloudCandidate] | None:
        token = self.tokens.get(at)
        if token is None or not token.top:
            return None
        path = b"".join(t.raw for s, t in sorted(self.tokens.items()) if s < at)
        # the candidates apply only while the edge's text has followed the cloud's path up to here
        return list(token.top) if text[self.start : at].encode() == path else None

    def ask_again(self, at: int, text: str) -> bool:
        # past the start, a position is unread only because the proposal ended or the edge left it: asked from
        # here, the cloud proposes again; at the start it has had its chance
        return at > self.start

    def proposal(self) -> bytes:
        """The text the cloud proposed after the answer, up to where it would end its turn."""
        text = b""
        for _, token in sorted(self.tokens.items()):
            if not token.raw:  # an end-of-text token
                break
            text += token.raw
        return text


@dataclass(frozen=True)
class AheadReader:
    """Lets the cloud continue the answer for `tokens` tokens, with top-k at each (generate-ahead)."""

    tokens: int = 4
    separator: str = ""
    protocol: CloudProtocol = "ahead"

    def request(self, turn: Turn, answer: str, draft: str, top_k: int) -> Ask:
        # with no answer yet the prompt ends at the prefix, since a prompt ending in a space reads badly to most
        # tokenizers: the cloud writes the separator itself
        fields = {"max_tokens": self.tokens, "logprobs": top_k, "temperature": 0}
        return Ask(turn.prefix + self.separator + answer if answer else turn.prefix, None, fields)

    def view(self, reply: dict[str, Any], answer: str, draft: str) -> AheadView:
        # generated tokens count from the end of the prompt; with no answer yet, that is where the separator goes
        shift = -len(answer) if answer else len(self.separator)
        return AheadView(_into_answer(read_tokens(reply), shift, self.separator), len(answer))


@dataclass(frozen=True)
class ChatReader:
    """Generate-ahead through chat completions: the answer so far is the final assistant message, continued for
    `tokens` tokens with top-k at each. The server must continue that message rather than start a new one."""

    tokens: int = 4
    protocol: CloudProtocol = "chat"

    def request(self, turn: Turn, answer: str, draft: str, top_k: int) -> Ask:
        messages: list[dict[str, Any]] = [*turn.history, {"role": "user", "content": turn.prompt}]
        fields: dict[str, Any] = {"max_tokens": self.tokens, "logprobs": True, "top_logprobs": top_k, "temperature": 0}
        if answer:
            messages.append({"role": "assistant", "content": answer})
            fields |= {"continue_final_message": True, "add_generation_prompt": False}
        return Ask(None, messages, fields)

    def view(self, reply: dict[str, Any], answer: str, draft: str) -> AheadView:
        return AheadView(_into_answer(read_tokens(reply), -len(answer), ""), len(answer))


def protocol_of(reply: dict[str, Any]) -> CloudProtocol:
    """Which way a server can be read, from its reply to a prompt of several tokens sent with `echo`, `logprobs`
    and at most one new token: `echo` if it read the prompt back (more tokens than it may generate), `ahead` if it
    gave logprobs only on what it generated (llama.cpp's server ignores `echo`), `none` if it gave no logprobs."""
    tokens = read_tokens(reply)
    if not any(t.top or t.logprob is not None for t in tokens):
        return "none"
    return "echo" if len(tokens) > 1 else "ahead"


def reader_for(
    protocol: CloudProtocol, ahead_tokens: int = 4, separator: str = "", tail_only: bool = False
) -> CloudReader | None:
    """The reader for a protocol; None for `none`. `tail_only`: the server honours `logprob_start_char`."""
    if protocol == "echo":
        return EchoReader(separator, tail_only)
    if protocol == "ahead":
        return AheadReader(ahead_tokens, separator)
    if protocol == "chat":
        return ChatReader(ahead_tokens)
    return None
