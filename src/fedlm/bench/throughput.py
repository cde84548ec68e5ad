"""Cloud service throughput: the same requests sent by 1 client, then by N concurrent clients, in one run."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fedlm.cloud.client import AsyncCloudClient

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
