"""What the cloud said about a text, read from an OpenAI legacy completion with `logprobs` (and `echo`).

The legacy format names candidates by string, not bytes: a partial UTF-8 token is spelled `bytes:\\xNN...`, and
an end-of-text token is spelled by its name. Both are turned back into what they mean for the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fedlm.fusion.vocab import CloudCandidate
from fedlm.models.token_bytes import char_len

END_OF_TEXT = {"<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"}
_HEX = re.compile(r"\\x([0-9a-fA-F]{2})")


def candidate(token: str, logprob: float) -> CloudCandidate:
    if token in END_OF_TEXT:
        return CloudCandidate(b"", logprob, special=True)
    if token.startswith("bytes:"):
        return CloudCandidate(bytes(int(h, 16) for h in _HEX.findall(token)), logprob)
    return CloudCandidate(token.encode(), logprob)


@dataclass(frozen=True)
class CloudText:
    """The cloud's reading of a text: at each character offset where one of its tokens starts, that token's
    bytes and the candidates it weighed there; `end` is where its last token ends."""

    at: dict[int, tuple[bytes, list[CloudCandidate]]]
    end: int

    def candidates_at(self, offset: int) -> list[CloudCandidate] | None:
        found = self.at.get(offset)
        return found[1] if found else None


def read_logprobs(response: dict[str, Any], start_offset: int = 0) -> CloudText:
    """Read a legacy completion's logprobs. With `echo`, offsets count from the start of the prompt; without,
    from the end of the prompt, so pass `start_offset=len(prompt)`."""
    logprobs = (response.get("choices") or [{}])[0].get("logprobs") or {}
    tokens = logprobs.get("tokens") or []
    offsets, tops = logprobs.get("text_offset") or [], logprobs.get("top_logprobs") or []
    at: dict[int, tuple[bytes, list[CloudCandidate]]] = {}
    for token, offset, top in zip(tokens, offsets, tops, strict=False):
        if top:
            ranked = sorted(top.items(), key=lambda item: -item[1])
            at[start_offset + offset] = (candidate(token, 0.0).raw, [candidate(t, v) for t, v in ranked])
    end = start_offset + (offsets[-1] + char_len(candidate(tokens[-1], 0.0).raw) if tokens and offsets else 0)
    return CloudText(at, end)
