"""Load held: a bounded burst of concurrent clients against one service on loopback, with `/health` probed
throughout. Reports the status codes, request latency p50/p95, and the slowest health answer: overload must be
refused at once (503 with Retry-After), never become a hang, a crash or a stalled health check.

The service runs as its own process (`fedlm cloud serve` or `fedlm kv serve`), as it would in deployment, so the
load generator's event loop does not share an interpreter with it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import httpx

from fedlm.bench.placement import fedlm_service

Service = Literal["cloud", "kv"]
PROMPT = "Write a short paragraph about lighthouses."
HEALTH_EVERY_S = 0.1


@contextmanager
def serving(service: Service, model: str, extra: list[str], startup_timeout_s: float = 300.0) -> Iterator[str]:
    """Run `fedlm <service> serve` on a free loopback port for the block; yields its root URL."""
    with fedlm_service([service, "serve", "--model", model, *extra], startup_timeout_s) as root:
        yield root


def _request(service: Service, model: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    if service == "cloud":
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
        return "/v1/chat/completions", {**body, "temperature": 0}
    return "/v1/kv", {"model": model, "text": PROMPT, "format": "int8"}


async def _burst(root: str, service: Service, model: str, clients: int, max_tokens: int) -> dict[str, Any]:
    path, body = _request(service, model, max_tokens)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    retry_after: set[str] = set()
    health: list[float] = []
    done = asyncio.Event()

    async with httpx.AsyncClient(base_url=root, timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as http:

        async def one() -> None:
            start = time.perf_counter()
            try:
                response = await http.post(path, json=body)
            except httpx.HTTPError:
                statuses[0] += 1  # no answer at all: the worst outcome, counted apart
                return
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] += 1
            if response.status_code in (429, 503):
                retry_after.add(response.headers.get("retry-after", "missing"))

        async def probe() -> None:
            while not done.is_set():
                start = time.perf_counter()
                response = await http.get("/health")
                health.append(time.perf_counter() - start if response.status_code == 200 else float("inf"))
                await asyncio.sleep(HEALTH_EVERY_S)

        prober = asyncio.create_task(probe())
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        seconds = time.perf_counter() - start
        done.set()
        await prober
    ordered = sorted(latencies)
    return {
        "service": service,
        "clients": clients,
        "seconds": round(seconds, 2),
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        "latency_ms_p50": round(statistics.median(ordered) * 1000, 1) if ordered else None,
        "latency_ms_p95": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1) if ordered else None,
        "retry_after": sorted(retry_after),
        "health_checks": len(health),
        "health_ms_max": round(max(health) * 1000, 1) if health else None,
    }


def burst(root: str, service: Service, model: str, clients: int = 40, max_tokens: int = 16) -> dict[str, Any]:
    """Send `clients` requests at once to the service at `root`, probing its health until all are answered."""
    return asyncio.run(_burst(root, service, model, clients, max_tokens))
