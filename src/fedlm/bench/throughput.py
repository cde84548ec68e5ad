"""Cloud service throughput: the same requests sent by 1 client, then by 4 concurrent clients, in one run.

.venv/bin/python -m fedlm.bench.throughput [--model gemma3-270m] [--requests 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from fedlm.cloud.client import AsyncCloudClient
from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_service
from fedlm.models import CLOUD_DEFAULT, load

PROMPTS = [
    "Write a short paragraph about the history of the printing press.",
    "Explain in a few sentences how a bicycle stays upright.",
    "Describe the water cycle to a ten-year-old.",
    "List some reasons why people keep houseplants, with a sentence on each.",
    "Tell a short story about a lighthouse keeper and a storm.",
    "Summarise what a compiler does, step by step.",
    "Give advice for someone learning to cook at home.",
    "Explain why the sky looks blue during the day.",
]


async def _client_loop(url: str, api_key: str | None, prompts: list[str], max_tokens: int) -> int:
    tokens = 0
    async with AsyncCloudClient(url, api_key, timeout=600) as client:
        for prompt in prompts:
            reply = await client.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
            tokens += reply["usage"]["completion_tokens"]
    return tokens


async def _run(url: str, api_key: str | None, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    share = [[PROMPTS[(c + i * clients) % len(PROMPTS)] for i in range(requests // clients)] for c in range(clients)]
    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(_client_loop(url, api_key, s, max_tokens) for s in share)))
    seconds = time.perf_counter() - start
    done = sum(len(s) for s in share)
    return {
        "clients": clients,
        "requests": done,
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
        "requests_per_s": round(done / seconds, 3),
    }


def measure(
    url: str, clients: int, api_key: str | None = None, requests: int = 8, max_tokens: int = 64
) -> dict[str, Any]:
    """Send `requests` chat completions from `clients` concurrent clients to the server at `url`."""
    return asyncio.run(_run(url, api_key, clients, requests, max_tokens))


def warm_up(url: str, api_key: str | None = None) -> None:
    """One short request, so first-call costs do not count as throughput."""
    asyncio.run(_run(url, api_key, 1, 1, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=CLOUD_DEFAULT)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    engine = Engine(load(args.model, quiet=True), max_batch=args.max_batch)
    rows = []
    with background_service(engine) as url:
        warm_up(url)
        for clients in (1, 4):
            mark = len(engine.batch_sizes)
            row = measure(url, clients, requests=args.requests, max_tokens=args.max_tokens)
            steps = engine.batch_sizes[mark:]
            row["mean_batch"] = round(sum(steps) / len(steps), 2)
            rows.append(row)
            print(json.dumps({"model": args.model, **row}), flush=True)
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(json.dumps({"model": args.model, "throughput_4_clients_vs_1": round(ratio, 2)}))


if __name__ == "__main__":
    main()
