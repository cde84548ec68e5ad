"""What the cloud said about a text, read from an OpenAI legacy completion with `logprobs` (and `echo`).

The legacy format names candidates by string, not bytes: a partial UTF-8 token is spelled `bytes:\\xNN...`, and
an end-of-text token is spelled by its name. Both are turned back into what they mean for the text.
"""

from __future__ import annotations

import re
from typing import Any

from fedlm.fusion.vocab import CloudCandidate

END_OF_TEXT = {"<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"}
_HEX = re.compile(r"\\x([0-9a-fA-F]{2})")


def candidate(token: str, logprob: float) -> CloudCandidate:
    if token in END_OF_TEXT:
        return CloudCandidate(b"", logprob, special=True)
    if token.startswith("bytes:"):
        return CloudCandidate(bytes(int(h, 16) for h in _HEX.findall(token)), logprob)
    return CloudCandidate(token.encode(), logprob)


def next_token_views(response: dict[str, Any], start_offset: int = 0) -> dict[int, list[CloudCandidate]]:
    """Map each character offset where a cloud token starts to the cloud's candidates for that token.

    With `echo`, offsets count from the start of the prompt. Without it they count from the end of the prompt,
    so pass `start_offset=len(prompt)`.
    """
    logprobs = (response.get("choices") or [{}])[0].get("logprobs") or {}
    offsets, tops = logprobs.get("text_offset") or [], logprobs.get("top_logprobs") or []
    views: dict[int, list[CloudCandidate]] = {}
    for offset, top in zip(offsets, tops, strict=False):
        if top:
            ranked = sorted(top.items(), key=lambda item: -item[1])
            views[start_offset + offset] = [candidate(token, value) for token, value in ranked]
    return views
