"""Aggregators for LoRA adapters of possibly different ranks, each a small class with one job.

Every aggregator takes the clients' trained adapters (each at its own rank, on its own target modules) and
returns one global adapter at the largest rank; the server then truncates it to each device's rank. A module is
aggregated over the clients that adapt it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from fedlm.federated.lora import LoraPair, LoraState


@dataclass
class ClientUpdate:
    state: LoraState
    num_examples: int


class Aggregator(ABC):
    name: str

    def aggregate(self, updates: list[ClientUpdate]) -> LoraState:
        if not updates:
            raise ValueError("nothing to aggregate: no client replied")
        modules = sorted({name for update in updates for name in update.state})
        return {
            name: self.aggregate_module([(u.state[name], u.num_examples) for u in updates if name in u.state])
            for name in modules
        }

    @abstractmethod
    def aggregate_module(self, pairs: list[tuple[LoraPair, int]]) -> LoraPair:
        """Combine one module's (pair, num_examples) from each client that adapts it."""


def _weights(values: list[float]) -> np.ndarray:
    total = float(sum(values))
    return np.full(len(values), 1 / len(values)) if total == 0 else np.asarray(values, dtype=np.float64) / total


def _weighted_pairs(pairs: list[LoraPair], weights: np.ndarray) -> LoraPair:
    rank = max(pair.rank for pair in pairs)
    padded = [pair.padded(rank) for pair in pairs]
    a = sum(w * p.a.astype(np.float64) for w, p in zip(weights, padded, strict=True))
    b = sum(w * p.b.astype(np.float64) for w, p in zip(weights, padded, strict=True))
    return LoraPair(a.astype(np.float32), b.astype(np.float32))


class FedAvg(Aggregator):
    """McMahan et al.: the example-weighted mean of A and of B. Only defined when every rank is equal."""

    name = "fedavg"

    def aggregate_module(self, pairs: list[tuple[LoraPair, int]]) -> LoraPair:
        ranks = {pair.rank for pair, _ in pairs}
        if len(ranks) > 1:
            raise ValueError(f"FedAvg needs equal LoRA ranks, got {sorted(ranks)}: use zeropad, hetlora or flexlora")
        return _weighted_pairs([p for p, _ in pairs], _weights([n for _, n in pairs]))


class ZeroPad(Aggregator):
    """Pad every adapter with zero components to the largest rank, then take the example-weighted mean."""

    name = "zeropad"

    def aggregate_module(self, pairs: list[tuple[LoraPair, int]]) -> LoraPair:
        return _weighted_pairs([p for p, _ in pairs], _weights([n for _, n in pairs]))


class HetLoRA(Aggregator):
    """Cho et al. 2024: zero-pad to the largest rank and weight each client by the Frobenius norm of its ΔW = B·A.

    A client whose update carries more signal counts more; truncation back to each rank is the server's slicing.
    """

    name = "hetlora"

    def aggregate_module(self, pairs: list[tuple[LoraPair, int]]) -> LoraPair:
        norms = [float(np.linalg.norm(pair.delta())) for pair, _ in pairs]
        return _weighted_pairs([p for p, _ in pairs], _weights(norms))


class FlexLoRA(Aggregator):
    """Bai et al. 2024: average the full updates ΔW_k = B_k·A_k, then SVD back to factors of the largest rank.

    The factors are ordered by singular value, so each device's slice [:r] is the best rank-r approximation of
    the averaged update. The singular values are split evenly: B = U·√S, A = √S·Vᵀ.
    """

    name = "flexlora"

    def aggregate_module(self, pairs: list[tuple[LoraPair, int]]) -> LoraPair:
        weights = _weights([n for _, n in pairs])
        rank = max(pair.rank for pair, _ in pairs)
        # Σ w_k·B_k·A_k = [w_1·B_1 … w_K·B_K]·[A_1; …; A_K]: factor the two stacks with QR and take the SVD of the
        # small core, which gives the SVD of the full ΔW without forming the (out x in) matrix.
        b_stack = np.concatenate([w * p.b.astype(np.float64) for w, (p, _) in zip(weights, pairs, strict=True)], 1)
        a_stack = np.concatenate([p.a.astype(np.float64) for p, _ in pairs], 0)
        qb, rb = np.linalg.qr(b_stack)
        qa, ra = np.linalg.qr(a_stack.T)
        uc, s, vct = np.linalg.svd(rb @ ra.T, full_matrices=False)
        k = min(rank, len(s))  # a small layer may have fewer singular values than the rank: pad with zeros
        u, vt, root = qb @ uc[:, :k], vct[:k] @ qa.T, np.sqrt(s[:k])
        pair = LoraPair((root[:, None] * vt).astype(np.float32), (u * root).astype(np.float32))
        return pair.padded(rank)


AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FedAvg, ZeroPad, HetLoRA, FlexLoRA)}


def make_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]()
    except KeyError as err:
        raise ValueError(f"unknown aggregator {name!r}: choose one of {', '.join(AGGREGATORS)}") from err
