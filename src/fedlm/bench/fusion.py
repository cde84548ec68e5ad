"""The fusion benchmark: quality (MCQ accuracy, bits per byte) and speed (tokens/s against edge-only).

Quality: every text is read once by the edge (in process) and once by the cloud (one `echo` request with top-k
logprobs); the cloud's score and every rule's fused score come from those same two readings, so the modes
differ only in how they combine them. Speed: the same prompt is generated edge-only and fused, at several
simulated round-trip times and lookaheads, in one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlm.cloud.logprobs import read_cloud_text, read_scored
from fedlm.data.jsonl import BpbRow, McqRow
from fedlm.eval.bpb import evaluate_bpb
from fedlm.eval.mcq import evaluate_mcq, mcq_pairs
from fedlm.eval.scorers import CloudScorer, LocalScorer, Pair
from fedlm.fusion.decoder import FusionConfig, fuse_once
from fedlm.fusion.rules import FusionRule, make_rule
from fedlm.fusion.step import read_experts, score_target
from fedlm.fusion.vocab import VocabAligner
from fedlm.models import LoadedModel

RULES = ("linear", "router", "proxy", "route")
SPEED_PROMPT = "Explain in a few sentences why the sky is blue."


@dataclass
class _Fixed:
    """A scorer that hands back scores computed elsewhere, so the metric code is shared with `fedlm eval`."""

    name: str
    scores: list[float]

    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[float]:
        assert len(pairs) == len(self.scores)
        return self.scores


def score_modes(
    edge: LoadedModel, cloud: CloudScorer, pairs: list[Pair], rules: Sequence[str] = RULES
) -> dict[str, list[float]]:
    """Summed target log-probabilities per pair for edge, cloud, and each fusion rule."""
    reader = LocalScorer(edge)
    aligner = VocabAligner(edge.tokenizer, edge.eos_ids)
    replies = cloud.echo(pairs, top_logprobs=20)
    scores: dict[str, list[float]] = {"edge": [], "cloud": [], **{f"fused-{r}": [] for r in rules}}
    fusers: dict[str, FusionRule] = {r: make_rule(r) for r in rules}
    for (context, target), reply in zip(pairs, replies, strict=True):
        scores["cloud"].append(read_scored(reply, context, target).target_logprob)
        view = read_cloud_text(reply, context + target)
        positions = reader.target_positions(context, target)
        scores["edge"].append(sum(float(before[t]) for t, _, before in positions))
        # one projection per position, which every rule then fuses: the rules differ only in how they combine
        experts = read_experts(aligner, positions, view)
        for name, rule in fusers.items():
            scores[f"fused-{name}"].append(score_target(rule, experts, view, len(context + target))[0])
    return scores


def quality(
    edge: LoadedModel, cloud: CloudScorer, mcq: dict[str, list[McqRow]], bpb: dict[str, list[BpbRow]]
) -> dict[str, dict[str, Any]]:
    """{dataset: {mode: metric}} for each MCQ set (accuracy) and each BPB set (bits per byte)."""
    out: dict[str, dict[str, Any]] = {}
    for name, questions in mcq.items():
        pairs = [pair for row in questions for pair in mcq_pairs(row)]
        scores = score_modes(edge, cloud, pairs)
        out[name] = {mode: evaluate_mcq(questions, _Fixed(mode, s))["accuracy"] for mode, s in scores.items()}
    for name, rows in bpb.items():
        scores = score_modes(edge, cloud, [(r.prompt, r.target) for r in rows])
        out[name] = {mode: evaluate_bpb(rows, _Fixed(mode, s))["bits_per_byte"] for mode, s in scores.items()}
    return out


def edge_cost(edge: LoadedModel, decoder_ms: float, tokens: int = 32) -> dict[str, float]:
    """The edge decoder's time per token (`decoder_ms`, measured by the caller) beside HF `generate` on the same
    model and the memory-bandwidth floor: on a CPU a decode step reads every weight once, so it can take no less
    than the weights' bytes over the bandwidth one thread gets (measured here by summing 256 MiB)."""
    import torch

    prompt = edge.tokenizer(SPEED_PROMPT, return_tensors="pt")

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            edge.model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    generate(2)  # untimed: nothing is timed cold
    hf_ms = (generate(tokens + 1) - generate(1)) / tokens * 1000  # the prefill cancels out
    seen: set[int] = set()
    weights = 0
    for p in edge.model.parameters():  # tied weights (an LM head sharing the embedding) counted once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weights += p.numel() * p.element_size()
    block = torch.ones(64 * 1024 * 1024)  # 256 MiB of float32, well past any cache
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        block.sum()
        best = min(best, time.perf_counter() - start)
    bandwidth = block.numel() * block.element_size() / best
    return {
        "edge_ms_per_token": round(decoder_ms, 2),
        "hf_generate_ms_per_token": round(hf_ms, 2),
        "weights_mb": round(weights / 1e6, 1),
        "memory_gb_per_s": round(bandwidth / 1e9, 2),
        "bandwidth_floor_ms_per_token": round(weights / bandwidth * 1000, 2),
    }


