"""The KV wire format: round trips per format and layer subset, reuse of a decoded cache by the model, and every
way a blob can be wrong (checksum, size, version, model, fuzzed bytes, tampered headers) ending in `KVWireError`."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from typer.testing import CliRunner

from fedlm.cli import app
from fedlm.cli.kv import parse_layers
from fedlm.kvcomm.wire import (
    FORMAT_VERSION,
    FORMATS,
    KVPayload,
    KVWireError,
    bytes_per_token,
    capture,
    decode,
    encode,
    model_fingerprint,
    read_header,
)
from fedlm.models import CLOUD_DEFAULT, LoadedModel, load
from fedlm.models.tiny import tiny_loaded, tiny_tokenizer

TEXT = "The capital of France is Paris. The capital of Italy is Rome."  # 18 tiny tokens: past gemma's window of 6
PREFIX = struct.Struct(">4sHI")
# Largest |error| / range of the channel's values, for each format: fp16 rounding, half a step of 255 or 15.
TOLERANCE = {"fp16": 1e-3, "int8": 0.6 / 255, "int4": 0.6 / 15}


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue("tiny_llama" if request.param == "llama" else "tiny_gemma")


@pytest.fixture(scope="module")
def payload(model: LoadedModel) -> KVPayload:
    return capture(model, TEXT)


@pytest.fixture(scope="module")
def blob(tiny_llama: LoadedModel) -> bytes:
    return encode(capture(tiny_llama, TEXT), "int4", layers=[1])


def reseal(data: bytes) -> bytes:
    """A blob whose checksum matches `data`, as a deliberate forger (not line noise) would send it."""
    return data + hashlib.sha256(data).digest()


def split(blob: bytes) -> tuple[int, dict, bytes]:
    _, version, head_len = PREFIX.unpack_from(blob)
    header = json.loads(blob[PREFIX.size : PREFIX.size + head_len])
    return version, header, blob[PREFIX.size + head_len : -32]


def join(version: int, header: dict, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return reseal(PREFIX.pack(b"FLKV", version, len(head)) + head + body)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst error per channel (kv head x head dim, over tokens), relative to that channel's range."""
    span = (a.amax(dim=1) - a.amin(dim=1)).clamp_min(1e-6)
    return ((a - b).abs().amax(dim=1) / span).max().item()


def test_capture_describes_the_model_and_text(model: LoadedModel, payload: KVPayload) -> None:
    config = model.model.config
    assert payload.token_ids == model.tokenizer(TEXT)["input_ids"]
    assert "".join(TEXT[s:e] for s, e in payload.spans) == TEXT
    assert payload.num_layers == config.num_hidden_layers == len(payload.layers)
    assert payload.kv_heads == [config.num_key_value_heads] * payload.num_layers
    expected_windows = [
        config.sliding_window if kind == "sliding_attention" else None
        for kind in getattr(config, "layer_types", ["full_attention"] * payload.num_layers)
    ]
    assert payload.sliding_window == expected_windows
    assert all(k.shape[1] == payload.seq_len for k in payload.keys)  # sliding layers keep every token too


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_per_format(payload: KVPayload, fmt: str) -> None:
    decoded = decode(encode(payload, fmt), expect_fingerprint=payload.fingerprint)
    assert (decoded.model, decoded.fingerprint, decoded.text) == (payload.model, payload.fingerprint, payload.text)
    assert (decoded.token_ids, decoded.spans, decoded.layers) == (payload.token_ids, payload.spans, payload.layers)
    assert decoded.certainty == payload.certainty is not None  # the sender's certainty travels in the header
    assert (decoded.sliding_window, decoded.kv_heads, decoded.head_dims) == (
        payload.sliding_window,
        payload.kv_heads,
        payload.head_dims,
    )
    errors = [
        relative_error(a, b) for a, b in zip(payload.keys + payload.values, decoded.keys + decoded.values, strict=True)
    ]
    assert all(d.dtype == torch.float32 for d in decoded.keys + decoded.values)
    assert max(errors) <= TOLERANCE[fmt]


