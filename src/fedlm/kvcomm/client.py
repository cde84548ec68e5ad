"""A client for a KV transmitter (`fedlm.kvcomm.service`): text out through the privacy gate, a KV blob back.

It behaves like `fedlm.cloud.client.CloudClient`: the same bearer key lookup, retries on transient failures,
`CloudError` / `CloudUnavailable` for what the server said or why it could not be reached, and every request body
leaving only as the bytes the `EgressHook` returns, so an `EgressRefused` (the `local` policy) sends nothing.
The gate may rewrite the text (redact, rephrase): the KV cache is of the text the transmitter actually read, which
the blob echoes back as `payload.text`, with token spans into that text. Use it, not the text passed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedlm.cloud.client import CloudClient, error_from
from fedlm.egress import EgressHook
from fedlm.kvcomm.wire import DEFAULT_MAX_BYTES, KVPayload, WireFormat, decode


@dataclass(frozen=True)
class Probe:
    tokens: int
    certainty: float  # exp(-entropy) of the transmitter's next token: 1 when it is sure
    seconds: float


class TransmitterClient(CloudClient):
    """Synchronous client. `model=None` asks the server which model it serves; `expect_fingerprint` refuses a blob
    from any other model (`KVWireError`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        egress: EgressHook | None = None,
        model: str | None = None,
        expect_fingerprint: str | None = None,
        timeout: float = 120.0,
        retries: int = 2,
        backoff_s: float = 0.25,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(base_url, api_key, model, timeout, retries, backoff_s, egress)
        self.expect_fingerprint, self.max_bytes = expect_fingerprint, max_bytes

    def encode(
        self, text: str, fmt: WireFormat = "fp16", layers: list[int] | None = None
    ) -> tuple[KVPayload, int, float]:
        """The transmitter's KV cache of `text`: (payload, bytes on the wire, seconds for request and decode)."""
        body = {"model": self.resolve_model(), "text": text, "format": fmt, "layers": layers}
        start = time.perf_counter()
        response = self._run(self._exchange("POST", "/kv", body))
        self.traffic.bytes_received += response.num_bytes_downloaded
        if not response.is_success:
            raise error_from(self.base_url + "/kv", response)
        blob = response.content
        payload = decode(blob, self.expect_fingerprint, self.max_bytes)
        return payload, len(blob), time.perf_counter() - start

    def probe(self, text: str) -> Probe:
        """The transmitter's length of `text` and its certainty of the next token, without any cache crossing."""
        body = {"model": self.resolve_model(), "text": text}
        start = time.perf_counter()
        response = self._run(self._exchange("POST", "/kv/probe", body))
        self.traffic.bytes_received += response.num_bytes_downloaded
        if not response.is_success:
            raise error_from(self.base_url + "/kv/probe", response)
        answer = response.json()
        return Probe(int(answer["tokens"]), float(answer["certainty"]), time.perf_counter() - start)
