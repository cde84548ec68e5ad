"""The KV wire format: a transmitter's KV cache as one self-describing, checksummed blob.

Layout: `FLKV` magic, format version (u16), header length (u32), a JSON header, a safetensors body, and a sha256
over everything before it. The header says which model made the cache (name and a fingerprint of its config and
vocabulary), its layer and head layout, sliding windows, the text with each token's id and character span, the
quantisation and which layers are present, so a receiver can check it and align tokens without the sender's code.

Every layer carries every token, sliding-window layers included: a fuser aligns tokens across tokenizers and needs
them all; `KVPayload.to_cache` trims sliding layers back to their window when the cache is reused by its own model.
A blob is untrusted input: `decode` answers any malformed, truncated, tampered, oversized, wrong-version or
wrong-model blob with a `KVWireError` that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, get_args
from weakref import WeakKeyDictionary

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from transformers import DynamicCache, PreTrainedTokenizerBase

from fedlm.models.loader import LoadedModel
from fedlm.models.token_bytes import token_bytes_table, token_starts

WireFormat = Literal["fp16", "int8", "int4"]
FORMATS: tuple[str, ...] = get_args(WireFormat)
FORMAT_VERSION = 3  # 2: the header states the vocabulary size, and every token id is checked against it
# 3: the header may state the sender's certainty of its next token
MAGIC = b"FLKV"
DEFAULT_MAX_BYTES = 128 * 2**20  # about 7k tokens of Gemma-3-270M in fp16
MAX_LAYERS = 1024

_PREFIX = struct.Struct(">4sHI")  # magic, version, header length
_DIGEST = 32  # sha256
_BITS = {"int8": 8, "int4": 4}
_CONFIG_NOISE = {"transformers_version", "dtype", "torch_dtype", "name_or_path"}  # not part of what a cache means


class KVWireError(ValueError):
    """A blob or payload that cannot be encoded or decoded; the message says what is wrong."""


# ---- the header -----------------------------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LayerLayout(_Frozen):
    kv_heads: int = Field(ge=1, le=4096)
    head_dim: int = Field(ge=1, le=65536)
    sliding_window: int | None = Field(default=None, ge=1)


class WireHeader(_Frozen):
    model: str
    fingerprint: str
    format: WireFormat
    source_dtype: str  # the captured cache's dtype; decoded tensors are float32
    num_layers: int = Field(ge=1, le=MAX_LAYERS)
    layers: list[int] = Field(min_length=1)  # the layers present, ascending
    layout: list[LayerLayout]  # one per model layer, present or not
    text: str
    token_ids: list[int] = Field(min_length=1)
    spans: list[tuple[int, int]]  # each token's [start, end) characters in `text`
    vocab_size: int = Field(ge=1)  # the transmitter's tokenizer: every token id lies below it
    certainty: float | None = Field(default=None, ge=0, le=1)  # exp(-entropy) of the sender's next token

    @model_validator(mode="after")
    def _consistent(self) -> WireHeader:
        _check_layout(self.num_layers, self.layers, len(self.layout))
        _check_tokens(self.text, self.token_ids, self.spans, self.vocab_size)
        return self

    @property
    def seq_len(self) -> int:
        return len(self.token_ids)


def _check_layout(num_layers: int, layers: list[int], layout_len: int) -> None:
    if layout_len != num_layers:
        raise ValueError(f"the layout lists {layout_len} layers but num_layers is {num_layers}")
    if not layers or any(b <= a for a, b in pairwise(layers)):
        raise ValueError(f"layers must be a non-empty ascending list without repeats, got {layers[:8]}")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers must lie in 0..{num_layers - 1}, got {layers[0]}..{layers[-1]}")


def _check_tokens(text: str, token_ids: list[int], spans: list[tuple[int, int]], vocab_size: int) -> None:
    if len(spans) != len(token_ids):
        raise ValueError(f"{len(token_ids)} token ids but {len(spans)} spans")
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}, the transmitter's vocabulary")
    if any(not 0 <= start <= end <= len(text) for start, end in spans):
        raise ValueError(f"a span falls outside the text ({len(text)} characters)")


# ---- the payload ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KVPayload:
    """A model's KV cache over one text. `keys[j]`/`values[j]` belong to layer `layers[j]`, shaped
    [kv_heads, seq, head_dim]; per-layer lists (`sliding_window`, `kv_heads`, `head_dims`) cover all layers."""

    model: str
    fingerprint: str
    text: str
    token_ids: list[int]
    spans: list[tuple[int, int]]
    layers: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_layers: int
    sliding_window: list[int | None]
    kv_heads: list[int]
    head_dims: list[int]
    vocab_size: int
    # exp(-entropy) of the sender's next token after the text (1: sure; 1/n: spread over n tokens): what the
    # sender's own model says of whether it knows what comes next (`/v1/kv/probe` reports it without the cache).
    certainty: float | None = None

    def __post_init__(self) -> None:
        try:
            _check_layout(self.num_layers, list(self.layers), len(self.sliding_window))
            if not len(self.kv_heads) == len(self.head_dims) == self.num_layers:
                raise ValueError(f"kv_heads and head_dims need one entry per layer ({self.num_layers})")
            _check_tokens(self.text, self.token_ids, self.spans, self.vocab_size)
            if not len(self.keys) == len(self.values) == len(self.layers):
                raise ValueError(
                    f"{len(self.layers)} layers present but {len(self.keys)} keys, {len(self.values)} values"
                )
            for layer, k, v in zip(self.layers, self.keys, self.values, strict=True):
                want = (self.kv_heads[layer], self.seq_len, self.head_dims[layer])
                if tuple(k.shape) != want or tuple(v.shape) != want:
                    raise ValueError(f"layer {layer}: keys {tuple(k.shape)}, values {tuple(v.shape)}, expected {want}")
        except ValueError as err:
            raise KVWireError(f"inconsistent KV payload: {err}") from None

    @property
    def seq_len(self) -> int:
        return len(self.token_ids)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of model layer `layer` (an absolute index, not a position in `layers`)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this payload (present: {self.layers})")
        j = self.layers.index(layer)
        return self.keys[j], self.values[j]

    def to_cache(self, dtype: torch.dtype = torch.float32) -> DynamicCache:
        """A batch-1 `DynamicCache` that the sender's own model continues from, as if it had read the text.

        Sliding-window layers keep only their window, as the model's own cache would."""
        if len(self.layers) != self.num_layers:
            raise KVWireError(f"a cache needs all {self.num_layers} layers; this payload has {len(self.layers)}")
        data = [
            (k[None].to(dtype), v[None].to(dtype)) + ((torch.tensor(w),) if w else ())
            for k, v, w in zip(self.keys, self.values, self.sliding_window, strict=True)
        ]
        return DynamicCache(ddp_cache_data=data)


