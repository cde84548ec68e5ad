"""The exact UTF-8 bytes each token id contributes to decoded text.

OpenAI's logprobs carry a `bytes` field per token, scoring needs token spans inside a text, and aligning two
vocabularies needs both tokenizers' tokens as bytes. Decoding one token at a time loses bytes (a lone byte of a
multi-byte character decodes to U+FFFD), so the table is derived from the tokenizer's own decoder rules instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from weakref import WeakKeyDictionary

from transformers import PreTrainedTokenizerBase

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte is shown as one printable character; this inverts that map."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_steps(tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]


_TABLES: WeakKeyDictionary[PreTrainedTokenizerBase, list[bytes]] = WeakKeyDictionary()


def token_bytes_table(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """Bytes per token id; special tokens (BOS, EOS, chat markers) contribute no text, so they map to b"".

    Built once per tokenizer object (the engine, the scorers and the fusion loop all ask for it)."""
    if tokenizer not in _TABLES:
        _TABLES[tokenizer] = _build_table(tokenizer)
    return _TABLES[tokenizer]


def _build_table(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    steps = _decoder_steps(tokenizer)
    kinds = {step.get("type") for step in steps}
    replaces = [
        (step["pattern"]["String"], step["content"])
        for step in steps
        if step.get("type") == "Replace" and "String" in step.get("pattern", {})
    ]
    alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table: list[bytes] = []
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            table.append(b"")
        elif alphabet is not None:
            table.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode())
        elif "ByteFallback" in kinds and (match := _BYTE_PIECE.match(piece)):
            table.append(bytes([int(match.group(1), 16)]))
        else:
            for pattern, content in replaces:
                piece = piece.replace(pattern, content)
            table.append(piece.encode())
    return table


def char_len(raw: bytes) -> int:
    """Characters a token's bytes add to text: each byte that is not a UTF-8 continuation byte starts one."""
    return sum(1 for b in raw if b & 0xC0 != 0x80)


def token_starts(pieces: Iterable[tuple[bytes, str]], text: str = "", start: int = 0) -> tuple[list[int], int]:
    """Where each token starts in `text` (character offsets), and where the last one ends.

    `pieces` are (bytes, name) per token. A token advances by the characters its bytes start. A special token has
    no bytes: it advances by its name only where `text` spells that name out (a chat marker written in a prompt),
    and by nothing where the tokenizer added it on its own (a BOS).
    """
    starts, at = [], start
    for raw, name in pieces:
        starts.append(at)
        if raw:
            at += char_len(raw)
        elif name and text.startswith(name, at):
            at += len(name)
    return starts, at


def token_text(raw: bytes) -> str:
    """A token's display string; a partial UTF-8 sequence is shown as `bytes:\\xNN` as OpenAI's API does."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def complete_prefix_len(raw: bytes) -> int:
    """Length of the longest prefix of `raw` that ends on a UTF-8 character boundary."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII: is its character complete?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return len(raw) if back >= need else len(raw) - back
    return len(raw)