def test_coarser_formats_lose_more_and_cost_less(payload: KVPayload) -> None:
    def worst(fmt: str) -> float:
        decoded = decode(encode(payload, fmt))
        return max(relative_error(a, b) for a, b in zip(payload.keys, decoded.keys, strict=True))

    assert worst("fp16") < worst("int8") < worst("int4")
    sizes = [bytes_per_token(payload, fmt) for fmt in FORMATS]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_layer_subset_carries_only_those_layers(payload: KVPayload, fmt: str) -> None:
    blob = encode(payload, fmt, layers=[1])
    assert read_header(blob).layers == [1]
    decoded = decode(blob)
    assert decoded.layers == [1] and decoded.num_layers == payload.num_layers
    assert torch.allclose(decoded.kv(1)[0], payload.kv(1)[0], atol=TOLERANCE[fmt] * 20)
    with pytest.raises(KeyError, match="layer 0 is not in this payload"):
        decoded.kv(0)
    with pytest.raises(KVWireError, match="needs all 2 layers"):
        decoded.to_cache()
    assert len(blob) < len(encode(payload, fmt))
    with pytest.raises(KVWireError, match=r"layers \[7\] are not in the payload"):
        encode(payload, fmt, layers=[7])


@torch.no_grad()
def test_the_model_continues_from_a_decoded_cache(model: LoadedModel, payload: KVPayload) -> None:
    """Next-token logits from the decoded fp16 cache match those from reading the text itself."""
    ids, nxt = torch.tensor([payload.token_ids]), torch.tensor([[5]])
    reference = model.model(torch.cat([ids, nxt], dim=1)).logits[0, -1]
    cache = decode(encode(payload, "fp16")).to_cache()
    continued = model.model(nxt, past_key_values=cache, use_cache=True).logits[0, -1]
    assert torch.allclose(continued, reference, atol=1e-3)
    assert cache.get_seq_length() == payload.seq_len + 1


