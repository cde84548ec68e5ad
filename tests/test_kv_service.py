"""The KV transmitter over real loopback HTTP: auth, request validation, blob round trips, and the privacy gate
that every request body passes through before it leaves."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedlm.cloud.client import CloudError, CloudUnavailable
from fedlm.egress import AuditLog, EgressRefused
from fedlm.kvcomm.client import TransmitterClient
from fedlm.kvcomm.service import background_transmitter
from fedlm.kvcomm.wire import KVWireError, capture, encode, model_fingerprint
from fedlm.models import LoadedModel
from fedlm.privacy import EgressGate

KEY = "test-key"
TEXT = "Question: What is two plus two?\nAnswer: four"
SENSITIVE = "I'm Priya Raman, my key sk-proj-4fGh7KlMn0pQrS2tUvWx9yZaB3cD5eF returns 401."


class RecordingEgress:
    """A fake privacy gate that rewrites `text` as a redacting policy would, and records what it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def outbound(self, destination: str, body: dict[str, Any]) -> bytes:
        self.seen.append((destination, body))
        return json.dumps({**body, "text": body["text"].replace("two", "[NUMBER]")}).encode()

    def inbound(self, destination: str, body: dict[str, Any]) -> dict[str, Any]:
        return body


@pytest.fixture(scope="module")
def url(tiny_llama: LoadedModel) -> Iterator[str]:
    with background_transmitter(tiny_llama, api_key=KEY) as base:
        yield base


