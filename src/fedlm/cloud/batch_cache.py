"""Row surgery on a transformers `DynamicCache`, so requests can join and leave a running batch.

Every row of a batch is a left-padded, right-aligned sequence: the cache's time axis is a shared "virtual" length
and a 2-D attention mask marks each row's padding. Under that invariant two batches merge by left-padding the
shorter one's keys and values with (masked) zeros, a finished row leaves by indexing, and columns that are padding
in every row can be cut from the left. Sliding-window layers keep only the last `sliding_window - 1` positions of
the virtual sequence and count the whole of it in `cumulative_length`; the same right alignment keeps them exact.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

SUPPORTED = (DynamicLayer, DynamicSlidingWindowLayer)


def can_edit(cache: DynamicCache) -> bool:
    """Only plain dynamic layers (full or sliding) are understood here; anything else is left alone."""
    return all(type(layer) in SUPPORTED and layer.is_initialized for layer in cache.layers)


def _length(layer: DynamicLayer) -> int:
    return layer.cumulative_length if isinstance(layer, DynamicSlidingWindowLayer) else layer.keys.shape[-2]


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[-2]
    if missing <= 0:
        return tensor
    pad = tensor.new_zeros((*tensor.shape[:-2], missing, tensor.shape[-1]))
    return torch.cat([pad, tensor], dim=-2)


def merge(first: DynamicCache, second: DynamicCache) -> DynamicCache:
    """Stack the rows of `second` under those of `first` (in place on `first`), aligning them on the right."""
    for a, b in zip(first.layers, second.layers, strict=True):
        virtual = max(_length(a), _length(b))
        stored = max(a.keys.shape[-2], b.keys.shape[-2])
        a.keys = torch.cat([_left_pad(a.keys, stored), _left_pad(b.keys, stored)], dim=0)
        a.values = torch.cat([_left_pad(a.values, stored), _left_pad(b.values, stored)], dim=0)
        if isinstance(a, DynamicSlidingWindowLayer):
            a.cumulative_length = virtual
    return first


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    cache.batch_select_indices(rows)


def drop_left(cache: DynamicCache, columns: int) -> None:
    """Forget the first `columns` positions of the virtual sequence (they must be padding in every row)."""
    if columns <= 0:
        return
    for layer in cache.layers:
        virtual = _length(layer) - columns
        stored = layer.keys.shape[-2]
        cut = max(0, stored - virtual)  # a sliding layer may not hold the dropped positions at all
        layer.keys, layer.values = layer.keys[..., cut:, :], layer.values[..., cut:, :]
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = virtual