def speed(
    edge: LoadedModel,
    url: str,
    rtts: Sequence[float],
    lookaheads: Sequence[int],
    max_tokens: int,
    deadline_ms: float,
    cloud_busy: Callable[[], AbstractContextManager[None]] | None = None,
) -> dict[str, Any]:
    """Tokens/s of fused generation relative to edge-only, per simulated RTT and lookahead.

    With `cloud_busy` (a context that keeps the cloud computing nonstop), edge-only is also timed beside that busy
    cloud: on one machine the two models share memory bandwidth, and that ratio is the ceiling the placement
    itself puts on fused speed, whatever the protocol does.
    """
    edge_only = FusionConfig(max_tokens=max_tokens)
    fuse_once(edge, make_rule("none"), SPEED_PROMPT, FusionConfig(max_tokens=4))  # untimed: nothing is timed cold
    fuse_once(edge, make_rule("router"), SPEED_PROMPT, FusionConfig(max_tokens=4), url)
    base = fuse_once(edge, make_rule("none"), SPEED_PROMPT, edge_only)
    cost = edge_cost(edge, (base.seconds - base.ttft_ms / 1000) / max(len(base.tokens) - 1, 1) * 1000)
    ceiling = {}
    if cloud_busy is not None:
        with cloud_busy():
            beside = fuse_once(edge, make_rule("none"), SPEED_PROMPT, edge_only)
        ceiling = {
            "edge_tokens_per_s_cloud_busy": round(beside.tokens_per_s, 2),
            "co_location_ceiling": round(beside.tokens_per_s / base.tokens_per_s, 3),
        }
    runs = []
    for rtt in rtts:
        for k in lookaheads:
            config = FusionConfig(max_tokens=max_tokens, lookahead=k, deadline_ms=deadline_ms, simulate_rtt_ms=rtt)
            start = time.perf_counter()
            result = fuse_once(edge, make_rule("router"), SPEED_PROMPT, config, url)
            sources = [t.source for t in result.tokens]
            runs.append(
                {
                    "rtt_ms": rtt,
                    "lookahead": k,
                    "tokens_per_s": round(result.tokens_per_s, 2),
                    "ratio_to_edge": round(result.tokens_per_s / base.tokens_per_s, 3),
                    "cloud_calls": result.cloud_calls,
                    "fallbacks": result.fallbacks,
                    "cloud_informed_share": round(sum(s != "edge" for s in sources) / max(len(sources), 1), 3),
                    "cloud_protocol": result.cloud_protocol,
                    # the cloud's answer time per request, and in edge tokens (how many the edge makes meanwhile)
                    "cloud_ms_p50": round(statistics.median(result.cloud_ms), 1) if result.cloud_ms else None,
                    "cloud_ms_in_edge_tokens": round(statistics.median(result.cloud_ms) * base.tokens_per_s / 1000, 2)
                    if result.cloud_ms
                    else None,
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
    after = fuse_once(edge, make_rule("none"), SPEED_PROMPT, edge_only)  # the machine may have changed meanwhile
    return {
        "edge_tokens_per_s": round(base.tokens_per_s, 2),
        "edge_tokens_per_s_after": round(after.tokens_per_s, 2),
        **ceiling,
        "edge_cost": cost,
        "max_tokens": max_tokens,
        "deadline_ms": deadline_ms,
        "runs": runs,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets, accuracy = list(result["quality"]), set(result.get("mcq_sets", ["mcq"]))
    fig, grid = plt.subplots(1, len(datasets) + 1, figsize=(4.2 * (len(datasets) + 1), 4), squeeze=False)
    axes = grid[0]
    for ax, name in zip(axes, datasets, strict=False):
        modes = result["quality"][name]
        ax.bar(range(len(modes)), list(modes.values()), color=["#4c9a2a", "#9b4dca"] + ["#2a7ab0"] * (len(modes) - 2))
        ax.set_xticks(range(len(modes)), list(modes), rotation=45, ha="right")
        ax.set_title(f"{name}: {'accuracy' if name in accuracy else 'bits/byte (lower is better)'}")
    ax = axes[-1]
    runs = result["speed"]["runs"]
    for k in sorted({r["lookahead"] for r in runs}):
        points = [(r["rtt_ms"], r["ratio_to_edge"]) for r in runs if r["lookahead"] == k]
        ax.plot(*zip(*points, strict=True), marker="o", label=f"lookahead {k}")
    ax.axhline(1.0, color="grey", linestyle=":")
    if "co_location_ceiling" in result["speed"]:
        ceiling = result["speed"]["co_location_ceiling"]
        ax.axhline(ceiling, color="#c0392b", linestyle="--", label="edge-only, cloud busy")
    ax.set_xlabel("simulated RTT (ms)")
    ax.set_ylabel("tokens/s relative to edge-only")
    ax.set_title("speed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
