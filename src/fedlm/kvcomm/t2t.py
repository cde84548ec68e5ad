"""The text-to-text baseline: the transmitter writes a short hint, and the receiver reads it before the context.

This is what KV communication is measured against. The transmitter must decode its hint token by token (the
receiver waits for the whole of it), and the receiver must then prefill the hint as extra context; a cache is
sent after one prefill and needs no re-reading. The hint comes from any OpenAI-compatible completion endpoint,
so it crosses the same privacy gate as every other cloud request.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fedlm.cloud.client import CloudClient
from fedlm.kvcomm.select import Choose

HINT_TOKENS = 24


@dataclass(frozen=True)
class Hint:
    text: str
    seconds: float
    bytes_sent: int
    bytes_received: int


def hinted_context(context: str, hint: str) -> str:
    """The receiver's context with the transmitters' hints in front of it, one line each."""
    lines = [line.strip() for line in hint.splitlines() if line.strip()]
    return "".join(f"Hint from another model: {line}\n" for line in lines) + context


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


class TextTransmitters:
    """Several text transmitters asked at once, in parallel: their hints joined, one per line (FedRefine's T2T
    baseline with many devices). The receiver waits for the slowest; the bytes are everyone's.

    With `choose` (names -> transmitters), only those it picks for the context are asked (QoS selection).
    """

    def __init__(
        self, transmitters: list[TextTransmitter] | dict[str, TextTransmitter], choose: Choose | None = None
    ) -> None:
        self.transmitters = transmitters if isinstance(transmitters, dict) else dict(enumerate(transmitters))
        self.choose = choose
        if choose is not None and not all(isinstance(name, str) for name in self.transmitters):
            raise ValueError("to choose among text transmitters, give them by name")

    def hint(self, context: str) -> Hint:
        names = set(self.choose(context)) if self.choose else set(self.transmitters)
        chosen = [t for name, t in self.transmitters.items() if name in names]
        with ThreadPoolExecutor(max_workers=max(len(chosen), 1)) as pool:
            hints = list(pool.map(lambda t: t.hint(context), chosen))
        return Hint(
            "\n".join(h.text.strip() for h in hints if h.text.strip()),
            max((h.seconds for h in hints), default=0.0),
            sum(h.bytes_sent for h in hints),
            sum(h.bytes_received for h in hints),
        )
