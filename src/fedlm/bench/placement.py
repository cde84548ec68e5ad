"""Where the cloud model runs while fused speed is measured.

A cloud LLM runs on hardware of its own. Started in the benchmark's own process it takes CPU from the edge model
it is meant to help, and the slowdown measured is then mostly that contention, not the protocol. `separate_cores`
emulates the real placement on one machine: the cloud is a `fedlm cloud serve` process pinned to cores of its
own, the edge keeps the others, and the edge-only baseline is measured under the same pinning.

Separate cores still share the memory bus and the last-level cache, which a remote cloud would not: both models
are memory-bound on a CPU. `busy_cloud` measures that leftover contention, so a benchmark can tell it apart from
what the protocol costs.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from fedlm.net import LOOPBACK, free_port


def _pin_process(cores: set[int]) -> None:
    """Pin every thread of this process (the threads torch already started included) to `cores`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that has ended since the listing
            continue


def wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Wait until `process` answers `/health` at `url`; its log's tail explains a process that exited instead."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with code {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the service did not answer on {url} within {timeout_s:.0f}s")


@contextmanager
def separate_cores(
    model: str, cloud_cores: int = 1, startup_timeout_s: float = 300.0, weights: str = "float32"
) -> Iterator[dict]:
    """Serve `model` (with `weights`, as `fedlm cloud serve --weights`) in a process pinned to the last
    `cloud_cores` cores, and pin this process to the rest.

    Yields a description with the base URL (`url`) and the cores each side got. Needs Linux and at least
    `cloud_cores + 1` usable cores; restores this process's cores and torch threads on exit.
    """
    import torch

    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("separate cores need CPU affinity (Linux); use the shared placement")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= cloud_cores:
        raise RuntimeError(f"separate cores need more than {cloud_cores} usable cores, this process has {len(cores)}")
    cloud, edge = set(cores[-cloud_cores:]), set(cores[:-cloud_cores])
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cloud))}
    saved_cores, saved_threads = set(os.sched_getaffinity(0)), torch.get_num_threads()
    args = ["cloud", "serve", "--model", model, "--weights", weights]
    with fedlm_service(args, startup_timeout_s, env, lambda: os.sched_setaffinity(0, cloud)) as root:
        try:
            _pin_process(edge)
            torch.set_num_threads(len(edge))
            yield {
                "placement": "separate",
                "url": f"{root}/v1",
                "edge_cores": sorted(edge),
                "cloud_cores": sorted(cloud),
            }
        finally:
            _pin_process(saved_cores)
            torch.set_num_threads(saved_threads)


@contextmanager
def fedlm_service(
    args: list[str],
    startup_timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[str]:
    """Run `fedlm ARGS --port P` (a service) on a free loopback port for the block, as a process of its own; yields
    its root URL once `/health` answers, and stops it on exit."""
    port = free_port()
    root = f"http://{LOOPBACK}:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"fedlm-service-{port}.log"
    command = [sys.executable, "-m", "fedlm", *args, "--port", str(port)]
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    try:
        wait_healthy(process, root, log, startup_timeout_s)
        yield root
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)


def _keep_busy(url: str, model: str, prompt: str, cores: set[int], answered: Any) -> None:
    """Send scoring requests back to back until terminated (runs in a process of its own, on the cloud's cores);
    sets `answered` once the first one is back. Each prompt differs, so no answer comes from the prefix cache."""
    os.sched_setaffinity(0, cores)
    with httpx.Client(timeout=120.0) as client:
        for i in itertools.count():
            body = {"model": model, "prompt": f"{prompt} {i}", "max_tokens": 0, "echo": True, "logprobs": 20}
            client.post(f"{url}/completions", json=body)
            answered.set()


@contextmanager
def busy_cloud(
    url: str, model: str, prompt: str, cloud_cores: list[int], startup_timeout_s: float = 120.0
) -> Iterator[None]:
    """Keep `model` at `url` scoring variants of `prompt` nonstop while the block runs: its load during fused
    decoding, as an upper bound, without any of the protocol's work on the edge's side."""
    context = multiprocessing.get_context("spawn")  # a fork would copy this process's torch threads
    answered = context.Event()
    process = context.Process(
        target=_keep_busy, args=(url, model, prompt, set(cloud_cores), answered), name="fedlm-busy-cloud", daemon=True
    )
    process.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not answered.wait(0.25):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the load on {url} got no answer (exit code {process.exitcode})")
        yield
    finally:
        process.terminate()
        process.join(timeout=15)
