"""Scoring with a KV receiver: alone, with a transmitter's hint in front of the context (T2T), or with transmitters'
caches fused into its context cache (C2C).

Every mode scores the same targets with the same receiver and the same code; they differ only in what the receiver
reads before the targets. Per context the scorer records the seconds (end to end: the transmitter's request, hint
generation or cache prefill and transfer, fusion, and the receiver's scoring of every target) and the bytes that
crossed the wire for the transmitters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path

from fedlm.egress import EgressHook
from fedlm.eval.scorers import Pair
from fedlm.kvcomm.receiver import KVReceiver
from fedlm.kvcomm.select import Choose
from fedlm.kvcomm.t2t import TextTransmitter, TextTransmitters, hinted_context
from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters
from fedlm.kvcomm.wire import WireFormat
from fedlm.models import LoadedModel


class KVScorer:
    """Scores targets with the receiver; consecutive pairs that share a context share one fused (or hinted) read.

    `mask` picks the transmitters whose caches are fused (none: the receiver alone), or `choose` picks them per
    context (QoS selection); `hint` (T2T) puts a transmitter's text in front of the context instead. Per context
    it records the seconds, the seconds until the (fused or hinted) context was ready, and the bytes.
    """

    def __init__(
        self,
        receiver: KVReceiver,
        mask: Mapping[str, bool] | None = None,
        hint: TextTransmitter | TextTransmitters | None = None,
        name: str = "kv",
        wire_bytes: Callable[[], int] = lambda: 0,
        choose: Choose | None = None,
    ) -> None:
        self.receiver, self.mask, self.hint, self.name, self.wire_bytes = receiver, mask or {}, hint, name, wire_bytes
        self.choose = choose
        self.tokenizer = receiver.receiver.tokenizer
        self.seconds: list[float] = []
        # until the context's cache was ready: what generating a first token would wait for, scoring aside
        self.ready_seconds: list[float] = []
        self.bytes: list[int] = []

    @property
    def bytes_per_text(self) -> float:
        """Mean wire bytes per context read so far."""
        return round(sum(self.bytes) / max(len(self.bytes), 1), 1)

    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[float]:
        out: list[float] = []
        for context, group in groupby(pairs, key=lambda pair: pair[0]):
            targets = [target for _, target in group]
            out += self._score_context(context, targets)
            if progress:
                progress(len(targets))
        return out

    def _score_context(self, context: str, targets: list[str]) -> list[float]:
        start, sent = time.perf_counter(), self.wire_bytes()
        hint_bytes = 0
        if self.hint is not None:
            hint = self.hint.hint(context)
            context, hint_bytes = hinted_context(context, hint.text), hint.bytes_sent + hint.bytes_received
        ids = self.tokenizer(context, add_special_tokens=True)["input_ids"]
        cache = self.receiver.context_cache(ids, self.mask, self.choose)
        self.ready_seconds.append(time.perf_counter() - start)
        target_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
        scores = self.receiver.target_logprobs(cache, ids[-1], target_ids)
        self.seconds.append(time.perf_counter() - start)
        self.bytes.append(self.wire_bytes() - sent + hint_bytes)
        return scores


@contextmanager
def c2c_scorer(
    receiver: LoadedModel,
    transmitter: LoadedModel,
    fuser_dir: Path | None = None,
    fmt: WireFormat = "fp16",
    name: str = "kv",
    egress: EgressHook | None = None,
) -> Iterator[KVScorer]:
    """A C2C scorer: `transmitter` served on loopback for the block, its cache fused into the receiver's context
    through the fuser in `fuser_dir` (default: the pair's trained one), every byte both ways counted, every request
    through `egress`."""
    spec = TransmitterSpec(transmitter, fuser_dir)
    with serve_transmitters(receiver, [spec], fmt, egress) as (transmitters, clients):
        client = clients[0]
        yield KVScorer(
            KVReceiver(receiver, transmitters),
            {transmitter.name: True},
            name=name,
            wire_bytes=lambda: client.traffic.bytes_received + client.traffic.bytes_sent,
        )
