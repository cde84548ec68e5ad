"""The Flower ServerApp: rounds of heterogeneous-rank LoRA training, aggregated per task cluster.

Each round the strategy sends every node the slice of its cluster's global adapter at the node's own rank and
target modules (`configure_train`), aggregates the trained adapters per cluster at the largest rank
(`aggregate_train`), and has every node evaluate its new slice on its held-out data (`configure_evaluate`).
Flower's built-in strategies keep one global ArrayRecord and cannot average arrays of different shapes, so this
strategy keeps one global adapter per cluster itself. After every round the state is checkpointed atomically.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlm import atomic
from fedlm.federated import checkpoint, lora
from fedlm.federated.aggregators import Aggregator, ClientUpdate, make_aggregator
from fedlm.federated.client_app import from_record, to_record
from fedlm.federated.clustering import choose_clusters, purity, update_similarity
from fedlm.federated.config import TrainConfig
from fedlm.federated.local import perplexity
from fedlm.federated.validation import LeftOut, screen

NODE_WAIT_SECONDS = 600.0
REPLY_TIMEOUT_SECONDS = 3600.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    partition_id: int
    budget: str
    rank: int
    targets: tuple[str, ...]
    task: str
    name: str


@dataclass
class RunState:
    """Everything a resumed run needs: written whole after each round."""

    fingerprint: dict
    round: int = 0
    globals: dict[int, lora.LoraState] = field(default_factory=dict)  # cluster -> adapter at the largest rank
    cluster_of: dict[int, int] = field(default_factory=dict)  # partition id -> cluster
    clustered: bool = False
    personal: dict[int, lora.LoraState] = field(default_factory=dict)  # partition id -> last trained adapter
    rounds: list[dict] = field(default_factory=list)


class HeteroLoraStrategy:
    """Flower-strategy-shaped: configure_train / aggregate_train / configure_evaluate over one RunState."""

    def __init__(self, config: TrainConfig, aggregator: Aggregator, nodes: list[NodeInfo], state: RunState):
        self.config, self.aggregator, self.nodes, self.state = config, aggregator, nodes, state
        self.by_node = {node.node_id: node for node in nodes}
        self.asked: dict[int, NodeInfo] = dict(self.by_node)  # the nodes asked this round

    def sample(self, server_round: int) -> list[NodeInfo]:
        """The nodes asked this round: a seeded sample of `participation` of them (at least `min_replies`)."""
        count = min(
            len(self.nodes), max(self.config.min_replies, math.ceil(self.config.participation * len(self.nodes)))
        )
        rng = np.random.default_rng([self.config.seed, server_round])
        chosen = sorted(rng.choice(len(self.nodes), size=count, replace=False).tolist())
        self.asked = {self.nodes[i].node_id: self.nodes[i] for i in chosen}
        return list(self.asked.values())

    def slice_for(self, node: NodeInfo) -> lora.LoraState:
        cluster = self.state.globals[self.state.cluster_of[node.partition_id]]
        return lora.slice_state(cluster, node.rank, node.targets)

    def _messages(self, message_type: str, server_round: int) -> list[Message]:
        config = ConfigRecord({**self.config.to_flat(), "server_round": server_round})
        return [
            Message(
                RecordDict({"arrays": to_record(self.slice_for(node)), "config": config}),
                dst_node_id=node.node_id,
                message_type=message_type,
            )
            for node in self.asked.values()
        ]

    def configure_train(self, server_round: int) -> list[Message]:
        self.sample(server_round)
        return self._messages("train", server_round)

    def configure_evaluate(self, server_round: int) -> list[Message]:
        return self._messages("evaluate", server_round)

    def aggregate_train(self, server_round: int, replies: list[Message]) -> dict:
        """Aggregate per cluster (clustering first, in the round where it is due); return the round's record.

        A node that failed, did not reply in time, or sent an update that fails `validation.screen` is logged and
        left out, as long as `min_replies` updates remain; the record names who was left out and why."""
        replies, left_out = _sorted_replies(replies, self.asked)
        nodes = [self.by_node[reply.metadata.src_node_id] for reply in replies]
        trained = [from_record(reply.content["arrays"]) for reply in replies]
        starts = [self.slice_for(node) for node in nodes]
        kept, rejected = screen([node.node_id for node in nodes], trained, starts)
        left_out += rejected
        replies, nodes = [replies[i] for i in kept], [nodes[i] for i in kept]
        trained, starts = [trained[i] for i in kept], [starts[i] for i in kept]
        if len(replies) < self.config.min_replies:
            reasons = "; ".join(f"node {entry.node_id}: {entry.reason}" for entry in left_out)
            raise RuntimeError(
                f"round {server_round}: {len(replies)} usable updates, fewer than min_replies="
                f"{self.config.min_replies} ({reasons})"
            )
        similarity = None
        if self.config.cluster == "auto" and not self.state.clustered:
            similarity = update_similarity(trained, starts)
            labels = [int(label) for label in choose_clusters(similarity, self.config.max_clusters)]
            start = self.state.globals[0]
            # a node left out of this round joins the largest cluster; its later updates count there
            largest = max(set(labels), key=labels.count)
            self.state.cluster_of = {node.partition_id: largest for node in self.nodes}
            self.state.cluster_of |= {node.partition_id: label for node, label in zip(nodes, labels, strict=True)}
            self.state.globals = {label: start for label in set(labels)}
            self.state.clustered = True
        clients = []
        for cluster in sorted(self.state.globals):
            members = [i for i, node in enumerate(nodes) if self.state.cluster_of[node.partition_id] == cluster]
            updates = [
                ClientUpdate(trained[i], starts[i], int(replies[i].content["metrics"]["num-examples"])) for i in members
            ]
            if updates:
                self.state.globals[cluster] = self.aggregator.aggregate(self.state.globals[cluster], updates)
        for node, reply, state, start in zip(nodes, replies, trained, starts, strict=True):
            self.state.personal[node.partition_id] = state
            metrics = dict(reply.content["metrics"])
            clients.append(
                {
                    "partition_id": node.partition_id,
                    "name": node.name,
                    "task": node.task,
                    "budget": node.budget,
                    "rank": node.rank,
                    "cluster": self.state.cluster_of[node.partition_id],
                    "bytes_up": lora.nbytes(state),
                    "bytes_down": lora.nbytes(start),
                    **{k: float(v) for k, v in metrics.items() if k != "num-examples"},
                }
            )
        clients.sort(key=lambda c: c["partition_id"])
        tasks = [c["task"] for c in clients]
        record = {
            "round": server_round,
            "aggregator": self.aggregator.name,
            "clients": clients,
            "bytes_up": sum(c["bytes_up"] for c in clients),
            "bytes_down": sum(c["bytes_down"] for c in clients),
            "clusters": {
                str(k): sorted(p for p, c in self.state.cluster_of.items() if c == k) for k in self.state.globals
            },
            "purity": purity([c["cluster"] for c in clients], tasks),
            "asked": sorted(node.partition_id for node in self.asked.values()),
            "left_out": [self._left_out(entry) for entry in left_out],
        }
        if similarity is not None:
            order = np.argsort([node.partition_id for node in nodes])  # rows and columns in partition order
            record["similarity"] = similarity[np.ix_(order, order)].round(4).tolist()
        return record

    def aggregate_evaluate(self, record: dict, replies: list[Message]) -> None:
        """Add each node's held-out loss of its new cluster slice ("global") to the round's record; a node that
        failed to evaluate is named under `evaluate_left_out`."""
        by_pid = {c["partition_id"]: c for c in record["clients"]}
        replies, left_out = _sorted_replies(replies, self.asked)
        for reply in replies:
            loss = float(reply.content["metrics"]["loss"])
            client = by_pid.get(self.by_node[reply.metadata.src_node_id].partition_id)
            if client is not None:  # a node left out of training has no row to add to
                client["global_loss"], client["global_ppl"] = loss, perplexity(loss)
        record["evaluate_left_out"] = [self._left_out(entry) for entry in left_out]

    def _left_out(self, entry: LeftOut) -> dict:
        node = self.by_node.get(entry.node_id)
        return {
            "node_id": entry.node_id,
            "partition_id": node.partition_id if node else None,
            "name": node.name if node else None,
            "reason": entry.reason,
        }


def _sorted_replies(replies: Iterable[Message], expected: Mapping[int, object]) -> tuple[list[Message], list[LeftOut]]:
    """The replies to use, and every expected node left out: its reply carried an error, or it sent none in time.
    Each is logged, as Flower's strategies log failures, and none stops the run."""
    used, left_out, seen = [], [], set()
    for reply in replies:
        node_id = reply.metadata.src_node_id
        seen.add(node_id)
        if reply.has_error():
            left_out.append(LeftOut(node_id, f"its reply carried an error: {reply.error.reason}"))
        elif node_id in expected:
            used.append(reply)
    left_out += [LeftOut(node_id, "no reply within the round's timeout") for node_id in expected if node_id not in seen]
    for entry in left_out:
        log.warning("node %s left out: %s", entry.node_id, entry.reason)
    return used, left_out