def test_fingerprints_tell_models_apart_and_copies_alike(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    assert model_fingerprint(tiny_llama) != model_fingerprint(tiny_gemma)
    assert model_fingerprint(tiny_llama) == model_fingerprint(tiny_loaded("llama"))  # a separate copy
    other_vocab = LoadedModel("tiny-llama", tiny_llama.model, tiny_tokenizer(vocab_size=300))
    assert model_fingerprint(tiny_llama) != model_fingerprint(other_vocab)


def test_wrong_model_is_refused(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    blob = encode(capture(tiny_llama, TEXT))
    with pytest.raises(KVWireError, match=r"cache of model 'tiny-llama'.*not of the expected model"):
        decode(blob, expect_fingerprint=model_fingerprint(tiny_gemma))


def test_checksum_catches_corruption(blob: bytes) -> None:
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0x01
    with pytest.raises(KVWireError, match="checksum mismatch"):
        decode(bytes(corrupt))


def test_size_limit_on_decode_and_encode(payload: KVPayload) -> None:
    blob = encode(payload)
    assert decode(blob, max_bytes=len(blob)).seq_len == payload.seq_len
    with pytest.raises(KVWireError, match=r"over the .*-byte limit"):
        decode(blob, max_bytes=len(blob) - 1)
    with pytest.raises(KVWireError, match="over the 1,000-byte limit"):
        encode(payload, max_bytes=1000)


def test_wrong_version_and_magic(blob: bytes) -> None:
    version, header, body = split(blob)
    with pytest.raises(KVWireError, match=f"version {version + 1} is not supported"):
        decode(join(version + 1, header, body))
    with pytest.raises(KVWireError, match="not a fedlm KV blob"):
        decode(reseal(b"PK\x03\x04" + blob[4:-32]))


def test_inconsistent_payloads_are_refused(payload: KVPayload) -> None:
    with pytest.raises(KVWireError, match="expected"):
        KVPayload(**{**payload.__dict__, "keys": [k[:, :-1] for k in payload.keys]})
    with pytest.raises(KVWireError, match="spans"):
        KVPayload(**{**payload.__dict__, "spans": payload.spans[:-1]})
    with pytest.raises(KVWireError, match="unknown wire format 'int2'"):
        encode(payload, "int2")  # type: ignore[arg-type]
    with pytest.raises(KVWireError, match="NaN or infinite"):
        encode(KVPayload(**{**payload.__dict__, "values": [v * float("nan") for v in payload.values]}))


def test_a_forged_blob_with_nan_values_or_foreign_token_ids_is_refused(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    """Found by fuzzing: checksummed blobs whose tensors held NaN or infinity, or whose token ids lay past the
    vocabulary, decoded without complaint (and `fedlm kv inspect` passed them)."""
    version, header, body = split(encode(capture(tiny_llama, TEXT), "fp16", layers=[1]))
    tensors = load_tensors(body)
    tensors["v.1"] = tensors["v.1"].clone()
    tensors["v.1"][0, 0, 0] = float("nan")
    poisoned = join(version, header, save_tensors(tensors))
    with pytest.raises(KVWireError, match="NaN or infinite"):
        decode(poisoned)
    foreign = join(version, {**header, "token_ids": [header["vocab_size"], *header["token_ids"][1:]]}, body)
    with pytest.raises(KVWireError, match="token ids must lie in"):
        decode(foreign)
    for bad in (poisoned, foreign):
        path = tmp_path / "bad.kv"
        path.write_bytes(bad)
        assert CliRunner().invoke(app, ["kv", "inspect", str(path)]).exit_code != 0


def test_the_header_tells_the_body_apart(blob: bytes) -> None:
    """A forged header that disagrees with the body (another format) is caught by the tensor check."""
    version, header, body = split(blob)
    with pytest.raises(KVWireError, match=r"do not match the header|the header implies"):
        decode(join(version, {**header, "format": "fp16"}, body))
    with pytest.raises(KVWireError, match="malformed header: layers must be a non-empty ascending list"):
        decode(join(version, {**header, "layers": [1, 0]}, body))
    with pytest.raises(KVWireError, match="malformed body"):
        decode(join(version, header, b"\x00" * 16))


# ---- fuzzing: whatever the bytes, the answer is a payload or a KVWireError, never another exception ----------

FUZZ = settings(max_examples=150, deadline=None)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(data=st.data())
def test_fuzz_byte_flips(blob: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(blob) - 1))
    mask = data.draw(st.integers(1, 255))
    corrupt = bytearray(blob)
    corrupt[position] ^= mask
    with pytest.raises(KVWireError):
        decode(bytes(corrupt))


@FUZZ
@given(data=st.data())
def test_fuzz_truncation(blob: bytes, data: st.DataObject) -> None:
    with pytest.raises(KVWireError):
        decode(blob[: data.draw(st.integers(0, len(blob) - 1))])


@FUZZ
@given(noise=st.binary(max_size=2048), keep_prefix=st.booleans())
def test_fuzz_random_bytes(blob: bytes, noise: bytes, keep_prefix: bool) -> None:
    """Random bytes, also behind a valid magic and version, and resealed so the checksum passes."""
    with pytest.raises(KVWireError):
        decode(reseal(blob[:10] + noise) if keep_prefix else noise)


@FUZZ
@given(data=st.data())
def test_fuzz_header_tampering(blob: bytes, data: st.DataObject) -> None:
    """A resealed header with one field replaced, dropped or added decodes consistently or raises KVWireError."""
    version, header, body = split(blob)
    field = data.draw(st.sampled_from([*header, "extra"]))
    action = data.draw(st.sampled_from(["replace", "drop"]))
    tampered = dict(header)
    if action == "drop":
        tampered.pop(field, None)
    else:
        tampered[field] = data.draw(JSON)
    try:
        decoded = decode(join(version, tampered, body))
    except KVWireError:
        return
    assert decoded.seq_len == len(tampered["token_ids"])  # a harmless change (e.g. the text kept valid spans)
    assert all(k.shape[1] == decoded.seq_len for k in decoded.keys)


@FUZZ
@given(noise=st.binary(min_size=1, max_size=512))
def test_fuzz_forged_body(blob: bytes, noise: bytes) -> None:
    version, header, body = split(blob)
    with pytest.raises(KVWireError):
        decode(join(version, header, body[:8] + noise))


# ---- the CLI: make a blob in-process, then inspect it --------------------------------------------------------


WIDE = {"COLUMNS": "400"}  # rich wraps to the terminal: keep messages on one line


def test_cli_encode_then_inspect(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "blob.kv"
    made = CliRunner().invoke(
        app,
        [
            "kv",
            "encode",
            "--model",
            str(tiny_model_dir),
            "--text",
            TEXT,
            "--format",
            "int8",
            "--layers",
            "1",
            "--out",
            str(out),
        ],
    )
    assert made.exit_code == 0, made.output
    shown = CliRunner().invoke(app, ["kv", "inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)
    assert (summary["format"], summary["layers"], summary["num_layers"], summary["text"]) == ("int8", [1], 2, TEXT)
    assert summary["bytes_per_token"] == pytest.approx(out.stat().st_size / summary["tokens"])
    table = CliRunner().invoke(app, ["kv", "inspect", str(out)], env=WIDE)
    assert "bytes/token" in table.stdout and "(2, 18, 8)" in table.stdout


def test_cli_inspect_refuses_a_bad_blob(tmp_path: Path) -> None:
    bad = tmp_path / "bad.kv"
    bad.write_bytes(b"FLKV" + FORMAT_VERSION.to_bytes(2, "big") + b"\x00" * 64)
    result = CliRunner().invoke(app, ["kv", "inspect", str(bad)], env=WIDE)
    assert result.exit_code == 2 and "not a valid KV blob" in result.output
    assert "checksum mismatch" in result.output


def test_cli_layers_option_is_checked() -> None:
    assert parse_layers("0,2-4, 7") == [0, 2, 3, 4, 7]
    with pytest.raises(typer.BadParameter, match="0,2,4 or 0-8"):
        parse_layers("first")


# ---- the real Gemma-3-270M: bytes per token for each wire option ---------------------------------------------

REAL_PROMPT = (
    "Question: A farmer has 17 sheep. All but 9 run away. How many sheep does the farmer have left?\n"
    "Choices: (A) 8 (B) 9 (C) 17 (D) 26\n"
    "Think about what 'all but 9' means: every sheep except nine of them ran off, so nine remain on the farm. "
    "The number 17 is a distractor, and subtracting 9 from 17 answers a different question.\nAnswer:"
)


@pytest.mark.real
@torch.no_grad()
def test_real_gemma_bytes_per_token_and_cache_reuse() -> None:
    gemma = load(CLOUD_DEFAULT, quiet=True)
    payload = capture(gemma, REAL_PROMPT)
    half = payload.layers[::2]
    sizes = {
        (fmt, subset): bytes_per_token(payload, fmt, layers)
        for fmt in FORMATS
        for subset, layers in (("all", None), ("half", half))
    }
    print(f"\nGemma-3-270M, {payload.seq_len} tokens, bytes/token:")
    for (fmt, subset), size in sizes.items():
        print(f"  {fmt:>5} {subset:>4} layers: {size:9,.1f}  ({size / sizes['fp16', 'all']:.3f} x fp16 all)")
    assert sizes["int8", "half"] <= 0.3 * sizes["fp16", "all"]
    assert any(w for w in payload.sliding_window) and None in payload.sliding_window  # sliding and global layers
    ids = torch.tensor([payload.token_ids])
    nxt = torch.tensor([[gemma.tokenizer.convert_tokens_to_ids("▁B")]])
    reference = gemma.model(torch.cat([ids, nxt], dim=1)).logits[0, -1]
    for fmt in ("fp16", "int8"):
        cache = decode(encode(payload, fmt)).to_cache()
        continued = gemma.model(nxt, past_key_values=cache, use_cache=True).logits[0, -1]
        assert continued.argmax() == reference.argmax()
        if fmt == "fp16":
            assert torch.allclose(continued.log_softmax(-1), reference.log_softmax(-1), atol=0.05)
