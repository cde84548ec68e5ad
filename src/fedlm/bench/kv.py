"""KV-cache communication measured: receiver alone vs text-to-text vs cache-to-cache, on multiple choice.

Every mode scores the same choices with the same receiver and the same code (`fedlm.eval.kv_scorer.KVScorer`); they
differ only in what the receiver reads before the choices: its own context (receiver alone), a hint the transmitter
wrote (T2T), or its context cache with the transmitters' fused residuals (C2C). Latency is measured per question, end
to end: the transmitter's request (hint generation or cache prefill and transfer), fusion, and the receiver's
scoring of every choice. Bytes are what crossed the wire for the transmitters. Everything goes through real
loopback HTTP services, the privacy gate included.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedlm.cloud.client import CloudClient
from fedlm.data.jsonl import McqRow
from fedlm.eval.kv_scorer import KVScorer
from fedlm.eval.mcq import evaluate_mcq, mcq_context
from fedlm.kvcomm.client import TransmitterClient
from fedlm.kvcomm.receiver import KVReceiver, Transmitter
from fedlm.kvcomm.select import LinkEstimate, fuser_value, probe_link, select
from fedlm.kvcomm.t2t import TextTransmitter
from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters
from fedlm.kvcomm.wire import KVPayload, WireFormat, bytes_per_token, capture
from fedlm.models import LoadedModel

FORMATS: tuple[WireFormat, ...] = ("fp16", "int8", "int4")


def zeroed(transmitter: Transmitter) -> Transmitter:
    """The control: the same fuser fed an all-zero cache. What accuracy it keeps is the fuser's own adaptation of
    the receiver's cache; only what C2C gains beyond it came from the transmitter."""

    def send(text: str) -> KVPayload:
        payload = transmitter.send(text)
        return replace(
            payload,
            keys=[torch.zeros_like(k) for k in payload.keys],
            values=[torch.zeros_like(v) for v in payload.values],
        )

    return Transmitter(transmitter.name, transmitter.fuser, send)


def wire_sizes(transmitter: LoadedModel, text: str, layers: list[int]) -> dict[str, dict[str, float]]:
    """Bytes per token of every wire format, for all layers and for the fuser's layers, on one real text (the
    fixed part of a blob, header and per-channel scales, weighs more on a short text)."""
    payload = capture(transmitter, text)
    every = list(range(payload.num_layers))
    raw = bytes_per_token(payload, "fp16", every)
    return {
        f"{fmt}/{name}": {
            "bytes_per_token": round(bytes_per_token(payload, fmt, chosen), 1),
            "ratio_to_fp16_all_layers": round(bytes_per_token(payload, fmt, chosen) / raw, 3),
        }
        for fmt in FORMATS
        for name, chosen in (("all-layers", every), (f"{len(layers)}-layers", layers))
    }


def qos_mode(
    kv: KVReceiver,
    clients: Sequence[TransmitterClient],
    rows: list[McqRow],
    latency_budget_s: float,
    wire_bytes: Callable[[], int],
) -> dict[str, Any]:
    """Measure every transmitter's link on the first question, choose the subset that fits the budget, and run
    every question with that participation mask."""
    context = mcq_context(rows[0])
    estimates = measure_links(kv.transmitters, clients, context, lambda t: fuser_value(t.fuser.config.extra))
    tokens = len(kv.receiver.tokenizer(context)["input_ids"])
    chosen = select(estimates, tokens, latency_budget_s)
    result = run_mode(rows, KVScorer(kv, chosen.mask(estimates), wire_bytes=wire_bytes))
    return {**result, "chosen": list(chosen.names), "links": [asdict(e) for e in estimates]}


def measure_links(
    transmitters: Sequence[Transmitter],
    clients: Sequence[TransmitterClient],
    text: str,
    value: Callable[[Transmitter], float] = lambda transmitter: 0.0,
) -> list[LinkEstimate]:
    """Round trip, link speed and bytes per token of every transmitter, from two real requests each (`probe_link`),
    with `value(transmitter)` as its estimated value."""

    def stats(text: str, t: Transmitter, client: TransmitterClient) -> tuple[int, int, float]:
        start, before = time.perf_counter(), client.traffic.bytes_received
        payload = t.send(text)
        return payload.seq_len, client.traffic.bytes_received - before, time.perf_counter() - start

    return [
        probe_link(t.name, value(t), lambda text, t=t, c=c: stats(text, t, c), text)
        for t, c in zip(transmitters, clients, strict=True)
    ]


