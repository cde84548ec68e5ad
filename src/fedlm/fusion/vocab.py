"""Project a cloud model's top-k next-token candidates onto the edge model's vocabulary.

The two models tokenize differently, so a cloud candidate rarely names an edge token. Both, though, name a piece of
next text as bytes. A cloud candidate with bytes `c` says "the text goes on with c"; an edge token with bytes `e`
agrees with it when one is a prefix of the other (`" Pa"` agrees with `" P"`, `" Pa"` and `" Paris"`). The
candidate's probability is shared among its agreeing edge tokens in proportion to the edge's own probabilities:
the cloud says which text comes next, the edge says how its tokens spell that text.

A candidate whose bytes are exactly an edge token goes to that token alone. A candidate longer than one edge token
(" Kampala" where the edge has " Kamp" + "ala") goes to the first token of the edge's own spelling of that text:
that is the token the edge would write first if the text went on that way, and shared by the edge's probabilities
among " K", " Ka" and " Kamp" the cloud's belief would mostly land on " K", a different word. The cloud reveals
only its top-k; the rest of its mass, `1 - sum(top-k)`, is not dropped but spread over the edge tokens that no
candidate claimed, following the edge's distribution. The projection is thus a proper distribution, and when both
sides are the same model it gives back exactly the edge's own distribution, so fusing a model with itself changes
nothing.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from fedlm.cloud.logprobs import CloudCandidate
from fedlm.models.token_bytes import token_bytes_table


@dataclass(frozen=True)
class Projection:
    logprobs: torch.Tensor  # [edge vocab], log-probabilities that sum to one
    seen_mass: float  # how much of the cloud's probability the top-k covered
    entropy: float  # the cloud's own entropy, from its top-k and one bucket for the unseen rest (nats)


class VocabAligner:
    """Built once per edge tokenizer; `project` runs per position."""

    def __init__(self, edge_tokenizer, edge_eos_ids: list[int]) -> None:
        table = token_bytes_table(edge_tokenizer)
        self.tokenizer, self.table = edge_tokenizer, table
        self._first: dict[bytes, int | None] = {}
        self.special = {edge_tokenizer.convert_ids_to_tokens(i).encode(): i for i in edge_tokenizer.all_special_ids}
        self.vocab_size = len(table)
        self.eos_ids = list(edge_eos_ids)
        self.exact: dict[bytes, int] = {}
        for token_id, raw in enumerate(table):
            if raw:
                self.exact.setdefault(raw, token_id)
        ordered = sorted((raw, i) for i, raw in enumerate(table) if raw)
        self.sorted_bytes = [raw for raw, _ in ordered]
        self.sorted_ids = torch.tensor([i for _, i in ordered], dtype=torch.long)
        self.max_token_len = max(len(raw) for raw in self.sorted_bytes)

    def agreeing(self, raw: bytes) -> torch.Tensor:
        """Edge token ids whose bytes are a prefix of `raw` or start with `raw`."""
        prefixes = [
            self.exact[raw[:n]] for n in range(1, min(len(raw), self.max_token_len) + 1) if raw[:n] in self.exact
        ]
        lo = bisect.bisect_left(self.sorted_bytes, raw)
        hi = bisect.bisect_left(self.sorted_bytes, raw + b"\xff" * self.max_token_len)
        extending = self.sorted_ids[lo:hi]
        return torch.unique(torch.cat([torch.tensor(prefixes, dtype=torch.long), extending]))

    def targets(self, candidate: CloudCandidate) -> torch.Tensor:
        """The edge tokens a candidate speaks for: its exact twin if the edge has one, else all that agree."""
        if candidate.special:
            return torch.tensor(self.eos_ids[:1], dtype=torch.long)
        if not candidate.raw:
            return torch.empty(0, dtype=torch.long)
        if candidate.raw in self.special:  # a control token both sides know by name
            return torch.tensor([self.special[candidate.raw]], dtype=torch.long)
        if candidate.raw in self.exact:
            return torch.tensor([self.exact[candidate.raw]], dtype=torch.long)
        first = self.first_token(candidate.raw)
        if first is not None:
            return torch.tensor([first], dtype=torch.long)
        return self.agreeing(candidate.raw)

    def first_token(self, raw: bytes) -> int | None:
        """The first token of the edge's own spelling of `raw`, when that takes several tokens (else None)."""
        if raw not in self._first:
            try:
                ids = self.tokenizer(raw.decode("utf-8"), add_special_tokens=False)["input_ids"]
            except UnicodeDecodeError:  # a partial character: no spelling of its own
                ids = []
            spelled = len(ids) > 1 and self.table[ids[0]] and raw.startswith(self.table[ids[0]])
            self._first[raw] = ids[0] if spelled else None
        return self._first[raw]

    def project(self, candidates: list[CloudCandidate], edge_logprobs: torch.Tensor) -> Projection:
        edge_probs = edge_logprobs.exp()
        mass = torch.zeros(self.vocab_size, dtype=edge_probs.dtype)
        claimed = torch.zeros(self.vocab_size, dtype=torch.bool)
        probs = [math.exp(c.logprob) for c in candidates]
        seen = 0.0
        for candidate, p in zip(candidates, probs, strict=True):
            targets = self.targets(candidate)
            if targets.numel() == 0:
                continue  # adds no text the edge can spell: its mass stays with the unseen rest
            share = edge_probs[targets]
            total = float(share.sum())
            share = share / total if total > 0 else torch.full_like(share, 1.0 / targets.numel())
            mass.index_add_(0, targets, share * p)
            claimed[targets] = True
            seen += p
        rest = torch.where(claimed, torch.zeros_like(edge_probs), edge_probs)
        rest_total = float(rest.sum())
        mass += max(1.0 - seen, 0.0) * (rest / rest_total if rest_total > 0 else edge_probs)
        unseen = max(1.0 - sum(probs), 1e-12)
        entropy = -sum(p * math.log(p) for p in probs if p > 0) - unseen * math.log(unseen)
        return Projection(mass.clamp_min(1e-30).log() - math.log(float(mass.sum())), min(seen, 1.0), entropy)
