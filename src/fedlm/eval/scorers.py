"""Log-likelihood of a target text after a context, from a model in process or from a server over HTTP.

Both sides use one definition, so their numbers can be compared: tokenize `context + target` as the model's
tokenizer does for a prompt (special tokens included), and sum the log-probabilities of every token that carries any
character of the target. A token that straddles the boundary counts as target; formats that end the context on a
word boundary (the target starting with a space) avoid straddling tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fedlm.cloud.client import AsyncCloudClient, CloudError
from fedlm.cloud.logprobs import CloudText, read_cloud_text, read_scored
from fedlm.egress import EgressHook
from fedlm.fusion.rules import FusionRule
from fedlm.fusion.step import read_experts, score_target, target_logprobs
from fedlm.fusion.vocab import VocabAligner
from fedlm.models import LoadedModel
from fedlm.models.token_bytes import token_bytes_table, token_starts

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
        self.names = self.tokenizer.convert_ids_to_tokens(list(range(len(self.token_bytes))))

    @torch.no_grad()
    def positions(self, text: str) -> list[tuple[int, int, int, torch.Tensor | None]]:
        """(token id, start offset, end offset, distribution it was drawn from) for each token of `text`; the first
        token, which nothing predicts, has no distribution."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        logprobs = self.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        starts, end = token_starts(((self.token_bytes[i], self.names[i]) for i in ids), text)
        ends = [*starts[1:], end]
        return [(ids[i], starts[i], ends[i], logprobs[i - 1] if i else None) for i in range(len(ids))]

    def target_positions(self, context: str, target: str) -> list[tuple[int, int, torch.Tensor]]:
        """(token id, start offset, distribution it was drawn from) for each token that carries target text."""
        every = self.positions(context + target)
        if every[0][2] > len(context):
            raise ValueError("the target starts at the first token, which has no logprob: give it some context")
        return [(token, start, before) for token, start, end, before in every[1:] if end > len(context)]

    def logprob(self, context: str, target: str) -> float:
        return sum(float(before[token_id]) for token_id, _, before in self.target_positions(context, target))

    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[float]:
        out = []
        for context, target in pairs:
            out.append(self.logprob(context, target))
            if progress:
                progress(1)
        return out


class CloudScorer:
    """Scores through an OpenAI-compatible server's prompt logprobs (`echo`): the black-box path.

    Requests go out `concurrency` at a time, so a batching server can serve them together, each through `egress`
    (the caller's privacy gate; default: audited, unchanged).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        concurrency: int = 4,
        egress: EgressHook | None = None,
    ) -> None:
        self.base_url, self.api_key, self.model, self.egress = base_url, api_key, model, egress
        self.name = model or base_url
        self.concurrency = concurrency

    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[float]:
        replies = self.echo(pairs, top_logprobs=0, progress=progress)
        return [read_scored(r, c, t).target_logprob for r, (c, t) in zip(replies, pairs, strict=True)]

    def views(self, pairs: Sequence[Pair], top_logprobs: int) -> list[CloudText]:
        """The cloud's top-k candidates at each of its token starts in `context + target`, per pair."""
        texts = [c + t for c, t in pairs]
        return [read_cloud_text(reply, text) for reply, text in zip(self.echo(pairs, top_logprobs), texts, strict=True)]

    def echo(
        self, pairs: Sequence[Pair], top_logprobs: int, progress: Callable[[int], None] | None = None
    ) -> list[dict]:
        """One `echo` completion per pair, with prompt logprobs and top-k, sent `concurrency` at a time. A server
        that can (`logprob_start_char`) scores the target's tokens only: the context's are never read."""
        return asyncio.run(self._echo(pairs, top_logprobs, progress))

    async def _echo(
        self, pairs: Sequence[Pair], top_logprobs: int, progress: Callable[[int], None] | None
    ) -> list[dict]:
        gate = asyncio.Semaphore(self.concurrency)
        async with AsyncCloudClient(self.base_url, self.api_key, self.model, egress=self.egress) as client:
            self.name = await client.resolve_model()
            protocol = await client.protocol()  # one tiny request, so a server that cannot score fails at once
            if protocol != "echo":
                raise CloudError(
                    f"{self.base_url} cannot score text: it returns no prompt logprobs for `echo` (fusion can read it "
                    f"only by '{protocol}'). Scoring needs a server that echoes prompt logprobs: fedlm cloud serve, "
                    "vLLM or llama-cpp-python."
                )

            async def one(context: str, target: str) -> dict:
                fields = {"max_tokens": 0, "echo": True, "logprobs": top_logprobs, "temperature": 0}
                if client.logprob_start:
                    fields["logprob_start_char"] = len(context)
                async with gate:
                    reply = await client.complete(context + target, **fields)
                if progress:
                    progress(1)
                return reply

            return list(await asyncio.gather(*(one(context, target) for context, target in pairs)))