def run_mode(rows: list[McqRow], scorer: KVScorer, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Accuracy, per-question latency (p50, mean, p95), the p50 time until the context was ready (fused or hinted,
    before any choice is scored) and transmitter bytes per question of one mode."""
    result = evaluate_mcq(rows, scorer, progress)
    return {
        "accuracy": round(result["accuracy"], 4),
        "accuracy_norm": round(result["accuracy_norm"], 4),
        "latency_p50_s": round(statistics.median(scorer.seconds), 4),
        "latency_mean_s": round(statistics.fmean(scorer.seconds), 4),
        "latency_p95_s": round(
            statistics.quantiles(scorer.seconds, n=20)[-1] if len(scorer.seconds) > 1 else scorer.seconds[0], 4
        ),
        "ready_p50_s": round(statistics.median(scorer.ready_seconds), 4),
        "bytes_per_question": round(statistics.fmean(scorer.bytes), 1),
        "n": len(rows),
        "right": result["right"],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result["modes"])
    fig, axes = plt.subplots(1, len(datasets) + 2, figsize=(4.6 * (len(datasets) + 2), 4.2))
    for ax, name in zip(axes, datasets, strict=False):
        modes = result["modes"][name]
        ax.bar(range(len(modes)), [m["accuracy"] for m in modes.values()], color="#2a7ab0")
        ax.set_xticks(range(len(modes)), list(modes), rotation=40, ha="right")
        ax.set_title(f"{name}: accuracy (n={next(iter(modes.values()))['n']})")
    ax = axes[-2]
    for name in datasets:
        for mode, m in result["modes"][name].items():
            ax.scatter(m["latency_p50_s"], m["accuracy"], label=f"{name}/{mode}")
    ax.set(xlabel="latency per question, p50 (s)", ylabel="accuracy", title="accuracy vs latency")
    ax.legend(fontsize=6)
    ax = axes[-1]
    sizes = result["wire"][datasets[-1]]
    ax.bar(range(len(sizes)), [s["bytes_per_token"] for s in sizes.values()], color="#9b4dca")
    ax.set_xticks(range(len(sizes)), list(sizes), rotation=40, ha="right")
    ax.set(ylabel="bytes per token", title=f"KV wire size per option ({datasets[-1]}, first question)")
    curve = result.get("learning_curve")
    if curve and curve.get("eval_loss"):
        inset = ax.inset_axes([0.55, 0.55, 0.42, 0.4])
        inset.plot(curve["eval_steps"], curve["eval_loss"], marker="o", label="fused")
        if curve.get("receiver_alone_loss") is not None:
            inset.axhline(curve["receiver_alone_loss"], color="grey", linestyle=":", label="alone")
        inset.set_title("held-out loss", fontsize=7)
        inset.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class KVBenchConfig:
    hint_tokens: int = 24
    private_rows: int = 20  # questions also run with every transmitter prompt rephrased on the device
    latency_budget_s: float = 0.5  # for the QoS-selected mode (0: skip it)
    quantized: WireFormat = "int8"


def run_benchmark(
    receiver: LoadedModel,
    specs: Sequence[TransmitterSpec],
    datasets: Mapping[str, list[McqRow]],
    config: KVBenchConfig,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every mode on every dataset, the wire sizes, and the first fuser's learning curve.

    Modes: `receiver`; `t2t` (a hint from the first transmitter's model); `c2c-1` (first transmitter, fp16);
    `c2c-<fmt>` (the same over the quantized wire); `c2c-2` (first two transmitters, when given);
    `c2c-1-zeroed` (the control: the first fuser fed zeros); `c2c-1-private` (the first transmitter reads a
    device-side rephrasing, on the first `private_rows` questions, next to `c2c-1-same-rows-as-private`).
    """
    from fedlm.cloud.engine import Engine
    from fedlm.cloud.service import background_service
    from fedlm.privacy import EgressGate
    from fedlm.privacy.rephrase import SlmRewriter

    first = specs[0]
    alone = KVReceiver(receiver, [])
    modes: dict[str, dict[str, Any]] = {name: {} for name in datasets}
    with background_service(Engine(first.model)) as url, CloudClient(url) as cloud:
        hint = TextTransmitter(cloud, config.hint_tokens)
        for name, rows in datasets.items():
            progress(f"{name}: receiver alone, then T2T ({len(rows)} questions)")
            modes[name]["receiver"] = run_mode(rows, KVScorer(alone))
            modes[name]["t2t"] = run_mode(rows, KVScorer(alone, hint=hint))
    for fmt in ("fp16", config.quantized):
        with serve_transmitters(receiver, specs, fmt) as (transmitters, clients):
            names, fuser = [t.name for t in transmitters], transmitters[0].fuser

            def received(clients: list[TransmitterClient] = clients) -> int:
                return sum(c.traffic.bytes_received + c.traffic.bytes_sent for c in clients)

            kv = KVReceiver(receiver, transmitters)
            for name, rows in datasets.items():
                label = "c2c-1" if fmt == "fp16" else f"c2c-1-{fmt}"
                progress(f"{name}: {label} ({names[0]})")
                modes[name][label] = run_mode(rows, KVScorer(kv, {names[0]: True}, wire_bytes=received))
                if fmt == "fp16" and len(names) > 1:
                    progress(f"{name}: c2c-2 ({names[0]} + {names[1]})")
                    both = {names[0]: True, names[1]: True}
                    modes[name]["c2c-2"] = run_mode(rows, KVScorer(kv, both, wire_bytes=received))
                if fmt != "fp16":
                    continue
                if config.latency_budget_s:
                    progress(f"{name}: c2c-qos (transmitters chosen within {config.latency_budget_s:.2f} s)")
                    modes[name]["c2c-qos"] = qos_mode(kv, clients, rows, config.latency_budget_s, received)
                progress(f"{name}: c2c-1-zeroed (control: the fuser fed an all-zero transmitter cache)")
                control = KVReceiver(receiver, [zeroed(transmitters[0])])
                modes[name]["c2c-1-zeroed"] = run_mode(rows, KVScorer(control, {names[0]: True}))
                if config.private_rows:
                    first_rows = rows[: config.private_rows]
                    progress(f"{name}: c2c-1-private ({len(first_rows)} questions, rephrased on the device)")
                    rewriter = SlmRewriter(receiver.name)
                    with (
                        EgressGate("rephrase", rewriter=rewriter, rephrase_all=True) as gate,
                        serve_transmitters(receiver, specs[:1], fmt, gate) as (rephrased, private_clients),
                    ):
                        scorer = KVScorer(
                            KVReceiver(receiver, rephrased),
                            {names[0]: True},
                            wire_bytes=lambda: sum(
                                c.traffic.bytes_received + c.traffic.bytes_sent for c in private_clients
                            ),
                        )
                        modes[name]["c2c-1-private"] = run_mode(first_rows, scorer)
                    same_rows = KVScorer(kv, {names[0]: True}, wire_bytes=received)
                    modes[name]["c2c-1-same-rows-as-private"] = run_mode(first_rows, same_rows)
    layers = sorted({t for t in fuser.config.layer_map if t is not None})
    return {
        "receiver": receiver.name,
        "transmitters": [s.model.name for s in specs],
        "modes": modes,
        "wire": {name: wire_sizes(first.model, mcq_context(rows[0]), layers) for name, rows in datasets.items()},
        "fuser": {k: v for k, v in fuser.config.extra.items() if k != "curve"},
        "learning_curve": fuser.config.extra.get("curve"),
        "summary": summarize(modes, config.quantized),
    }


def summarize(modes: Mapping[str, Mapping[str, Mapping[str, Any]]], quantized: str) -> dict[str, Any]:
    """The issue's targets per dataset: C2C against receiver alone and T2T, latency ratio, quantized loss."""
    out = {}
    for name, m in modes.items():
        c2c = m["c2c-1"]
        out[name] = {
            "c2c_minus_receiver_points": round(100 * (c2c["accuracy"] - m["receiver"]["accuracy"]), 1),
            "c2c_minus_t2t_points": round(100 * (c2c["accuracy"] - m["t2t"]["accuracy"]), 1),
            "c2c_latency_over_t2t": round(c2c["latency_p50_s"] / m["t2t"]["latency_p50_s"], 3),
            f"{quantized}_loss_points": round(100 * (c2c["accuracy"] - m[f"c2c-1-{quantized}"]["accuracy"]), 1),
            "c2c_minus_zeroed_control_points": round(100 * (c2c["accuracy"] - m["c2c-1-zeroed"]["accuracy"]), 1),
        }
        if "c2c-1-private" in m:
            same = m["c2c-1-same-rows-as-private"]["accuracy"]
            out[name]["private_minus_c2c_points"] = round(100 * (m["c2c-1-private"]["accuracy"] - same), 1)
    return out