_VOCAB_DIGESTS: WeakKeyDictionary[PreTrainedTokenizerBase, str] = WeakKeyDictionary()


def model_fingerprint(loaded: LoadedModel) -> str:
    """sha256 of the model config and the tokenizer vocabulary: copies of one model agree wherever they were
    loaded from, and a change of architecture or of which token an id is gives a new one (weights are not hashed).
    """
    tokenizer = loaded.tokenizer
    if tokenizer not in _VOCAB_DIGESTS:  # hashing a 262k vocabulary takes a while: once per tokenizer
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        _VOCAB_DIGESTS[tokenizer] = hashlib.sha256(vocab.encode()).hexdigest()
    config = {
        k: v for k, v in loaded.model.config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_NOISE
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(_VOCAB_DIGESTS[tokenizer].encode())
    return digest.hexdigest()


def token_spans(loaded: LoadedModel, text: str, token_ids: list[int]) -> list[tuple[int, int]]:
    """Each token's [start, end) characters in `text`; a special token the tokenizer added spans nothing."""
    table = token_bytes_table(loaded.tokenizer)
    names = loaded.tokenizer.convert_ids_to_tokens(token_ids)
    starts, end = token_starts(((table[t], n) for t, n in zip(token_ids, names, strict=True)), text)
    bounds = [min(s, len(text)) for s in [*starts, end]]  # a normalising tokenizer may count past the text
    return list(pairwise(bounds))


@torch.no_grad()
def capture(loaded: LoadedModel, text: str, fingerprint: str | None = None) -> KVPayload:
    """Prefill `text` (with the tokenizer's special tokens, as the model reads a prompt) and keep its KV cache.

    Sliding-window layers record every token, not just their window, so the payload holds each token in each layer."""
    token_ids = loaded.tokenizer(text, add_special_tokens=True)["input_ids"]
    if not token_ids:
        raise ValueError("the text has no tokens; send at least one character")
    model = loaded.model
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        if layer.is_sliding:
            layer.activate_past_recording()
    # Only the cache is wanted: `logits_to_keep=1` skips the vocabulary projection (262k wide for Gemma) elsewhere.
    ids = torch.tensor([token_ids], device=model.device)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    keys = [layer.keys[0].detach().cpu() for layer in cache.layers]
    values = [layer.values[0].detach().cpu() for layer in cache.layers]
    return KVPayload(
        model=loaded.name,
        fingerprint=fingerprint or model_fingerprint(loaded),
        text=text,
        token_ids=list(token_ids),
        spans=token_spans(loaded, text, token_ids),
        layers=list(range(len(keys))),
        keys=keys,
        values=values,
        num_layers=len(keys),
        sliding_window=[getattr(layer, "sliding_window", None) if layer.is_sliding else None for layer in cache.layers],
        kv_heads=[k.shape[0] for k in keys],
        head_dims=[k.shape[-1] for k in keys],
        vocab_size=len(loaded.tokenizer),
        certainty=float(certainty(logits)),
    )


def certainty(logits: torch.Tensor) -> torch.Tensor:
    """exp(-entropy) of next-token distributions (over the last dimension): a model's own sense of whether it knows
    what comes next, 1 when sure and 1/n when spread evenly over n tokens."""
    logprobs = logits.float().log_softmax(-1)
    return (logprobs.exp() * logprobs).sum(-1).exp().clamp(max=1.0)  # a sure one may round past 1


# ---- quantisation: per channel (kv head x head dim), over the tokens ------------------------------------------


def _quantize(x: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Asymmetric min/max quantisation per channel; scale and zero are rounded to fp16 first so that the encoder
    quantises with exactly the values the decoder will use."""
    levels = 2**bits - 1
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    zero, scale = lo.half(), ((hi - lo) / levels).half()
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise KVWireError("KV values exceed the fp16 range of the quantisation scales")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - zero.float()) / scale.float()).clamp(0, levels).to(torch.uint8)
    if bits == 4:
        q = torch.nn.functional.pad(q, (0, q.shape[-1] % 2))
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return {"": q, ".scale": scale, ".zero": zero}


def _dequantize(parts: dict[str, torch.Tensor], bits: int, head_dim: int) -> torch.Tensor:
    q = parts[""]
    if bits == 4:
        q = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)[..., :head_dim]
    return q.float() * parts[".scale"].float() + parts[".zero"].float()


def _expected_tensors(header: WireHeader) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every body tensor the header implies; the body must hold exactly these."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for layer in header.layers:
        heads, dim = header.layout[layer].kv_heads, header.layout[layer].head_dim
        for kind in "kv":
            name = f"{kind}.{layer}"
            if header.format == "fp16":
                out[name] = (torch.float16, (heads, header.seq_len, dim))
                continue
            packed = dim if header.format == "int8" else (dim + 1) // 2
            out[name] = (torch.uint8, (heads, header.seq_len, packed))
            out[name + ".scale"] = out[name + ".zero"] = (torch.float16, (heads, 1, dim))
    return out


# ---- encode / decode ------------------------------------------------------------------------------------------


def encode(
    payload: KVPayload, fmt: WireFormat = "fp16", layers: list[int] | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The blob for `payload` in `fmt`, keeping only `layers` (absolute indices; default: all it has)."""
    if fmt not in FORMATS:
        raise KVWireError(f"unknown wire format {fmt!r}; choose one of {', '.join(FORMATS)}")
    keep = sorted(set(payload.layers if layers is None else layers))
    missing = [layer for layer in keep if layer not in payload.layers]
    if not keep or missing:
        raise KVWireError(f"layers {missing or keep} are not in the payload (present: {payload.layers})")
    header = WireHeader(
        model=payload.model,
        fingerprint=payload.fingerprint,
        format=fmt,
        source_dtype=str(payload.keys[0].dtype).removeprefix("torch."),
        num_layers=payload.num_layers,
        layers=keep,
        layout=[
            LayerLayout(kv_heads=h, head_dim=d, sliding_window=w)
            for h, d, w in zip(payload.kv_heads, payload.head_dims, payload.sliding_window, strict=True)
        ],
        text=payload.text,
        token_ids=list(payload.token_ids),
        spans=[tuple(s) for s in payload.spans],
        vocab_size=payload.vocab_size,
        certainty=payload.certainty,
    )
    tensors: dict[str, torch.Tensor] = {}
    for layer in keep:
        for kind, x in zip("kv", payload.kv(layer), strict=True):
            x = x.detach().float()
            if not torch.isfinite(x).all():
                raise KVWireError(f"layer {layer} {'keys' if kind == 'k' else 'values'} hold NaN or infinite values")
            if fmt == "fp16":
                tensors[f"{kind}.{layer}"] = x.half()
                if not torch.isfinite(tensors[f"{kind}.{layer}"]).all():
                    raise KVWireError(f"layer {layer} holds values beyond the fp16 range; use int8 or int4")
                continue
            for suffix, part in _quantize(x, _BITS[fmt]).items():
                tensors[f"{kind}.{layer}{suffix}"] = part.contiguous()
    try:
        head = header.model_dump_json().encode()
    except UnicodeEncodeError as err:
        raise KVWireError(f"the text cannot be encoded as UTF-8: {err}") from None
    blob = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + save_tensors(tensors)
    blob += hashlib.sha256(blob).digest()
    if len(blob) > max_bytes:
        raise KVWireError(
            f"the blob would be {len(blob):,} bytes, over the {max_bytes:,}-byte limit: "
            "send fewer tokens or layers, a smaller format (int8, int4), or raise max_bytes"
        )
    return blob


def _split(blob: bytes, max_bytes: int) -> tuple[WireHeader, bytes]:
    """Check the envelope and the checksum, parse the header; return it with the (still unread) body."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise KVWireError(f"a KV blob is bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) > max_bytes:
        raise KVWireError(f"the blob is {len(blob):,} bytes, over the {max_bytes:,}-byte limit (raise max_bytes)")
    if len(blob) < _PREFIX.size + _DIGEST:
        raise KVWireError(f"truncated blob: {len(blob)} bytes is shorter than the fixed envelope")
    magic, version, head_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise KVWireError(f"not a fedlm KV blob: it starts with {magic!r}, not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise KVWireError(f"KV wire version {version} is not supported; this build reads version {FORMAT_VERSION}")
    if _PREFIX.size + head_len + _DIGEST > len(blob):
        raise KVWireError(f"truncated blob: the header claims {head_len:,} bytes, more than the blob holds")
    if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
        raise KVWireError("checksum mismatch: the blob was corrupted or truncated in transit")
    try:
        header = WireHeader.model_validate_json(blob[_PREFIX.size : _PREFIX.size + head_len])
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise KVWireError(f"malformed header: {where + ': ' if where else ''}{message}") from None
    return header, blob[_PREFIX.size + head_len : -_DIGEST]


def read_header(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> WireHeader:
    """The checked header of a blob, without reading its tensors."""
    return _split(blob, max_bytes)[0]


def decode(blob: bytes, expect_fingerprint: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> KVPayload:
    """The payload in `blob`, as float32 tensors; with `expect_fingerprint`, only a cache of that exact model."""
    header, body = _split(blob, max_bytes)
    if expect_fingerprint is not None and header.fingerprint != expect_fingerprint:
        raise KVWireError(
            f"the blob is a cache of model {header.model!r} (fingerprint {header.fingerprint[:16]}…), "
            f"not of the expected model (fingerprint {expect_fingerprint[:16]}…)"
        )
    try:
        tensors = load_tensors(body)
    except Exception as err:  # safetensors raises its own error types for a malformed body
        raise KVWireError(f"malformed body: not a safetensors file ({type(err).__name__}: {err})") from None
    expected = _expected_tensors(header)
    if set(tensors) != set(expected):
        raise KVWireError(
            f"the body's tensors do not match the header: missing {sorted(set(expected) - set(tensors))[:4]}, "
            f"unexpected {sorted(set(tensors) - set(expected))[:4]}"
        )
    for name, (dtype, shape) in expected.items():
        if tensors[name].dtype != dtype or tuple(tensors[name].shape) != shape:
            raise KVWireError(
                f"tensor {name} is {tensors[name].dtype} {tuple(tensors[name].shape)}; the header implies "
                f"{dtype} {shape}"
            )
    keys, values = [], []
    for layer in header.layers:
        for kind, out in (("k", keys), ("v", values)):
            name = f"{kind}.{layer}"
            if header.format == "fp16":
                out.append(tensors[name].float())
            else:
                parts = {suffix: tensors[name + suffix] for suffix in ("", ".scale", ".zero")}
                out.append(_dequantize(parts, _BITS[header.format], header.layout[layer].head_dim))
            if not torch.isfinite(out[-1]).all():
                raise KVWireError(f"tensor {name} holds NaN or infinite values")
    return KVPayload(
        model=header.model,
        fingerprint=header.fingerprint,
        text=header.text,
        token_ids=list(header.token_ids),
        spans=[tuple(s) for s in header.spans],
        layers=list(header.layers),
        keys=keys,
        values=values,
        num_layers=header.num_layers,
        sliding_window=[entry.sliding_window for entry in header.layout],
        kv_heads=[entry.kv_heads for entry in header.layout],
        head_dims=[entry.head_dim for entry in header.layout],
        vocab_size=header.vocab_size,
        certainty=header.certainty,
    )


def least_bytes(kv_heads: list[int], head_dims: list[int], tokens: int, fmt: WireFormat, layers: list[int]) -> int:
    """The fewest bytes a blob of `tokens` tokens in `fmt` with `layers` can take (its tensors alone), known before
    any cache is computed: a request that cannot fit is refused before the prefill, not after it."""
    per_value = {"fp16": 2.0, "int8": 1.0, "int4": 0.5}[fmt]
    return int(sum(2 * kv_heads[layer] * head_dims[layer] * tokens * per_value for layer in layers))


def bytes_per_token(payload: KVPayload, fmt: WireFormat = "fp16", layers: list[int] | None = None) -> float:
    """Wire bytes per token of `payload` in `fmt` with `layers`: header, scales and checksum included."""
    return len(encode(payload, fmt, layers, max_bytes=2**62)) / payload.seq_len
