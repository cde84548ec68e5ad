"""Which transmitter layer and which transmitter token each receiver layer and token is fused with.

Two heterogeneous models differ in depth (SmolLM2 30 layers, Gemma-3 18) and in tokenizer. Layers are paired by
position (`last` or `depth`). Tokens are paired by character spans of the same text: each side computes its own
spans (`wire.token_spans`) and the transmitter sends its spans with its cache, so the receiver never needs the
transmitter's tokenizer.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import torch

from fedlm.kvcomm.wire import token_spans
from fedlm.models.loader import LoadedModel

LayerAlign = Literal["last", "depth"]
Span = tuple[int, int]


def layer_map(receiver_layers: int, transmitter_layers: int, mode: LayerAlign = "last") -> list[int | None]:
    """Transmitter layer per receiver layer (None: not fused).

    `last` pairs the final layers and walks backwards (C2C's terminal alignment: the deepest layers of both models
    are the most semantic); a receiver deeper than its transmitter leaves its first layers alone. `depth` pairs
    by relative depth, round(i·(T-1)/(L-1)), so every receiver layer is fused and transmitter layers repeat.
    """
    if receiver_layers < 1 or transmitter_layers < 1:
        raise ValueError(f"both models need layers, got {receiver_layers} and {transmitter_layers}")
    if mode == "last":
        shift = transmitter_layers - receiver_layers
        return [i + shift if i + shift >= 0 else None for i in range(receiver_layers)]
    if mode == "depth":
        if receiver_layers == 1:
            return [transmitter_layers - 1]
        span = receiver_layers - 1
        return [(2 * i * (transmitter_layers - 1) + span) // (2 * span) for i in range(receiver_layers)]
    raise ValueError(f"unknown layer alignment {mode!r}: use 'last' or 'depth'")


def context_text(receiver: LoadedModel, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """The text a receiver's context ids spell (chat markers written out) and each token's span in it.

    This is the text sent to the transmitter, so both models read the very same characters.
    """
    text = receiver.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    spans = token_spans(receiver, text, list(ids))
    if spans and spans[-1][1] != len(text):
        raise ValueError("the receiver's tokens do not spell out their own decoded text; cannot align by characters")
    return text, spans


def encode_with_spans(transmitter: LoadedModel, text: str) -> tuple[list[int], list[Span]]:
    """Transmitter side: tokenise the shared text (with the tokenizer's own BOS) and return ids and spans."""
    ids = transmitter.tokenizer(text, add_special_tokens=True)["input_ids"]
    return ids, token_spans(transmitter, text, ids)


def align_tokens(receiver_spans: Sequence[Span], transmitter_spans: Sequence[Span]) -> torch.Tensor:
    """Transmitter token index paired with each receiver token.

    The pair is the last transmitter token that starts before the receiver token ends: over contiguous spans, the
    one covering the receiver token's last character, so the transmitter has read at least as far as the receiver
    token reaches into the text (C2C re-tokenises each receiver token and takes its transmitter token; this is the
    same pairing computed from spans). A receiver token with no text pairs with the token just before it, and one
    at the very start with transmitter token 0. The result is monotone non-decreasing.
    """
    if not transmitter_spans:
        raise ValueError("the transmitter sent no tokens")
    starts = [start for start, _ in transmitter_spans]
    if any(a > b for a, b in pairwise(starts)):
        raise ValueError("transmitter spans must be in text order")
    return torch.tensor([max(bisect_left(starts, end) - 1, 0) for _, end in receiver_spans], dtype=torch.long)
