"""The edge model as an incremental decoder that can take back tokens.

Lookahead drafts several tokens, and fusion may reject some of them. Rolling back crops the KV cache instead of
re-reading the prompt; a cache with sliding-window layers (which have already forgotten the positions it would
need) is rebuilt from the kept tokens instead.

With a PEFT adapter on the edge model, every step yields two beliefs, the base model's and the adapted model's
(the same weights with the adapter switched off, on a cache of its own), so rules can weigh or subtract them. A rule
that never reads the base belief (`needs_base`) spares that second pass: the edge then runs once per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from fedlm.models import LoadedModel


@dataclass(frozen=True)
class Beliefs:
    """The edge's next-token log-probabilities: the base model's and, with an adapter, the adapted model's."""

    base: torch.Tensor | None  # None: the adapter-off pass was spared (no rule reads it)
    adapted: torch.Tensor | None = None

    @property
    def local(self) -> torch.Tensor:
        """What the device itself believes: the adapted model when there is one."""
        local = self.adapted if self.adapted is not None else self.base
        assert local is not None, "beliefs hold the base model's, the adapted model's, or both"
        return local


class EdgeDecoder:
    def __init__(self, loaded: LoadedModel, prompt_ids: list[int], base: bool = True) -> None:
        """`base=False` skips the adapter-off pass of an adapted model: its beliefs are then the adapted one's."""
        self.model = loaded.model
        self.has_adapter = hasattr(self.model, "disable_adapter")  # a PEFT model
        self.reads_base = self.has_adapter and base
        self.ids: list[int] = []
        self.caches: list[DynamicCache | None] = [None, None]  # [model as loaded, base with the adapter off]
        self._deferred: list[int] = []  # tokens decided but not read yet (`defer`)
        self._next = self._feed(prompt_ids)

    @property
    def next_beliefs(self) -> Beliefs:
        """The distributions over the vocabulary for the token after `ids`; deferred tokens are read first."""
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            self._feed(deferred)
        return self._next

    def defer(self, token_id: int) -> None:
        """Decide the next token now and read it when its beliefs are first asked for, so that the read can run
        where it costs nothing (beside a cloud request) rather than where it is decided."""
        self._deferred.append(token_id)

    @torch.no_grad()
    def _read(self, ids: list[int], keep: int) -> list[Beliefs]:
        """Feed `ids` in one pass; the beliefs after each of the last `keep` of them (the LM head runs there only,
        so reading a prompt computes one position's logits)."""
        tokens = torch.tensor([ids])
        out = self.model(input_ids=tokens, past_key_values=self.caches[0], use_cache=True, logits_to_keep=keep)
        self.caches[0] = out.past_key_values
        local = out.logits[0].float().log_softmax(-1)
        if self.reads_base:
            with self.model.disable_adapter():
                base = self.model(input_ids=tokens, past_key_values=self.caches[1], use_cache=True, logits_to_keep=keep)
            self.caches[1] = base.past_key_values
            beliefs = [Beliefs(b, a) for b, a in zip(base.logits[0].float().log_softmax(-1), local, strict=True)]
        elif self.has_adapter:
            beliefs = [Beliefs(None, a) for a in local]
        else:
            beliefs = [Beliefs(a) for a in local]
        self.ids += ids
        self._next = beliefs[-1]
        return beliefs

    def _feed(self, ids: list[int]) -> Beliefs:
        return self._read(ids, 1)[-1]

    def append(self, token_id: int) -> Beliefs:
        return self._feed([token_id])

    def extend(self, ids: list[int]) -> list[Beliefs]:
        """Read `ids` in one pass (a proposal to check); the beliefs each of them was weighed against. Deferred
        tokens go in the same pass."""
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            return self._read(deferred + ids, len(ids) + 1)[:-1]
        before = self._next
        after = self._read(ids, len(ids))
        return [before, *after[:-1]]

    def rollback(self, keep: int, next_beliefs: Beliefs) -> None:
        """Forget every token after the first `keep`; `next_beliefs` are the distributions that followed them."""
        self._deferred = []
        drop = len(self.ids) - keep
        if drop <= 0:
            return
        caches = [c for c in self.caches if c is not None]
        if any(getattr(layer, "is_sliding", False) for c in caches for layer in c.layers):
            kept, self.ids, self.caches = self.ids[:keep], [], [None, None]
            self._feed(kept)
        else:
            for cache in caches:
                cache.crop(-drop)
            self.ids = self.ids[:keep]
        self._next = next_beliefs
