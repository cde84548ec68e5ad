"""Which transmitters to ask, within a latency and bandwidth budget (QoS-aware selection).

Every transmitter costs time (its link's round trip, its prefill, and its blob over the link's measured speed) and
bytes, and brings an estimated value. Transmitters are asked in parallel, so a subset's latency is its slowest
member's and its bytes are the sum. With the handful of transmitters a receiver knows, every subset is tried: the
answer is exact.

The value is either fixed per transmitter (how much its fuser lowered the receiver's held-out loss in training,
`fuser_value`) or weighed per question (`ValueSelector`): each transmitter is probed with the text first and
reports how sure it is of what comes next, which is what it knows about this very question. Devices that each
learned other facts differ exactly there.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import combinations

from fedlm.kvcomm.client import Probe

MAX_CANDIDATES = 12  # 4096 subsets: exhaustive search stays instant


@dataclass(frozen=True)
class LinkEstimate:
    """What the receiver has measured about one transmitter, and what it expects the transmitter to add."""

    name: str
    value: float  # expected benefit, e.g. held-out loss reduction (nats/token) of its fuser; <= 0 is never worth it
    rtt_s: float  # round trip plus the transmitter's prefill, measured on a small request
    bytes_per_s: float  # measured transfer speed of the link
    bytes_per_token: float  # of the wire format and layer subset the transmitter will use

    def cost(self, tokens: int) -> tuple[float, float]:
        """(seconds, bytes) to receive this transmitter's cache of `tokens` context tokens."""
        size = self.bytes_per_token * tokens
        return self.rtt_s + size / self.bytes_per_s, size


@dataclass(frozen=True)
class Selection:
    names: tuple[str, ...]
    value: float
    seconds: float
    bytes: float

    def mask(self, candidates: list[LinkEstimate]) -> dict[str, bool]:
        """The participation mask: True for each chosen transmitter."""
        return {c.name: c.name in self.names for c in candidates}


def select(
    candidates: list[LinkEstimate], tokens: int, latency_budget_s: float, byte_budget: float = float("inf")
) -> Selection:
    """The subset with the most total value whose parallel latency and total bytes fit the budgets.

    Ties go to the faster, then smaller subset. The empty selection (receiver alone) always fits.
    """
    if len(candidates) > MAX_CANDIDATES:
        raise ValueError(f"at most {MAX_CANDIDATES} transmitters can be weighed, got {len(candidates)}")
    if len({c.name for c in candidates}) != len(candidates):
        raise ValueError("transmitter names must be distinct")
    if tokens < 0 or latency_budget_s < 0 or byte_budget < 0:
        raise ValueError("tokens and budgets must be non-negative")
    for c in candidates:
        if c.bytes_per_s <= 0 or c.rtt_s < 0 or c.bytes_per_token < 0:
            raise ValueError(f"transmitter {c.name!r}: link speed must be positive and costs non-negative")
    best = Selection((), 0.0, 0.0, 0.0)
    useful = [c for c in candidates if c.value > 0]
    for size in range(1, len(useful) + 1):
        for subset in combinations(useful, size):
            costs = [c.cost(tokens) for c in subset]
            seconds, total = max(s for s, _ in costs), sum(b for _, b in costs)
            if seconds > latency_budget_s or total > byte_budget:
                continue
            option = Selection(tuple(c.name for c in subset), sum(c.value for c in subset), seconds, total)
            if (option.value, -option.seconds, -option.bytes) > (best.value, -best.seconds, -best.bytes):
                best = option
    return best


def fuser_value(extra: dict) -> float:
    """A fuser's expected benefit: how far its best held-out loss fell below the receiver alone's (nats/token)."""
    curve = extra.get("curve") or {}
    alone, losses = curve.get("receiver_alone_loss"), curve.get("eval_loss") or []
    return max(alone - min(losses), 0.0) if alone is not None and losses else 0.0


def probe_link(
    name: str, value: float, encode: Callable[[str], tuple[int, int, float]], text: str, floor_s: float = 1e-4
) -> LinkEstimate:
    """Measure a transmitter: `encode(text)` returns (tokens, wire bytes, seconds) of one real request.

    A one-character request gives the round trip (with a near-empty prefill); the full text gives the rest. The
    difference in time over the difference in bytes is the link speed as the receiver sees it (prefill included,
    so it errs on the slow side).
    """
    _, small_bytes, small_s = encode(".")
    tokens, big_bytes, big_s = encode(text)
    extra_bytes, extra_s = max(big_bytes - small_bytes, 1), max(big_s - small_s, floor_s)
    return LinkEstimate(name, value, small_s, extra_bytes / extra_s, big_bytes / max(tokens, 1))


Choose = Callable[[str], Collection[str]]  # the text to be sent -> the names of the transmitters to ask
Prober = Callable[[str], Probe]  # text -> its length in the transmitter's tokens and the transmitter's certainty


class ValueSelector:
    """Per text: probe every transmitter at once, take each one's certainty as its value, and `select` the best set
    within the budgets, with the costs measured on the links. Every choice is kept (`chosen`) for the record."""

    def __init__(
        self,
        links: Sequence[LinkEstimate],
        probes: Mapping[str, Prober],
        latency_budget_s: float,
        byte_budget: float = float("inf"),
    ) -> None:
        if {link.name for link in links} != set(probes):
            raise ValueError("every link needs a probe, and every probe a link")
        self.links, self.probes = list(links), dict(probes)
        self.latency_budget_s, self.byte_budget = latency_budget_s, byte_budget
        self.chosen: list[Selection] = []
        self.values: list[dict[str, float]] = []

    def __call__(self, text: str) -> Selection:
        with ThreadPoolExecutor(max_workers=len(self.links) or 1) as pool:
            probed = dict(zip(self.probes, pool.map(lambda probe: probe(text), self.probes.values()), strict=True))
        tokens = max((p.tokens for p in probed.values()), default=0)
        weighed = [replace(link, value=probed[link.name].certainty) for link in self.links]
        selection = select(weighed, tokens, self.latency_budget_s, self.byte_budget)
        self.values.append({name: round(p.certainty, 4) for name, p in probed.items()})
        self.chosen.append(selection)
        return selection

    def names(self, text: str) -> tuple[str, ...]:
        """The names of the transmitters chosen for `text`: a `Choose` for `KVReceiver` and `TextTransmitters`."""
        return self(text).names
