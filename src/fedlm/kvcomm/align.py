"""Which transmitter layer and which transmitter token each receiver layer and token is fused with.

Two heterogeneous models differ in depth (SmolLM2 30 layers, Gemma-3 18) and in tokenizer. Layers are paired by
position (`last` or `depth`). Tokens are paired by character spans of the same text: each side computes its own
spans, the transmitter sends its spans with its cache, so the receiver never needs the transmitter's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedlm.models.token_bytes import token_bytes_table, token_starts

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


def token_spans(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], text: str) -> list[Span]:
    """Character span (start, end) of each token of `ids` inside `text`.

    A special token spelled out in `text` (a chat marker) spans its name; one the tokenizer added on its own (a
    BOS) spans nothing, (p, p).
    """
    table = token_bytes_table(tokenizer)
    names = tokenizer.convert_ids_to_tokens(list(ids))
    starts, end = token_starts(((table[i], name or "") for i, name in zip(ids, names, strict=True)), text)
    return list(zip(starts, [*starts[1:], end], strict=True))


def context_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """The text a receiver's context ids spell (chat markers written out) and each token's span in it.

    This is the text sent to the transmitter, so both models read the very same characters.
    """
    text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    spans = token_spans(tokenizer, ids, text)
    if spans and spans[-1][1] != len(text):
        raise ValueError("the receiver's tokens do not spell out their own decoded text; cannot align by characters")
    return text, spans


def encode_with_spans(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[Span]]:
    """Transmitter side: tokenise the shared text (with the tokenizer's own BOS) and return ids and spans."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return ids, token_spans(tokenizer, ids, text)


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


def fingerprint(model: PreTrainedModel) -> str:
    """A short digest of a model's cache layout and weights: a fuser is only valid for the exact pair it learned.

    Layout fields catch a different architecture; a strided sample of the embedding matrix catches different
    weights of the same architecture (a fine-tuned twin) without hashing the whole model.
    """
    config = model.config.get_text_config(decoder=True)
    layout = {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
    }
    embedding = model.get_input_embeddings().weight.detach()
    sample = embedding[:: max(1, embedding.shape[0] // 256)].to(torch.float32).contiguous()
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode())
    digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
