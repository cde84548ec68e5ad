"""Federated benchmark: heterogeneous-rank aggregators against FedAvg at the largest rank, and task clustering.

Part 1 trains the same clients (GSM8K shards) four times: FedAvg with every device at the `high` plan, then
zero-pad, HetLoRA and FlexLoRA with `low,mid,high` devices. It reports, per round, each client's held-out
perplexity of its aggregated adapter and the bytes sent. Part 2 runs the two-task mixture (Shakespeare roles and
GSM8K shards) with `--cluster auto` and reports the clustering purity. Every run goes through the real Flower
Simulation Runtime.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fedlm.federated.config import TrainConfig
from fedlm.federated.runtime import run_simulation

HETERO = ("zeropad", "hetlora", "flexlora")


def _final(rounds: list[dict], key: str) -> float:
    return statistics.fmean(c[key] for c in rounds[-1]["clients"])


def summarize(runs: dict[str, list[dict]], mix: list[dict]) -> dict:
    """Headline figures: perplexity gap and upload ratio against FedAvg, purity, personalised vs base."""
    base = runs["fedavg"]
    base_ppl, base_up = _final(base, "global_ppl"), sum(r["bytes_up"] for r in base)
    hetero = {}
    for name in HETERO:
        ppl = _final(runs[name], "global_ppl")
        hetero[name] = {
            "global_ppl": ppl,
            "ppl_gap": ppl / base_ppl - 1,
            "upload_ratio": sum(r["bytes_up"] for r in runs[name]) / base_up,
            "download_ratio": sum(r["bytes_down"] for r in runs[name]) / sum(r["bytes_down"] for r in base),
        }
    personal = [
        {
            "partition_id": first["partition_id"],
            "task": first["task"],
            "base_ppl": first["ppl_before"],
            "personalised_ppl": last["ppl"],
        }
        for first, last in zip(mix[0]["clients"], mix[-1]["clients"], strict=True)
    ]
    return {
        "fedavg_max_rank": {"global_ppl": base_ppl, "bytes_up": base_up},
        "hetero": hetero,
        "clustering": {
            "purity": mix[-1]["purity"],
            "clusters": mix[-1]["clusters"],
            "tasks": [c["task"] for c in mix[-1]["clients"]],
            "similarity": next((r["similarity"] for r in mix if "similarity" in r), None),
        },
        "personalised_vs_base": {
            "clients": personal,
            "beats_base": sum(p["personalised_ppl"] < p["base_ppl"] for p in personal),
            "of": len(personal),
        },
    }


def run_benchmark(config: TrainConfig, mix_clients: int, progress: Callable[[str], None]) -> dict:
    out = Path(config.out)
    runs: dict[str, list[dict]] = {}
    for name in ("fedavg", *HETERO):
        progress(f"{name}: {config.rounds} rounds x {config.clients} clients")
        profile = "high" if name == "fedavg" else config.rank_profile
        run_config = replace(config, aggregator=name, rank_profile=profile, cluster="off", out=str(out / name))
        runs[name] = json.loads((run_simulation(run_config) / "metrics.json").read_text())
    progress(f"two-task mix: {mix_clients} clients, clustering on")
    mix_config = replace(config, data="mix", clients=mix_clients, cluster="auto", out=str(out / "mix"))
    mix = json.loads((run_simulation(mix_config) / "metrics.json").read_text())
    return {"config": config.to_flat(), "summary": summarize(runs, mix), "runs": runs, "mix": mix}


def many_devices(config: TrainConfig) -> dict:
    """One simulation at FL's scale: many virtual clients, a sample asked each round, some failing (the config says
    how many). Reports per round the time, the clients asked, trained and left out, and the bytes moved; and the
    largest resident memory of any process of the run (the simulation child and its Ray workers)."""
    import resource

    started = time.perf_counter()
    rounds = json.loads((run_simulation(config) / "metrics.json").read_text())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, the largest one child reached
    return {
        "config": config.to_flat(),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak_kib / 1024, 1),
        "rounds": [
            {
                "round": r["round"],
                "seconds": r["seconds"],
                "asked": len(r["asked"]),
                "trained": len(r["clients"]),
                "left_out": len(r["left_out"]),
                "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"],
            }
            for r in rounds
        ],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, rounds in runs.items():
        pids = [c["partition_id"] for c in rounds[0]["clients"]]
        for pid in pids:
            xs = [r["round"] for r in rounds]
            ys = [next(c["global_ppl"] for c in r["clients"] if c["partition_id"] == pid) for r in rounds]
            axes[0].plot(xs, ys, marker="o", label=f"{name} client {pid}")
        axes[1].bar(name, sum(r["bytes_up"] for r in rounds) / 1e6)
    axes[0].set(title="held-out perplexity per client (aggregated adapter)", xlabel="round", ylabel="perplexity")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set(title="upload over all rounds", ylabel="MB")
    mix = result["mix"]
    for client in mix[-1]["clients"]:
        axes[2].scatter(client["partition_id"], client["cluster"], c="C0" if client["task"] == "gsm8k" else "C3")
    purity = result["summary"]["clustering"]["purity"]
    axes[2].set(
        title=f"two-task mix: cluster per client (purity {purity:.2f}); red = Shakespeare",
        xlabel="partition",
        ylabel="cluster",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
