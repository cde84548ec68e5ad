"""Reuse the KV cache of a prompt's prefix that an earlier request already read (prompt caching).

The black-box API is stateless: a client that fuses token by token sends the whole text again on every round,
each time a few tokens longer. Without this, every request re-reads the whole prompt; with it, only the tokens
after the longest prefix shared with a recent prompt. Echoed prompt logprobs of the shared part are kept with the
entry, so an `echo` request gets the same answer either way.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from fedlm.cloud.batch_cache import SUPPORTED


@dataclass
class Hit:
    length: int  # positions of the prompt whose keys and values come from the cache
    cache: DynamicCache  # a private copy holding exactly those positions
    echo: list | None  # the echo rows of tokens 1..length (TokenLogprob), when the entry has them at enough top-k


@dataclass
class _Entry:
    ids: tuple[int, ...]
    cache: DynamicCache
    echo: list | None
    top_k: int
    scored_from: int  # the first token whose echo row is scored: every row from there on is


def _scored_from(echo: list | None) -> int:
    """The first token index from which every echo row (rows are for tokens 1, 2, ...) has a logprob."""
    if echo is None:
        return 0
    first = len(echo) + 1
    while first > 1 and echo[first - 2].token.logprob == echo[first - 2].token.logprob:  # NaN: unscored
        first -= 1
    return first


def _keeps_everything(cache: DynamicCache) -> bool:
    """True when every layer still holds every position (a sliding layer that has slid cannot be cut back)."""
    for layer in cache.layers:
        if type(layer) not in SUPPORTED or not layer.is_initialized:
            return False
        if isinstance(layer, DynamicSlidingWindowLayer) and layer.keys.shape[-2] < layer.cumulative_length:
            return False
    return True


def _slice(cache: DynamicCache, rows: slice, positions: slice, length: int) -> DynamicCache:
    """A new cache of `length` positions cut from `cache`, with tensors of its own (the source stays intact)."""
    copy = DynamicCache()
    copy.layers = []
    for layer in cache.layers:
        clone = object.__new__(type(layer))
        clone.__dict__.update(layer.__dict__)
        clone.keys = layer.keys[rows, :, positions, :].clone()
        clone.values = layer.values[rows, :, positions, :].clone()
        if isinstance(layer, DynamicSlidingWindowLayer):
            clone.cumulative_length = length
        copy.layers.append(clone)
    return copy


def one_row(cache: DynamicCache, row: int, length: int) -> DynamicCache:
    """Row `row` of a left-padded batch cache, without its padding: its last `length` positions."""
    return _slice(cache, slice(row, row + 1), slice(-length, None), length)


class PrefixCache:
    """A few recent prompts with their one-row caches, most recently used last."""

    def __init__(self, capacity: int = 8, min_tokens: int = 16) -> None:
        self.capacity, self.min_tokens = capacity, min_tokens
        self.entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.hits = self.reused_tokens = 0

    def lookup(self, ids: list[int], echo_k: int | None, echo_from: int = 1) -> Hit | None:
        """The longest reusable prefix of `ids`; at least one token is always left to read. With `echo_k`, the
        entry must have scored every reused token from `echo_from` on, with at least that many candidates."""
        best, best_len = None, 0
        for entry in self.entries.values():
            common = 0
            for a, b in zip(entry.ids, ids, strict=False):
                if a != b:
                    break
                common += 1
            # the next token's distribution is read at the last reused position, so stop one short of the end
            length = min(common - 1, len(ids) - 1)
            usable = echo_k is None or (
                entry.echo is not None
                and entry.top_k >= echo_k
                and (entry.scored_from <= max(echo_from, 1) or length < max(echo_from, 1))
            )
            if usable and length > best_len:
                best, best_len = entry, length
        if best is None or best_len < self.min_tokens:
            return None
        self.entries.move_to_end(best.ids)
        self.hits += 1
        self.reused_tokens += best_len
        echo = [_trim(row, echo_k) for row in best.echo[:best_len]] if echo_k is not None and best.echo else None
        return Hit(best_len, _slice(best.cache, slice(None), slice(None, best_len), best_len), echo)

    def store(self, ids: list[int], cache: DynamicCache, echo: list | None, top_k: int) -> None:
        """Keep a one-row cache holding exactly `ids` (and its echo rows for ids[1:], if computed)."""
        if len(ids) < self.min_tokens or not _keeps_everything(cache):
            return
        key = tuple(ids)
        known = self.entries.get(key)
        if echo is None and known is not None and known.echo is not None:  # keep the echo rows read before
            echo, top_k = known.echo, known.top_k
        self.entries[key] = _Entry(key, cache, echo, top_k, _scored_from(echo))
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def _trim(row: object, k: int) -> object:
    """An echo row with its top-k cut to `k` candidates."""
    return type(row)(row.token, row.top[:k])  # type: ignore[attr-defined]
