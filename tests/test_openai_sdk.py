"""The official `openai` package, pointed at `fedlm cloud serve` started as a real process."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from fedlm.net import free_port


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Iterator[str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "fedlm",
        "cloud",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--api-key",
        "k",
    ]
    process = subprocess.Popen(
        command, env={**os.environ, "FEDLM_API_KEY": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                pytest.fail(f"fedlm cloud serve exited: {process.stderr.read().decode()}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url + "/v1"
    finally:
        process.terminate()
        process.wait(10)


def test_openai_chat_with_top_logprobs(served: str, tiny_model_dir: Path) -> None:
    client = OpenAI(base_url=served, api_key="k")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens > 0
    assert all(len(t.top_logprobs) == 5 and t.bytes is not None for t in content)


def test_openai_streamed_completion(served: str) -> None:
    client = OpenAI(base_url=served, api_key="k")
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    whole = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert text == whole.choices[0].message.content
    legacy = client.completions.create(model=model, prompt="Once upon", max_tokens=4, temperature=0, stream=True)
    assert len([c for c in legacy if c.choices[0].text]) >= 1


def test_openai_sees_wrong_key_as_authentication_error(served: str) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=served, api_key="wrong", max_retries=0).models.list()