def _wait_for_nodes(grid: Grid, count: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= count:
            return node_ids[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {count} nodes connected within {NODE_WAIT_SECONDS:.0f} s")
        time.sleep(1.0)


def discover(grid: Grid, config: TrainConfig) -> list[NodeInfo]:
    """Ask every node for its partition and LoRA plan (the `query` message)."""
    record = ConfigRecord(config.to_flat())
    messages = [
        Message(RecordDict({"config": record}), dst_node_id=node_id, message_type="query")
        for node_id in _wait_for_nodes(grid, config.clients)
    ]
    nodes = []
    expected = {message.metadata.dst_node_id: None for message in messages}
    replies, left_out = _sorted_replies(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_SECONDS), expected)
    if len(replies) < config.min_replies:
        reasons = "; ".join(f"node {entry.node_id}: {entry.reason}" for entry in left_out)
        raise RuntimeError(f"{len(replies)} nodes answered, fewer than min_replies={config.min_replies} ({reasons})")
    for reply in replies:
        info = reply.content["info"]
        nodes.append(
            NodeInfo(
                node_id=reply.metadata.src_node_id,
                partition_id=int(info["partition_id"]),
                budget=str(info["budget"]),
                rank=int(info["rank"]),
                targets=tuple(str(info["targets"]).split(",")),
                task=str(info["task"]),
                name=str(info["name"]),
            )
        )
    return sorted(nodes, key=lambda node: node.partition_id)


def initial_state(config: TrainConfig, nodes: list[NodeInfo]) -> RunState:
    """PEFT's initialisation at the largest rank on every target module any node adapts; one cluster."""
    from fedlm.models import load

    if config.aggregator == "fedavg" and len({(n.rank, n.targets) for n in nodes}) > 1:
        plans = sorted({f"{n.budget}: rank {n.rank}" for n in nodes})
        raise ValueError(f"fedavg needs one LoRA plan for every device, got {plans}: use --rank-profile high")
    targets = tuple(sorted({t for node in nodes for t in node.targets}))
    base = load(config.model, quiet=True)
    start = lora.init_state(base.model, max(node.rank for node in nodes), targets, config.seed)
    return RunState(
        fingerprint=config.fingerprint(),
        globals={0: start},
        cluster_of={node.partition_id: 0 for node in nodes},
    )


def write_outputs(out: Path, config: TrainConfig, state: RunState) -> None:
    """metrics.json every round; the adapter folders are replaced whole (`atomic.staged_dir`)."""
    atomic.write_json(out / "metrics.json", state.rounds, indent=2)
    for kind, states in (("clients", state.personal), ("clusters", state.globals)):
        for key, adapter in states.items():
            with atomic.staged_dir(out / kind / str(key)) as staging:
                lora.save_adapter(adapter, staging, config.model)


def run(grid: Grid, config: TrainConfig) -> RunState:
    """The whole federated run; resumes from OUT's checkpoint when its settings match."""
    out = Path(config.out)
    nodes = discover(grid, config)
    state = checkpoint.load(out)
    if state is None or state.fingerprint != config.fingerprint():
        state = initial_state(config, nodes)
    strategy = HeteroLoraStrategy(config, make_aggregator(config.aggregator), nodes, state)
    if state.round:  # a run killed between its checkpoint and its outputs: the outputs catch up first
        write_outputs(out, config, state)
    for server_round in range(state.round + 1, config.rounds + 1):
        started = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(server_round), timeout=REPLY_TIMEOUT_SECONDS)
        record = strategy.aggregate_train(server_round, list(replies))
        replies = grid.send_and_receive(strategy.configure_evaluate(server_round), timeout=REPLY_TIMEOUT_SECONDS)
        strategy.aggregate_evaluate(record, list(replies))
        record["seconds"] = round(time.perf_counter() - started, 2)
        state.rounds.append(record)
        state.round = server_round
        checkpoint.save(out, state)
        write_outputs(out, config, state)
    return state


def make_server_app(config: TrainConfig | None = None) -> ServerApp:
    """A ServerApp for `config`, or (deployment) for the run config that `flwr run` passes."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, config or TrainConfig.from_flat(dict(context.run_config)))

    return app


app = make_server_app()
