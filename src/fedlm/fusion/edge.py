"""The edge model as an incremental decoder that can take back tokens.

Lookahead drafts several tokens, and fusion may reject some of them. Rolling back crops the KV cache instead of
re-reading the prompt; a cache with sliding-window layers (which have already forgotten the positions it would
need) is rebuilt from the kept tokens instead.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from fedlm.models import LoadedModel


class EdgeDecoder:
    def __init__(self, loaded: LoadedModel, prompt_ids: list[int]) -> None:
        self.model = loaded.model
        self.ids: list[int] = []
        self.cache: DynamicCache | None = None
        self.forward_passes = 0
        self._next = self._feed(prompt_ids)

    @property
    def next_logprobs(self) -> torch.Tensor:
        """Log-probabilities over the vocabulary for the token after `ids`."""
        return self._next

    @torch.no_grad()
    def _feed(self, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        self.forward_passes += 1
        self.cache = out.past_key_values
        self.ids += ids
        self._next = out.logits[0, -1].float().log_softmax(-1)
        return self._next

    def append(self, token_id: int) -> torch.Tensor:
        return self._feed([token_id])

    def rollback(self, keep: int, next_logprobs: torch.Tensor) -> None:
        """Forget every token after the first `keep`; `next_logprobs` is the distribution that followed them."""
        drop = len(self.ids) - keep
        if drop <= 0:
            return
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            kept, self.ids, self.cache = self.ids[:keep], [], None
            self._feed(kept)
        else:
            self.cache.crop(-drop)
            self.ids = self.ids[:keep]
        self._next = next_logprobs
