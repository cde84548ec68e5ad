"""The device's endpoint under measure: what `fedlm serve` adds to fused decoding, and how it serves many clients.

Side by side in one run, on the same models, prompts and greedy settings:
- overhead: each prompt answered three ways, in turn, after one warm-up of each: by `fuse_once` (what `fedlm
  generate` runs: a new cloud client, which probes the cloud, per answer), by the library with one cloud client kept
  across answers (as the endpoint keeps its own), and through the endpoint with the official `openai` client; time
  per answered token, the median of each, and the endpoint's ratio to both. The ratio to the kept client is what
  the gateway itself adds (HTTP, JSON, the queue); the ratio to `fuse_once` is what a user sees;
- many clients: the prompts sent one after another by one client, then all at once by as many clients; aggregate
  answered tokens per second, latency p50/p95, and errors. The endpoint runs one generation at a time by design
  (`serve/app.py`), so the aggregate should hold at one client's rate while latency grows with the queue.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedlm.cloud.client import AsyncCloudClient
from fedlm.cloud.service import background_app
from fedlm.fusion.decoder import FusedDecoder, FusionConfig, fuse_once
from fedlm.fusion.rules import FusionRule
from fedlm.models import LoadedModel
from fedlm.privacy import EgressGate
from fedlm.serve.app import MODEL_NAME, Gateway, create_gateway_app

PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "What is the capital of France, and what is it known for?",
    "Give three tips for staying focused while studying.",
    "How does a refrigerator keep food cold?",
    "Write a short note thanking a colleague for their help.",
    "Why do leaves change colour in autumn?",
    "What is the difference between weather and climate?",
    "Describe how to make a cup of tea.",
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(
    edge: LoadedModel,
    rule: FusionRule,
    cloud_url: str | None,
    max_tokens: int = 32,
    repeats: int = 5,
    clients: int = 8,
    progress: Callable[[int], None] | None = None,
    deadline_ms: float = FusionConfig.deadline_ms,
) -> dict[str, Any]:
    """Overhead and many-clients figures for `edge` fused with `cloud_url` under `rule` (see the module's doc). The
    two paths give the same answers unless a cloud answer misses the `deadline_ms` on one of them."""
    from openai import OpenAI

    config = FusionConfig(max_tokens=max_tokens, deadline_ms=deadline_ms)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
    with EgressGate("off") as gate:
        app = create_gateway_app(Gateway(edge, rule, config, cloud_url, gate))
        with background_app(app, "fedlm serve") as url:
            client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

            def direct(prompt: str) -> tuple[float, str, int]:
                start = time.perf_counter()
                result = fuse_once(edge, rule, prompt, config, cloud_url)
                return time.perf_counter() - start, result.text, len(result.tokens)

            loop = asyncio.new_event_loop()
            kept_client = AsyncCloudClient(cloud_url) if cloud_url else None

            def kept(prompt: str) -> tuple[float, str, int]:
                start = time.perf_counter()
                result = loop.run_until_complete(FusedDecoder(edge, rule, kept_client, config).generate(prompt))
                return time.perf_counter() - start, result.text, len(result.tokens)

            def endpoint(prompt: str) -> tuple[float, str, int]:
                start = time.perf_counter()
                reply = client.chat.completions.create(
                    model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
                )
                return time.perf_counter() - start, reply.choices[0].message.content, reply.usage.completion_tokens

            # overhead: one warm-up each, then the three paths take turns on the same prompt
            paths = {"direct": direct, "kept": kept, "endpoint": endpoint}
            for answer in paths.values():
                answer(PROMPTS[0])
            per_token: dict[str, list[float]] = {name: [] for name in paths}
            same = True
            for i in range(repeats):
                prompt = PROMPTS[i % len(PROMPTS)]
                texts = set()
                for name, answer in paths.items():
                    seconds, text, tokens = answer(prompt)
                    per_token[name].append(1000 * seconds / max(tokens, 1))
                    texts.add(text)
                same &= len(texts) == 1
                if progress:
                    progress(1)
            if kept_client is not None:
                loop.run_until_complete(kept_client.aclose())
            loop.close()

            # many clients: the same prompts one after another, then all at once
            def serial() -> tuple[float, list[tuple[float, int]]]:
                start, done = time.perf_counter(), []
                for prompt in prompts:
                    seconds, _, tokens = endpoint(prompt)
                    done.append((seconds, tokens))
                return time.perf_counter() - start, done

            def together() -> tuple[float, list[tuple[float, int]], int]:
                def one(prompt: str) -> tuple[float, int] | None:
                    try:
                        seconds, _, tokens = endpoint(prompt)
                        return seconds, tokens
                    except Exception:  # any failure counts as an error of the run, whatever its kind
                        return None

                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
                    outcomes = list(pool.map(one, prompts))
                done = [o for o in outcomes if o is not None]
                return time.perf_counter() - start, done, len(outcomes) - len(done)

            serial_s, serial_done = serial()
            if progress:
                progress(1)
            together_s, together_done, errors = together()
            if progress:
                progress(1)

    median = {name: statistics.median(values) for name, values in per_token.items()}

    def side(seconds: float, done: list[tuple[float, int]]) -> dict[str, Any]:
        latencies = [s * 1000 for s, _ in done]
        return {
            "requests": len(done),
            "tokens": sum(t for _, t in done),
            "seconds": round(seconds, 3),
            "tokens_per_s": round(sum(t for _, t in done) / seconds, 2),
            "latency_ms_p50": round(_percentile(latencies, 0.5), 1) if latencies else None,
            "latency_ms_p95": round(_percentile(latencies, 0.95), 1) if latencies else None,
        }

    one, many = side(serial_s, serial_done), side(together_s, together_done)
    return {
        "cloud": cloud_url,
        "rule": rule.name,
        "max_tokens": max_tokens,
        "overhead": {
            "repeats": repeats,
            **{f"{name}_ms_per_token": [round(v, 2) for v in values] for name, values in per_token.items()},
            **{f"{name}_ms_per_token_median": round(value, 2) for name, value in median.items()},
            "ratio": round(median["endpoint"] / median["direct"], 3),
            "ratio_to_kept_client": round(median["endpoint"] / median["kept"], 3),
            "same_answers": same,
        },
        "clients": {"count": clients, "one_client": one, "at_once": {**many, "errors": errors}},
        "aggregate_ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 3) if one["tokens_per_s"] else None,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overhead, clients = result["overhead"], result["clients"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.boxplot([overhead[f"{name}_ms_per_token"] for name in ("direct", "kept", "endpoint")])
    left.set_xticks([1, 2, 3], ["fedlm generate\n(fuse_once)", "library,\nkept client", "fedlm serve"])
    left.set_ylabel("ms per answered token")
    left.set_title(f"serve / generate {overhead['ratio']:.3f}, / kept {overhead['ratio_to_kept_client']:.3f}")
    labels = ["1 client, serial", f"{clients['count']} clients at once"]
    rates = [clients["one_client"]["tokens_per_s"], clients["at_once"]["tokens_per_s"]]
    right.bar(labels, rates, color=["#7a9cc6", "#e0a458"])
    right.set_ylabel("answered tokens per second (all clients)")
    right.set_title(f"errors: {clients['at_once']['errors']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
