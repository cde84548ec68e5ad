"""The receiving side of KV communication: fuse what the transmitters sent, then read or score with the result.

Each transmitter sends a `KVPayload` (its cache of the text it read, with its own token spans). The receiver
prefills its context, asks each participating transmitter's fuser for residuals and sums them onto its own
cache (C2C's residual fusion, extended to several transmitters as in FedRefine), then scores targets or
generates from the fused cache. Tokens are paired by character spans when the transmitter read the receiver's
very text; when it read other text (a redacted or rephrased prompt, in privacy mode), by relative position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from fedlm.kvcomm.align import Span, align_tokens, context_text
from fedlm.kvcomm.fuser import CacheFuser, add_residuals
from fedlm.kvcomm.select import Choose
from fedlm.kvcomm.wire import KVPayload
from fedlm.models import LoadedModel

Send = Callable[[str], KVPayload]  # text -> what one transmitter sends back for it


@dataclass(frozen=True)
class Transmitter:
    """One source of KV caches, with the fuser trained for it and this receiver."""

    name: str
    fuser: CacheFuser
    send: Send


def token_map(receiver_text: str, receiver_spans: Sequence[Span], payload: KVPayload) -> torch.Tensor:
    """Transmitter token paired with each receiver token of `receiver_text`.

    Same text: by character spans (`align_tokens`). Other text: each receiver span is scaled to the transmitter's
    text length first, so tokens pair by relative position in the prompt.
    """
    if payload.text == receiver_text:
        return align_tokens(receiver_spans, payload.spans)
    scale = len(payload.text) / max(len(receiver_text), 1)
    scaled = [(round(start * scale), round(end * scale)) for start, end in receiver_spans]
    return align_tokens(scaled, payload.spans)


def certainty_weights(payloads: Sequence[KVPayload]) -> list[float]:
    """How much of each transmitter's residual the receiver adds: its certainty over the surest one's.

    A device that does not know the question still sends a cache, and its fuser still moves the receiver's; summed
    at full weight, three such devices drowned the one that knew (C2C 0.29 with four devices against 0.68 with the
    device selection picked). Weighed this way the surest sender keeps its full residual, the rest in proportion,
    and a lone sender (or any without a stated certainty) is added as it is. No parameter to tune.
    """
    stated = [p.certainty for p in payloads if p.certainty is not None]
    if len(payloads) < 2 or len(stated) < len(payloads) or max(stated) <= 0:
        return [1.0] * len(payloads)
    top = max(stated)
    return [c / top for c in stated]


class KVReceiver:
    """The receiver model with its transmitters. What they are sent leaves through each one's egress hook (the
    privacy gate: it may redact or rephrase it), and each sends back the text it actually read."""

    def __init__(self, receiver: LoadedModel, transmitters: Sequence[Transmitter]) -> None:
        self.receiver, self.transmitters = receiver, list(transmitters)
        self.received: dict[str, int] = {}  # transmitter -> payload tokens received, for accounting

    @torch.no_grad()
    def context_cache(
        self, context_ids: Sequence[int], mask: Mapping[str, bool] | None = None, choose: Choose | None = None
    ) -> DynamicCache:
        """The receiver's cache of context[:-1] with the residuals of every transmitter that `mask` lets in, or
        that `choose` picks for this context's text (it may probe them first: `kvcomm.select.ValueSelector`).

        Transmitters are asked in parallel, and the receiver prefills while they work (or are probed). The last
        context token is left out (and read with the target) so that the first target token is predicted by a
        query that attends to the fused cache, as in training.
        """
        if len(context_ids) < 2:
            raise ValueError("a context needs at least two receiver tokens")
        active = [t for t in self.transmitters if mask is None or mask.get(t.name, False)]
        text, spans = context_text(self.receiver, context_ids) if active or choose else ("", [])
        with ThreadPoolExecutor(max_workers=max(len(self.transmitters), 1)) as pool:
            # the transmitters work (or are weighed) in parallel, and meanwhile the receiver reads its own context
            chosen = pool.submit(choose, text) if choose else None
            asked = [pool.submit(t.send, text) for t in active] if chosen is None else []
            own = self.receiver.model(
                input_ids=torch.tensor([list(context_ids[:-1])]), use_cache=True, logits_to_keep=1
            )
            if chosen is not None:
                names = set(chosen.result())
                active = [t for t in self.transmitters if t.name in names]
                asked = [pool.submit(t.send, text) for t in active]
            payloads = [future.result() for future in asked]
        cache = own.past_key_values
        if not active:
            return cache
        residuals = []
        for transmitter, payload, weight in zip(active, payloads, certainty_weights(payloads), strict=True):
            self.received[transmitter.name] = self.received.get(transmitter.name, 0) + payload.seq_len
            pairs = token_map(text, spans, payload)[:-1]
            kv = {layer: payload.kv(layer) for layer in payload.layers}
            fused = transmitter.fuser.residuals(cache, kv, pairs, payload.seq_len)
            residuals.append({r: (weight * k, weight * v) for r, (k, v) in fused.items()})
        return add_residuals(cache, residuals)

    @torch.no_grad()
    def target_logprobs(
        self, cache: DynamicCache, last_context_id: int, targets: Sequence[Sequence[int]]
    ) -> list[float]:
        """Summed log-probability of each target's ids after the context whose cache (minus its last token) is
        given. All targets are read in one forward pass over the cache repeated once per target: each row is padded
        on the right, and a causal model's earlier positions never see what follows them."""
        rows = [[last_context_id, *ids[:-1]] for ids in targets]
        width = max(len(row) for row in rows)
        inputs = torch.tensor([row + [last_context_id] * (width - len(row)) for row in rows])
        batch = add_residuals(cache, [])
        batch.batch_repeat_interleave(len(targets))
        logprobs = self.receiver.model(input_ids=inputs, past_key_values=batch, use_cache=True).logits.float()
        logprobs = logprobs.log_softmax(-1)
        return [
            float(logprobs[row, torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)].sum())
            for row, ids in enumerate(targets)
        ]

    @torch.no_grad()
    def generate(self, context_ids: Sequence[int], max_tokens: int, mask: Mapping[str, bool] | None = None) -> str:
        """Greedy answer from the fused context cache; the tokens it generates are the receiver's own."""
        cache = add_residuals(self.context_cache(context_ids, mask), [])
        eos = set(self.receiver.eos_ids)
        token, out = context_ids[-1], []
        for _ in range(max_tokens):
            logits = self.receiver.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            token = int(logits.logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
        return self.receiver.tokenizer.decode(out, skip_special_tokens=True)