def post(url: str, body: dict[str, Any], key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/kv", json=body, headers=headers)


def test_health_is_open_and_v1_needs_the_key(url: str, tiny_llama: LoadedModel) -> None:
    health = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert health == {"status": "ok", "model": "tiny-llama", "fingerprint": model_fingerprint(tiny_llama)}
    for key in (None, "wrong"):
        response = post(url, {"model": "tiny-llama", "text": TEXT}, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    listed = httpx.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in listed["data"]] == ["tiny-llama"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny-llama", "text": TEXT, "temperature": 0}, 400, "temperature"),
        ({"model": "tiny-llama", "text": TEXT, "format": "int3"}, 400, "format"),
        ({"model": "tiny-llama", "text": ""}, 400, "text"),
        ({"model": "tiny-llama", "text": "x" * 40_000}, 400, "text"),
        ({"model": "tiny-llama", "text": TEXT, "layers": [0, 5]}, 400, "layers.1"),  # past the last layer
        ({"model": "tiny-llama", "text": TEXT, "layers": []}, 400, "layers"),
        ({"model": "gpt-4o", "text": TEXT}, 404, "model"),
    ],
)
def test_bad_requests_get_an_openai_error_naming_the_field(
    url: str, body: dict[str, Any], status: int, param: str
) -> None:
    response = post(url, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_blob_round_trip_matches_a_local_capture(url: str, tiny_llama: LoadedModel) -> None:
    text = "Answer: four"
    local = capture(tiny_llama, text)
    client = TransmitterClient(url, KEY, RecordingEgress(), "tiny-llama", expect_fingerprint=local.fingerprint)
    with client:
        full, full_bytes, seconds = client.encode(text, "fp16")
        part, part_bytes, _ = client.encode(text, "int8", layers=[1])
    assert (full.text, full.token_ids, full.layers, seconds > 0) == (text, local.token_ids, [0, 1], True)
    for a, b in zip(full.keys + full.values, local.keys + local.values, strict=True):
        assert torch.allclose(a, b, atol=1e-2)
    assert full_bytes == len(encode(local, "fp16")) and part_bytes == len(encode(local, "int8", [1]))
    assert part.layers == [1] and torch.allclose(part.kv(1)[1], local.kv(1)[1], atol=0.05)
    assert client.traffic.bytes_received == full_bytes + part_bytes


def test_every_body_passes_the_egress_hook_and_the_blob_echoes_what_was_read(url: str) -> None:
    egress = RecordingEgress()
    with TransmitterClient(url, KEY, egress=egress, model="tiny-llama") as client:
        payload, _, _ = client.encode(TEXT, "int4")
    [(destination, body)] = egress.seen
    assert destination == url + "/kv"
    assert body == {"model": "tiny-llama", "text": TEXT, "format": "int4", "layers": None}
    assert payload.text == TEXT.replace("two", "[NUMBER]")  # the redacted text the transmitter read
    assert "".join(payload.text[s:e] for s, e in payload.spans) == payload.text


def test_local_policy_keeps_a_sensitive_text_on_the_device(url: str, tmp_path: Path) -> None:
    with (
        EgressGate("local", audit=tmp_path / "audit.jsonl") as gate,
        TransmitterClient(url, KEY, egress=gate, model="tiny-llama") as client,
    ):
        with pytest.raises(EgressRefused, match="kept a request"):
            client.encode(SENSITIVE)
        assert client.traffic.requests == 0
    assert [r.action for r in AuditLog(tmp_path / "audit.jsonl").records()] == ["blocked"]


def test_errors_mirror_the_cloud_client(url: str, tiny_gemma: LoadedModel) -> None:
    with TransmitterClient(url, "wrong", egress=RecordingEgress(), model="tiny-llama") as client:
        with pytest.raises(CloudError, match="answered 401") as refused:
            client.encode(TEXT)
        assert refused.value.status == 401 and not isinstance(refused.value, CloudUnavailable)
    gemma = model_fingerprint(tiny_gemma)
    with (
        TransmitterClient(url, KEY, egress=RecordingEgress(), expect_fingerprint=gemma) as client,
        pytest.raises(KVWireError, match="not of the expected model"),
    ):
        client.encode(TEXT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with (
        TransmitterClient(closed, egress=RecordingEgress(), model="m", retries=1, backoff_s=0) as client,
        pytest.raises(CloudUnavailable, match="could not be reached"),
    ):
        client.encode(TEXT)


def test_a_text_too_long_for_the_byte_limit_is_refused_before_the_prefill(tiny_llama: LoadedModel) -> None:
    """The limit used to be checked after the prefill and the encoding: a 32 KB text held the model for minutes
    before its 400. Now the least size the blob can have is known from the token count, and checked first."""
    from fastapi.testclient import TestClient

    from fedlm.kvcomm import service

    calls = {"capture": 0}
    real_capture = service.capture

    def counted_capture(*args: Any, **kwargs: Any) -> Any:
        calls["capture"] += 1
        return real_capture(*args, **kwargs)

    client = TestClient(service.create_transmitter_app(tiny_llama, max_bytes=2_000))
    service.capture = counted_capture  # type: ignore[assignment]
    try:
        response = client.post("/v1/kv", json={"model": "tiny-llama", "text": "word " * 30})
    finally:
        service.capture = real_capture  # type: ignore[assignment]
    assert response.status_code == 400 and response.json()["error"]["code"] == "kv_too_large"
    assert "at least" in response.json()["error"]["message"] and calls["capture"] == 0


def test_a_probe_reports_the_certainty_and_the_cache_that_follows_is_the_same_read(
    url: str, tiny_llama: LoadedModel
) -> None:
    local = capture(tiny_llama, TEXT)
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=torch.tensor([local.token_ids])).logits[0, -1]
    assert local.certainty == pytest.approx(float((logits.softmax(-1) * logits.log_softmax(-1)).sum().exp()))
    assert 1 / len(tiny_llama.tokenizer) <= local.certainty <= 1
    with TransmitterClient(url, api_key=KEY) as client:
        probe = client.probe(TEXT)
        assert (probe.tokens, probe.certainty) == (len(local.token_ids), pytest.approx(local.certainty, abs=1e-6))
        assert client.traffic.bytes_received > 0 and client.traffic.bytes_sent > 0
        payload, _, _ = client.encode(TEXT)  # served from the probe's read
    torch.testing.assert_close(payload.keys[0], local.keys[0], atol=2e-3, rtol=1e-2)  # fp16 on the wire
    assert payload.certainty == pytest.approx(local.certainty, abs=1e-6)  # stated in the blob's header too
    response = httpx.post(
        url + "/kv/probe", json={"model": "tiny-llama", "text": ""}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "text"