class FusedScorer:
    """Scores with the fused distribution: the edge in process, the cloud through its HTTP API.

    The target is read in the edge's tokens, fused where the cloud has a token start too (a shared text boundary).
    A mixture rule (the router) weighs each stretch between shared boundaries whole, each model reading it in its
    own tokens; any other rule fuses token by token over the edge vocabulary (`fusion.step.score_target`). Either
    way each factor is a proper distribution, so the sum is the code length of the target under the fused model,
    and bits per byte stay comparable with edge-only and cloud-only scores.
    """

    def __init__(
        self,
        edge: LoadedModel,
        rule: FusionRule,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        concurrency: int = 4,
        top_logprobs: int = 20,
        egress: EgressHook | None = None,
    ) -> None:
        self.edge = LocalScorer(edge)
        self.rule, self.cloud = rule, CloudScorer(base_url, api_key, model, concurrency, egress)
        self.aligner = VocabAligner(edge.tokenizer, edge.eos_ids)
        self.top_logprobs = top_logprobs
        self.name = f"{edge.name}+cloud/{rule.name}"
        self.fused_tokens = self.target_tokens = 0

    @property
    def fused_token_share(self) -> float:
        """Of the target tokens scored so far, the share the cloud informed (a shared text boundary)."""
        return round(self.fused_tokens / max(self.target_tokens, 1), 4)

    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[float]:
        views = self.cloud.views(pairs, self.top_logprobs)
        out = []
        for (context, target), view in zip(pairs, views, strict=True):
            positions = read_experts(self.aligner, self.edge.target_positions(context, target), view)
            total, informed = score_target(self.rule, positions, view, len(context + target))
            self.target_tokens += len(positions)
            self.fused_tokens += sum(informed)
            out.append(total)
            if progress:
                progress(1)
        return out


@dataclass(frozen=True)
class ReadToken:
    """One token of a text as the fused model reads it."""

    token_id: int
    start: int
    logprob: float | None  # None for the first token, which nothing predicts
    top: tuple[tuple[int, float], ...]  # the fused next-token distribution's likeliest there (token id, logprob)
    cloud_informed: bool


def fused_reading(
    edge: LocalScorer, aligner: VocabAligner, rule: FusionRule, text: str, cloud: CloudText | None, top_k: int
) -> list[ReadToken]:
    """Every token of `text` in the edge's tokens with its fused log-probability, scored as `FusedScorer` scores a
    target (`score_target`), from the edge's reading and the cloud's (`cloud`: None, the edge alone)."""
    (first, first_start, _, _), *rest = edge.positions(text)
    scored = read_experts(aligner, [(token, start, before) for token, start, _, before in rest], cloud)
    logprobs, informed = target_logprobs(rule, scored, cloud or CloudText({}), len(text))
    out = [ReadToken(first, first_start, None, (), False)]  # nothing predicts the first token
    for (token, start, experts), logprob, cloud_informed in zip(scored, logprobs, informed, strict=True):
        top: tuple[tuple[int, float], ...] = ()
        if top_k:
            values, ids = rule.fuse(experts).topk(top_k)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(ReadToken(token, start, logprob, top, cloud_informed))
    return out
