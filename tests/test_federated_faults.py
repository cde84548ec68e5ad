"""Federated faults handled as Flower's own strategies handle them: a node that fails or never replies is logged and
left out, an update that is broken (NaN, another rank) or far out of line (norm) is rejected before aggregation,
and the round goes on while `min_replies` usable updates remain. The record says who was left out and why.

Replies here are stand-ins with the attributes the strategy reads: a Flower `Message` cannot be built outside a
running Flower task."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from fedlm.federated import lora
from fedlm.federated.aggregators import make_aggregator
from fedlm.federated.client_app import to_record
from fedlm.federated.config import TrainConfig
from fedlm.federated.server_app import HeteroLoraStrategy, NodeInfo, RunState
from fedlm.federated.validation import far_above_median, screen, update_problem

RANK, TARGETS = 4, ("q_proj",)


def _state(seed: int, rank: int = RANK, scale: float = 0.01) -> lora.LoraState:
    rng = np.random.default_rng(seed)
    return {
        f"layers.{i}.q_proj": lora.LoraPair(
            rng.normal(0, scale, (rank, 8)).astype(np.float32), rng.normal(0, scale, (8, rank)).astype(np.float32)
        )
        for i in range(2)
    }


def _moved(state: lora.LoraState, by: float, seed: int) -> lora.LoraState:
    """`state` after a local step of size about `by`."""
    rng = np.random.default_rng(seed)
    return {
        name: lora.LoraPair(
            pair.a + rng.normal(0, by, pair.a.shape).astype(np.float32),
            pair.b + rng.normal(0, by, pair.b.shape).astype(np.float32),
        )
        for name, pair in state.items()
    }


@dataclass
class Reply:
    """What the strategy reads of a Flower reply."""

    node_id: int
    arrays: lora.LoraState | None = None
    failure: str | None = None
    metrics: dict = field(default_factory=lambda: {"num-examples": 10, "loss": 1.0})

    @property
    def metadata(self) -> SimpleNamespace:
        return SimpleNamespace(src_node_id=self.node_id)

    @property
    def error(self) -> SimpleNamespace:
        return SimpleNamespace(reason=self.failure)

    def has_error(self) -> bool:
        return self.failure is not None

    @property
    def content(self) -> dict:
        return {"arrays": to_record(self.arrays), "metrics": self.metrics}


def _strategy(nodes: int, min_replies: int = 1) -> tuple[HeteroLoraStrategy, lora.LoraState]:
    start = _state(0)
    infos = [NodeInfo(100 + p, p, "high", RANK, TARGETS, "gsm8k", f"device-{p}") for p in range(nodes)]
    state = RunState(fingerprint={}, globals={0: start}, cluster_of={p: 0 for p in range(nodes)})
    config = TrainConfig(clients=nodes, aggregator="fedavg", min_replies=min_replies)
    return HeteroLoraStrategy(config, make_aggregator("fedavg"), infos, state), start


def test_update_problems_are_named() -> None:
    sent = _state(0)
    assert update_problem(_moved(sent, 0.01, 1), sent) is None
    poisoned = _moved(sent, 0.01, 1)
    poisoned["layers.0.q_proj"].a[0, 0] = np.nan
    assert "NaN or infinite" in update_problem(poisoned, sent)
    assert "the node was sent" in update_problem(_state(1, rank=RANK + 2), sent)  # another rank
    assert "modules differ" in update_problem({"layers.0.q_proj": sent["layers.0.q_proj"]}, sent)


def test_only_a_norm_far_above_the_median_is_an_outlier() -> None:
    assert far_above_median([1.0, 1.2, 0.9, 30.0]) == [False, False, False, True]
    assert far_above_median([1.0, 30.0]) == [False, False]  # two updates: no median to stand out from
    sent = [_state(0)] * 4
    trained = [_moved(sent[0], 0.01, i) for i in range(3)] + [_moved(sent[0], 5.0, 3)]
    kept, rejected = screen([1, 2, 3, 4], trained, sent)
    assert kept == [0, 1, 2] and [entry.node_id for entry in rejected] == [4] and "median" in rejected[0].reason


def test_a_round_goes_on_without_the_nodes_that_failed_and_says_who() -> None:
    strategy, start = _strategy(nodes=5)
    good = {p: _moved(start, 0.01, p) for p in range(3)}
    poisoned = _moved(start, 0.01, 9)
    poisoned["layers.1.q_proj"].b[:] = np.inf
    replies = [Reply(100 + p, good[p]) for p in range(3)] + [Reply(103, poisoned)]  # node 104 never answers
    replies.insert(1, Reply(105, good[0]))  # a node the round did not ask is ignored
    replies.append(Reply(104, failure="CUDA out of memory"))
    record = strategy.aggregate_train(1, replies)  # type: ignore[arg-type]
    left = {entry["partition_id"]: entry["reason"] for entry in record["left_out"]}
    assert set(left) == {3, 4} and "NaN or infinite" in left[3] and "CUDA out of memory" in left[4]
    assert [c["partition_id"] for c in record["clients"]] == [0, 1, 2]
    alone, _ = _strategy(nodes=3)  # the same round with only the good nodes: the same global adapter
    alone.aggregate_train(1, [Reply(100 + p, good[p]) for p in range(3)])  # type: ignore[arg-type]
    for name, pair in strategy.state.globals[0].items():
        np.testing.assert_allclose(pair.delta(), alone.state.globals[0][name].delta(), rtol=1e-6)
    assert set(strategy.state.personal) == {0, 1, 2}  # a rejected update is not kept as anyone's adapter


def test_a_node_that_sends_nothing_in_time_is_left_out() -> None:
    strategy, start = _strategy(nodes=3)
    record = strategy.aggregate_train(1, [Reply(100, _moved(start, 0.01, 0)), Reply(101, _moved(start, 0.01, 1))])  # type: ignore[arg-type]
    assert record["left_out"] == [
        {"node_id": 102, "partition_id": 2, "name": "device-2", "reason": "no reply within the round's timeout"}
    ]


def test_too_few_usable_updates_fail_the_round_with_the_reasons() -> None:
    strategy, start = _strategy(nodes=3, min_replies=2)
    replies = [Reply(100, _moved(start, 0.01, 0)), Reply(101, failure="killed"), Reply(102, failure="timeout")]
    with pytest.raises(RuntimeError, match=r"fewer than min_replies=2.*killed"):
        strategy.aggregate_train(1, replies)  # type: ignore[arg-type]


def test_partial_participation_asks_a_seeded_sample_and_expects_only_it() -> None:
    strategy, start = _strategy(nodes=10)
    strategy.config = TrainConfig(clients=10, aggregator="fedavg", participation=0.3, min_replies=1)
    asked = strategy.sample(1)
    assert len(asked) == 3 and asked == strategy.sample(1)  # seeded: the same round asks the same nodes
    assert {n.node_id for n in strategy.sample(2)} != {n.node_id for n in asked}  # another round, another sample
    strategy.sample(1)
    replies = [Reply(node.node_id, _moved(start, 0.01, node.partition_id)) for node in asked]
    record = strategy.aggregate_train(1, replies)  # type: ignore[arg-type]
    assert record["asked"] == sorted(n.partition_id for n in asked) and record["left_out"] == []
