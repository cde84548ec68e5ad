"""The OpenAI-compatible service over real loopback HTTP, with a tiny model."""

import asyncio
import json
import time
from collections.abc import Iterator

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
        ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens"),  # no "5" for 5: the schema's types
        ({"model": MODEL, "prompt": "x", "echo": "yes"}, "echo"),
        ({"model": MODEL, "prompt": ["x", "y"]}, None),  # one prompt a request
        ({"model": MODEL, "prompt": "x", "seed": 1.5}, "seed"),  # a seed is a whole number
        ({"model": MODEL, "prompt": "x", "max_tokens": 4097}, "max_tokens"),  # over the server's limit
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temprature": 0.5}, "temprature"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "prompt": "x", "logprobs": -1}, "logprobs"),
        ({"model": MODEL, "prompt": "x", "n": 2}, "n"),
        ({"model": MODEL, "prompt": "x", "n": True}, "n"),  # Python's True == 1; JSON's true is no number
        ({"model": MODEL, "prompt": "x", "presence_penalty": False}, "presence_penalty"),  # found by Schemathesis
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


def test_any_integer_seeds_the_generator(http: httpx.Client) -> None:
    """`seed: 18446744073709551616` overflowed the generator (a 500); a seed is taken modulo 2**64."""
    asks = [{"model": MODEL, "prompt": "Once", "max_tokens": 4, "seed": seed} for seed in (2**64 + 5, 5, -(2**70))]
    texts = [http.post("/completions", json=body).json()["choices"][0]["text"] for body in asks]
    assert texts[0] == texts[1]  # the same seed modulo 2**64, the same sample


def test_a_lone_surrogate_is_a_400_naming_the_field(http: httpx.Client) -> None:
    raw = json.dumps({"model": MODEL, "prompt": "x\ud800y"}).encode()  # JSON carries it escaped, as a client may
    response = http.post("/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_a_body_over_the_limit_is_a_413_before_it_is_read(tiny_engine: Engine) -> None:
    from fedlm.cloud.server import Limits

    with background_service(tiny_engine, limits=Limits(max_body_bytes=10_000)) as url:
        big = {"model": MODEL, "prompt": "x" * 20_000}
        response = httpx.post(url + "/completions", json=big, timeout=30)
        assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"model": "tiny-llama", "prompt": "'
            for _ in range(30):
                yield b"x" * 1000
            yield b'"}'

        response = httpx.post(url + "/completions", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize(
    "extreme", [{"top_p": 1.1e-308}, {"temperature": 1e-300}, {"temperature": 2.2e-313, "top_p": 1e-300}]
)
def test_extreme_sampling_settings_neither_fail_nor_take_others_down(http: httpx.Client, extreme: dict) -> None:
    """top_p past float32's range kept no token, a tiny temperature divided to NaN, and the failure took every
    request in its batch down: now the top token always stays, a tiny temperature is greedy, and a request that
    fails alone fails alone."""
    plain = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=60) as client:
            asks = [client.post("/completions", json=plain), client.post("/completions", json={**plain, **extreme})]
            return list(await asyncio.gather(*asks))

    good, odd = asyncio.run(together())
    assert good.status_code == 200 and odd.status_code == 200
    assert odd.json()["choices"][0]["text"] == good.json()["choices"][0]["text"]  # greedy, as temperature 0 is


def test_a_failure_midway_ends_the_stream_with_an_error_event_and_done(tiny_engine: Engine) -> None:
    from fedlm.cloud import engine as engine_module

    calls = {"n": 0}
    original = engine_module._RowState.advance

    def fail_on_third(self: object, logprobs: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return original(self, logprobs)

    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    engine_module._RowState.advance = fail_on_third  # type: ignore[method-assign]
    try:
        with background_service(tiny_engine) as url, httpx.stream("POST", url + "/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line]
    finally:
        engine_module._RowState.advance = original  # type: ignore[method-assign]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "injected" in error["message"]


def test_a_client_that_hangs_up_stops_its_decoding(tiny_engine: Engine) -> None:
    """A non-streamed request whose client gave up is cancelled: the engine stops decoding it long before its
    token budget is spent."""
    from fedlm.cloud import engine as engine_module

    original = engine_module._Batch.step

    def slow_step(self: object) -> None:  # 20 ms a token: 200 tokens would take 4 s
        time.sleep(0.02)
        original(self)

    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    engine_module._Batch.step = slow_step  # type: ignore[method-assign]
    try:
        with background_service(tiny_engine) as url:
            before = len(tiny_engine.batch_sizes)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/completions", json=body, timeout=0.5)
            time.sleep(0.6)  # the server notices within its poll interval, then the engine drops the request
            steps = len(tiny_engine.batch_sizes) - before
            time.sleep(0.6)
            assert len(tiny_engine.batch_sizes) - before == steps, "the engine kept decoding for a client that left"
    finally:
        engine_module._Batch.step = original  # type: ignore[method-assign]
    assert 0 < steps < 100


def test_a_body_that_is_not_json_is_a_400_that_says_so(http: httpx.Client) -> None:
    body = b'{"model": "tiny-llama", "prompt": "x"}'
    wrong_type = http.post("/completions", content=body, headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 400 and "Content-Type: application/json" in wrong_type.json()["error"]["message"]
    truncated = http.post("/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert truncated.status_code == 400 and "not valid JSON" in truncated.json()["error"]["message"]
    assert truncated.json()["error"]["param"] is None
    binary = http.post("/completions", content=b"\x00\xff{", headers={"content-type": "application/json"})
    assert binary.status_code == 400 and binary.json()["error"]["type"] == "invalid_request_error"


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
