"""The text-to-text baseline: the transmitter writes a short hint, and the receiver reads it before the context.

This is what KV communication is measured against. The transmitter must decode its hint token by token (the
receiver waits for the whole of it), and the receiver must then prefill the hint as extra context; a cache is
sent after one prefill and needs no re-reading. The hint comes from any OpenAI-compatible completion endpoint,
so it crosses the same privacy gate as every other cloud request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedlm.cloud.client import CloudClient

HINT_TOKENS = 24


@dataclass(frozen=True)
class Hint:
    text: str
    seconds: float
    bytes_sent: int
    bytes_received: int


def hinted_context(context: str, hint: str) -> str:
    """The receiver's context with the transmitter's hint in front of it."""
    return f"Hint from another model: {hint.strip()}\n{context}" if hint.strip() else context


class TextTransmitter:
    """Asks a completion endpoint to continue the context, greedily, for at most `max_tokens` tokens of one line."""

    def __init__(self, client: CloudClient, max_tokens: int = HINT_TOKENS) -> None:
        self.client, self.max_tokens = client, max_tokens

    def hint(self, context: str) -> Hint:
        sent, received = self.client.traffic.bytes_sent, self.client.traffic.bytes_received
        start = time.perf_counter()
        response = self.client.complete(context, max_tokens=self.max_tokens, temperature=0, stop=["\n"])
        return Hint(
            response["choices"][0]["text"],
            time.perf_counter() - start,
            self.client.traffic.bytes_sent - sent,
            self.client.traffic.bytes_received - received,
        )
