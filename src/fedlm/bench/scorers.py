"""Log-likelihood of a target text after a context, from a model in process or from a server over HTTP.

Both sides use one definition, so their numbers can be compared: tokenize `context + target` as the model's
tokenizer does for a prompt (special tokens included), and sum the log-probabilities of every token that carries any
character of the target. A token that straddles the boundary counts as target; formats that end the context on a
word boundary (the target starting with a space) avoid straddling tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from fedlm.cloud.client import AsyncCloudClient
from fedlm.models import LoadedModel
from fedlm.models.token_bytes import char_len, token_bytes_table

Pair = tuple[str, str]  # (context, target)


class Scorer(Protocol):
    name: str

    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[float]:
        """Summed target log-probabilities (nats), one per pair, in order."""
        ...


class LocalScorer:
    """Scores with a model loaded in this process."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.name = loaded.name
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.token_bytes = token_bytes_table(self.tokenizer)

    @torch.no_grad()
    def logprob(self, context: str, target: str) -> float:
        ids = self.tokenizer(context + target, add_special_tokens=True)["input_ids"]
        logprobs = self.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        boundary, start, total = len(context), 0, 0.0
        for i, token_id in enumerate(ids):
            end = start + char_len(self.token_bytes[token_id])
            if end > boundary:
                if i == 0:
                    raise ValueError("the target starts at the first token, which has no logprob: give it some context")
                total += float(logprobs[i - 1, token_id])
            start = end
        return total

    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[float]:
        out = []
        for context, target in pairs:
            out.append(self.logprob(context, target))
            if progress:
                progress(1)
        return out


class CloudScorer:
    """Scores through an OpenAI-compatible server's prompt logprobs (`echo`): the black-box path.

    Requests go out `concurrency` at a time, so a batching server can serve them together.
    """

    def __init__(
        self, base_url: str, api_key: str | None = None, model: str | None = None, concurrency: int = 4
    ) -> None:
        self.base_url, self.api_key, self.model = base_url, api_key, model
        self.name = model or base_url
        self.concurrency = concurrency

    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[float]:
        return asyncio.run(self._score(pairs, progress))

    async def _score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None) -> list[float]:
        gate = asyncio.Semaphore(self.concurrency)
        async with AsyncCloudClient(self.base_url, self.api_key, self.model) as client:
            self.name = await client.resolve_model()

            async def one(context: str, target: str) -> float:
                async with gate:
                    scored = await client.score(context, target)
                if progress:
                    progress(1)
                return scored.target_logprob

            return list(await asyncio.gather(*(one(c, t) for c, t in pairs)))
