"""What a round may use: replies sorted into those aggregated and those left out, as Flower's own strategies treat
failures (logged and dropped, never fatal), and every update checked before it is averaged in.

An update must hold exactly the modules and shapes (rank, layout) that were sent, only finite values, and a change
whose norm is not far above the round's median: one broken or hostile device must not move every adapter.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlm.federated.lora import LoraState

log = logging.getLogger(__name__)
MAX_NORM_RATIO = 10.0  # an update whose change is this many times the round's median is rejected
MIN_FOR_MEDIAN = 3  # with fewer updates there is no median to stand out from


@dataclass(frozen=True)
class LeftOut:
    """A node whose reply the round did without, and why."""

    node_id: int
    reason: str


def update_problem(trained: LoraState, sent: LoraState) -> str | None:
    """Why `trained` must not be aggregated, or None: it must carry exactly the modules and shapes of `sent` (the
    node's rank and targets), and only finite values."""
    if set(trained) != set(sent):
        extra, missing = sorted(set(trained) - set(sent)), sorted(set(sent) - set(trained))
        return f"modules differ from those sent (unexpected {extra[:2]}, missing {missing[:2]})"
    for name, pair in trained.items():
        for part in ("a", "b"):
            got, want = getattr(pair, part), getattr(sent[name], part)
            if got.shape != want.shape:
                return f"{name}.{part} is {tuple(got.shape)}, the node was sent {tuple(want.shape)}"
            if not np.isfinite(got).all():
                return f"{name}.{part} holds NaN or infinite values"
    return None


def change_norm(trained: LoraState, sent: LoraState) -> float:
    """The Frobenius norm of the update's change to the adapter's factors."""
    return float(np.sqrt(sum(np.sum((t.a - s.a) ** 2) + np.sum((t.b - s.b) ** 2) for t, s in _pairs(trained, sent))))


def _pairs(trained: LoraState, sent: LoraState) -> list:
    return [(trained[name], sent[name]) for name in sorted(sent)]


def far_above_median(norms: Sequence[float], ratio: float = MAX_NORM_RATIO) -> list[bool]:
    """Which norms stand more than `ratio` times above the median of all of them (none, with too few to tell)."""
    if len(norms) < MIN_FOR_MEDIAN:
        return [False] * len(norms)
    median = statistics.median(norms)
    return [median > 0 and norm > ratio * median for norm in norms]


def screen(
    node_ids: Sequence[int], trained: Sequence[LoraState], sent: Sequence[LoraState], ratio: float = MAX_NORM_RATIO
) -> tuple[list[int], list[LeftOut]]:
    """Indices of the updates fit to aggregate, and the nodes whose updates were rejected, each logged."""
    rejected: dict[int, str] = {}
    for i, (update, start) in enumerate(zip(trained, sent, strict=True)):
        if (problem := update_problem(update, start)) is not None:
            rejected[i] = problem
    valid = [i for i in range(len(trained)) if i not in rejected]
    norms = [change_norm(trained[i], sent[i]) for i in valid]
    median = statistics.median(norms) if norms else 0.0
    for i, norm, outlier in zip(valid, norms, far_above_median(norms, ratio), strict=True):
        if outlier:
            rejected[i] = f"its change has norm {norm:.3g}, over {ratio:g} times the round's median ({median:.3g})"
    left_out = [LeftOut(node_ids[i], reason) for i, reason in sorted(rejected.items())]
    for entry in left_out:
        log.warning("update of node %s rejected: %s", entry.node_id, entry.reason)
    return [i for i in range(len(trained)) if i not in rejected], left_out
