"""The OpenAI-compatible service over real loopback HTTP, with a tiny model."""

import asyncio
import json

import httpx
import pytest

from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_service
from fedlm.models import LoadedModel

MODEL = "tiny-llama"


@pytest.fixture()
def http(tiny_url: str) -> httpx.Client:
    with httpx.Client(base_url=tiny_url, timeout=30) as client:
        yield client


def test_models_and_health(http: httpx.Client, tiny_url: str) -> None:
    listed = http.get("/models").json()
    assert [m["id"] for m in listed["data"]] == [MODEL]
    assert httpx.get(tiny_url.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_completion_echo_returns_prompt_logprobs_with_offsets(http: httpx.Client) -> None:
    prompt = "The capital of France is Paris."
    body = http.post(
        "/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}
    ).json()
    choice = body["choices"][0]
    assert choice["text"] == prompt
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == prompt
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])


@pytest.mark.parametrize("start", [0, 11, 15, 29, 31])
def test_logprob_start_char_scores_only_the_tokens_that_reach_it(tiny_engine: Engine, start: int) -> None:
    """With `logprob_start_char`, the tokens that carry a character at or after it are scored exactly as a full
    echo scores them, and those before come back null; the same text asked again in full is scored in full
    (the prefix cache never hands out rows it did not score)."""
    prompt = "The capital of France is Paris, and of Spain, Madrid."
    fields = {"model": MODEL, "max_tokens": 0, "echo": True, "logprobs": 3}
    with background_service(tiny_engine) as url, httpx.Client(base_url=url, timeout=30) as http:
        tail = http.post("/completions", json={**fields, "prompt": prompt, "logprob_start_char": start}).json()
        full = http.post("/completions", json={**fields, "prompt": prompt}).json()
    tail_lp, full_lp = tail["choices"][0]["logprobs"], full["choices"][0]["logprobs"]
    assert tail_lp["tokens"] == full_lp["tokens"] and tail_lp["text_offset"] == full_lp["text_offset"]
    ends = [*full_lp["text_offset"][1:], len(prompt)]
    for i, end in enumerate(ends):
        if i > 0 and end > start:  # reaches the start: scored as in full (the first token never is)
            assert tail_lp["token_logprobs"][i] == pytest.approx(full_lp["token_logprobs"][i], abs=1e-4)
            assert list(tail_lp["top_logprobs"][i]) == list(full_lp["top_logprobs"][i])
        else:
            assert tail_lp["token_logprobs"][i] is None and tail_lp["top_logprobs"][i] is None
    assert all(v is not None for v in full_lp["token_logprobs"][1:])


def test_completion_generates_and_counts_usage(http: httpx.Client) -> None:
    body = http.post(
        "/completions", json={"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "temperature": 0}
    ).json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs_carry_bytes_and_top_candidates(http: httpx.Client) -> None:
    body = http.post(
        "/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
        },
    ).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    for item in content:
        assert bytes(item["bytes"]).decode("utf-8", errors="replace")
        assert len(item["top_logprobs"]) == 20
        assert item["top_logprobs"][0]["logprob"] >= item["logprob"] - 1e-6  # greedy: the chosen token is the best
    assert body["choices"][0]["message"]["content"] == bytes(b for item in content for b in item["bytes"]).decode(
        errors="replace"
    )


def test_chat_stream_is_server_sent_events(http: httpx.Client) -> None:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/chat/completions", json=request) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    whole = http.post("/chat/completions", json={**request, "stream": False}).json()
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temprature": 0.5}, "temprature"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "prompt": "x", "logprobs": -1}, "logprobs"),
        ({"model": MODEL, "prompt": "x", "n": 2}, "n"),
        ({"model": MODEL, "prompt": "x" * 2000, "max_tokens": 10}, "prompt"),
    ],
)
def test_bad_requests_get_openai_style_4xx(http: httpx.Client, body: dict, param: str | None) -> None:
    path = "/chat/completions" if "messages" in body else "/completions"
    response = http.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_unknown_model_is_404_and_malformed_json_is_400(http: httpx.Client) -> None:
    response = http.post("/completions", json={"model": "gpt-9", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = http.post("/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_api_key_is_enforced(tiny_engine: Engine) -> None:
    with background_service(tiny_engine, api_key="sekret") as url:
        assert httpx.get(url + "/models").status_code == 401
        assert (
            httpx.get(url + "/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"]
            == "invalid_api_key"
        )
        assert httpx.get(url + "/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_concurrent_requests_get_the_same_answers_as_sequential(tiny_gemma: LoadedModel) -> None:
    engine = Engine(tiny_gemma, max_batch=4)
    prompts = ["The capital", "Once upon a time", "def add(a, b):", "Question: What is"]

    async def ask(client: httpx.AsyncClient, prompt: str) -> dict:
        reply = await client.post(
            "/completions",
            json={"model": "tiny-gemma3", "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1},
        )
        return reply.json()["choices"][0]

    async def run(url: str, concurrent: bool) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            if concurrent:
                return list(await asyncio.gather(*(ask(client, p) for p in prompts)))
            return [await ask(client, p) for p in prompts]

    with background_service(engine) as url:
        sequential = asyncio.run(run(url, False))
        engine.batch_sizes.clear()
        concurrent = asyncio.run(run(url, True))
    assert max(engine.batch_sizes) > 1
    for a, b in zip(sequential, concurrent, strict=True):
        assert a["text"] == b["text"]
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
