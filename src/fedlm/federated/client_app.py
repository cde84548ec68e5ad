"""The Flower ClientApp: a device that fine-tunes its own LoRA slice on data that never leaves it.

Three message types: `query` (the device tells its budget, hence its LoRA plan), `train` (load the slice the
server sent, train locally, reply with the trained adapter and held-out metrics) and `evaluate` (held-out loss
of the adapter the server sent). Only adapter arrays and metrics leave the device.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlm.data.partition import ClientData, client_data
from fedlm.egress.audit import AuditLog, AuditRecord
from fedlm.federated import dp, lora
from fedlm.federated.config import TrainConfig
from fedlm.federated.local import heldout_loss, perplexity, rank_scaled_lr, train_steps
from fedlm.federated.profiles import BUDGETS, LoraPlan, budget_for, parse_profile_map, plan_for

app = ClientApp()


def to_record(state: lora.LoraState) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in lora.to_arrays(state).items()})


def from_record(record: ArrayRecord) -> lora.LoraState:
    return lora.from_arrays({k: v.numpy() for k, v in record.items()})


def partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def device_plan(context: Context, config: TrainConfig) -> tuple[str, LoraPlan]:
    """The node's own `hardware-budget` (deployment), else the run's profile map (simulation)."""
    pid, _ = partition(context)
    budget = str(context.node_config.get("hardware-budget") or budget_for(pid, parse_profile_map(config.rank_profile)))
    if budget not in BUDGETS:
        raise ValueError(f"node {pid}: unknown hardware-budget {budget!r}; use one of {', '.join(BUDGETS)}")
    return budget, plan_for(BUDGETS[budget])


def audit_upload(state: lora.LoraState, server_round: int, pid: int, private: bool) -> None:
    """Every upload leaves a record in the device's privacy audit log: bytes and their hash, never the values."""
    payload = b"".join(array.tobytes() for _, array in sorted(lora.to_arrays(state).items()))
    destination = f"flower://server/round-{server_round}/partition-{pid}"
    AuditLog().append(AuditRecord.for_payload(destination, "dp" if private else "off", payload, {}))


@functools.cache
def base_model(name: str):
    """Loaded once per process: a simulation actor serves many rounds."""
    from fedlm.models import load

    torch.set_num_threads(1)
    return load(name, quiet=True)


@functools.cache
def local_data(config: TrainConfig, pid: int, num_partitions: int) -> ClientData:
    return client_data(config.data, pid, num_partitions, config.max_texts, seed=config.seed)


@app.query()
def query(msg: Message, context: Context) -> Message:
    config = TrainConfig.from_flat(dict(msg.content["config"]))
    pid, n = partition(context)
    budget, plan = device_plan(context, config)
    data = local_data(config, pid, n)
    info = ConfigRecord(
        {
            "partition_id": pid,
            "budget": budget,
            "rank": plan.rank,
            "targets": ",".join(plan.targets),
            "task": data.task,
            "name": data.name,
        }
    )
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = TrainConfig.from_flat(dict(msg.content["config"]))
    server_round = int(msg.content["config"]["server_round"])
    pid, n = partition(context)
    if config.fail_rate and np.random.default_rng([config.seed, server_round, pid, 7]).random() < config.fail_rate:
        raise RuntimeError(f"injected failure (fail_rate={config.fail_rate}), round {server_round}, client {pid}")
    data = local_data(config, pid, n)
    start = from_record(msg.content["arrays"])
    loaded = base_model(config.model)
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in start}))
    model = lora.wrap(loaded.model, lora.state_rank(start), targets)
    try:
        lora.load_into(model, start)
        tok = loaded.tokenizer
        before = heldout_loss(model, tok, data.heldout, config.batch_size, config.seq_len)
        train_loss = train_steps(
            model,
            tok,
            data.train,
            config.local_steps,
            config.batch_size,
            config.seq_len,
            rank_scaled_lr(config.lr, lora.state_rank(start)),
            seed=config.seed * 1000 + server_round * 100 + pid,
        )
        trained = lora.extract(model)
        metrics = {"train_loss": train_loss}  # update_norm only where DP measured it
        if config.dp_epsilon > 0:
            plan = dp.plan(config.dp_epsilon, config.rounds, config.dp_clip)
            rng = np.random.default_rng([config.seed, server_round, pid])
            trained, norm = dp.privatize(start, trained, plan.clip, plan.noise_multiplier, rng)
            lora.load_into(model, trained)
            metrics |= {"update_norm": norm, "dp_epsilon_spent": dp.spent(plan.noise_multiplier, server_round)}
        after = heldout_loss(model, tok, data.heldout, config.batch_size, config.seq_len)
    finally:
        model.unload()
    metrics |= {
        "loss_before": before,
        "ppl_before": perplexity(before),
        "loss": after,
        "ppl": perplexity(after),
        "num-examples": len(data.train),
    }
    audit_upload(trained, server_round, pid, config.dp_epsilon > 0)
    content = RecordDict({"arrays": to_record(trained), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = TrainConfig.from_flat(dict(msg.content["config"]))
    pid, n = partition(context)
    data = local_data(config, pid, n)
    state = from_record(msg.content["arrays"])
    loaded = base_model(config.model)
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in state}))
    model = lora.wrap(loaded.model, lora.state_rank(state), targets)
    try:
        lora.load_into(model, state)
        loss = heldout_loss(model, loaded.tokenizer, data.heldout, config.batch_size, config.seq_len)
    finally:
        model.unload()
    metrics = MetricRecord({"loss": loss, "ppl": perplexity(loss), "num-examples": len(data.heldout)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
