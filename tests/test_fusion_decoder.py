"""The co-decoding loop on tiny models over real loopback HTTP: identity, deadline, a cloud that dies."""

import asyncio
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI

from fedlm.cloud.client import AsyncCloudClient, CloudError
from fedlm.cloud.engine import Engine
from fedlm.cloud.logprobs import CloudCandidate
from fedlm.cloud.server import create_app
from fedlm.eval.scorers import FusedScorer, LocalScorer
from fedlm.fusion.decoder import PLAIN_CLOUD_PREFIX, FusedDecoder, FusionConfig, FusionResult
from fedlm.fusion.edge import EdgeDecoder
from fedlm.fusion.rules import make_rule
from fedlm.models import LoadedModel
from fedlm.models.chat import chat_prompt_ids
from fedlm.models.token_bytes import token_bytes_table

RULES = ["linear", "router", "proxy", "route"]


def _same_prompt_as_edge(edge: LoadedModel) -> str:
    """The cloud prefix that makes the cloud see exactly the edge's prompt."""
    return edge.tokenizer.apply_chat_template(
        [{"role": "user", "content": "{prompt}"}], tokenize=False, add_generation_prompt=True
    )


async def _generate(edge: LoadedModel, url: str | None, rule: str, **config: object) -> object:
    cloud = AsyncCloudClient(url, retries=0) if url else None
    try:
        decoder = FusedDecoder(edge, make_rule(rule), cloud, FusionConfig(**config))
        return await decoder.generate("The capital of France")
    finally:
        if cloud:
            await cloud.aclose()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lookahead", [1, 4])
def test_fusing_a_model_with_itself_changes_nothing(
    tiny_llama: LoadedModel, tiny_url: str, rule: str, lookahead: int
) -> None:
    prefix = _same_prompt_as_edge(tiny_llama)
    alone = asyncio.run(_generate(tiny_llama, None, "none", max_tokens=16))
    fused = asyncio.run(
        _generate(
            tiny_llama, tiny_url, rule, max_tokens=16, lookahead=lookahead, cloud_prefix=prefix, cloud_separator=""
        )
    )
    assert [t.token_id for t in fused.tokens] == [t.token_id for t in alone.tokens]
    assert "fused" in {t.source for t in fused.tokens}
    if lookahead == 1:  # lockstep asks once per token, wherever the answer so far is text the cloud can read
        readable = [_is_text(b"".join(t.raw for t in fused.tokens[:i])) for i in range(len(fused.tokens))]
        assert fused.cloud_calls == sum(readable) and fused.cloud_protocol == "ahead"
        assert all(t.source == "fused" for t, ok in zip(fused.tokens, readable, strict=True) if ok)
    else:
        assert fused.cloud_calls >= 16 // lookahead and fused.cloud_protocol == "echo"
    assert fused.bytes_sent > 0 and fused.bytes_received > 0 and fused.fallbacks == 0


def _is_text(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_the_edge_drafts_on_while_a_slow_cloud_reads(tiny_llama: LoadedModel, tiny_url: str) -> None:
    """Rounds start with one token and carry what the edge made during the last trip: up to the lookahead."""
    prefix = _same_prompt_as_edge(tiny_llama)
    alone = asyncio.run(_generate(tiny_llama, None, "none", max_tokens=13))
    slow = asyncio.run(
        _generate(
            tiny_llama,
            tiny_url,
            "router",
            max_tokens=13,
            lookahead=4,
            simulate_rtt_ms=300,
            cloud_prefix=prefix,
            cloud_separator="",
            protocol="echo",  # no request to find the protocol: every call below is a round
        )
    )
    assert [t.token_id for t in slow.tokens] == [t.token_id for t in alone.tokens]
    assert slow.cloud_calls == 4  # 1 + 4 + 4 + 4 tokens: a tiny edge drafts its full lookahead within each trip


def test_text_is_exactly_the_chosen_tokens(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    with _serve(Engine(tiny_gemma)) as (url, _):
        result = asyncio.run(_generate(tiny_llama, url, "router", max_tokens=24, lookahead=3))
    table = FusedDecoder(tiny_llama, make_rule("none"), None).token_bytes
    assert b"".join(table[t.token_id] for t in result.tokens) == b"".join(t.raw for t in result.tokens)
    assert result.text == b"".join(t.raw for t in result.tokens).decode("utf-8", "replace")
    assert len(result.tokens) == 24


def test_a_late_cloud_leaves_the_edge_tokens_standing(tiny_llama: LoadedModel, tiny_url: str) -> None:
    alone = asyncio.run(_generate(tiny_llama, None, "none", max_tokens=8))
    late = asyncio.run(
        _generate(tiny_llama, tiny_url, "router", max_tokens=8, lookahead=2, deadline_ms=20, simulate_rtt_ms=200)
    )
    assert [t.token_id for t in late.tokens] == [t.token_id for t in alone.tokens]
    # every round timed out (the simulated trip outlasts the deadline), and each of its drafts counts as a fallback
    assert {t.source for t in late.tokens} == {"edge"} and late.fallbacks == 8 and 4 <= late.cloud_calls <= 8


def test_generation_finishes_on_the_edge_when_the_cloud_dies(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    with _serve(Engine(tiny_gemma), die_after=3) as (url, served):
        result = asyncio.run(_generate(tiny_llama, url, "router", max_tokens=20))
    assert 3 <= served["requests"] < 20  # it answered for a while, then went away mid-generation
    assert len(result.tokens) == 20
    assert result.warnings and "edge alone" in result.warnings[0] and result.fallbacks == 1
    assert result.tokens[-1].source == "edge" and any(t.source != "edge" for t in result.tokens)
    assert result.cloud_calls == served["requests"]  # once the cloud failed it was never asked again


PROMPT = "The capital of France"
TARGET = "It is Paris, the capital of France."  # the tiny edge drafts whole characters on the way to it


def _stub_app(model: str) -> FastAPI:
    """A stub server that lists one model; each stub adds its own completions route."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model"}]}

    return app


def _pieces(edge: LoadedModel, target: str) -> dict[int, str]:
    """`target` in the edge's own tokens, by where each starts, and the end-of-turn token after it."""
    table = token_bytes_table(edge.tokenizer)
    starts, at = {}, 0
    for token_id in edge.tokenizer(target, add_special_tokens=False)["input_ids"]:
        starts[at] = table[token_id].decode()
        at += len(starts[at])
    assert at == len(target) and target.isascii()
    starts[len(target)] = "<|im_end|>"
    return starts


def _insisting_cloud(edge: LoadedModel, prefix: str, target: str) -> FastAPI:
    """A stub cloud that reads text one character per token and is sure the answer is `target`, then the end.

    It reads the answer as a transcript is written, one space after its `prefix` ("...Assistant: Paris").
    Wherever the answer so far still agrees with `target` and an edge token of `target` starts, its only candidate
    is exactly that edge token (probability 1); past the end of `target` it is the end-of-turn token. Anywhere else
    it offers nothing, so the edge's own token stands there. Without `echo` (lockstep asks for the next token
    only) it names that one token with the same rule, in the legacy shape.
    """
    starts, app = _pieces(edge, target), _stub_app("insisting")

    @app.post("/v1/completions")
    async def completions(body: dict) -> dict:
        text = body["prompt"]
        if not body.get("echo"):
            assert body["max_tokens"] == 1 and (text == prefix or text.startswith(prefix + " "))
            answer = text[len(prefix) + 1 :]
            agrees = target.startswith(answer) and len(answer) in starts
            piece = ("" if answer else " ") + starts[len(answer)] if agrees else "~"
            logprobs = {"tokens": [piece], "text_offset": [0], "token_logprobs": [0.0], "top_logprobs": [{piece: 0.0}]}
            choice = {"index": 0, "text": piece, "logprobs": logprobs, "finish_reason": "length"}
            return {"id": "cmpl-stub", "object": "text_completion", "model": "insisting", "choices": [choice]}
        assert text.startswith(prefix + " ") and body["max_tokens"] == 0
        answer = text[len(prefix) + 1 :]
        tops: list[dict | None] = []
        for offset in range(len(text)):
            j = offset - len(prefix) - 1
            agrees = j >= 0 and answer[:j] == target[:j] and j in starts
            tops.append({starts[j]: 0.0} if agrees else None)
        logprobs = {
            "tokens": list(text),
            "text_offset": list(range(len(text))),
            "token_logprobs": [None] + [-1.0] * (len(text) - 1),
            "top_logprobs": tops,
        }
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}
        return {"id": "cmpl-stub", "object": "text_completion", "model": "insisting", "choices": [choice]}

    return app


@pytest.mark.parametrize("rule", ["router", "linear", "proxy"])
@pytest.mark.parametrize("lookahead", [1, 4])
def test_a_cloud_that_disagrees_overturns_the_edge_drafts(tiny_llama: LoadedModel, rule: str, lookahead: int) -> None:
    prefix = PLAIN_CLOUD_PREFIX.format(prompt=PROMPT)
    ids = tiny_llama.tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    alone = asyncio.run(_generate(tiny_llama, None, "none", max_tokens=len(ids)))
    assert alone.text != TARGET, "the edge alone must say something else, or nothing is overturned"
    # Where the cloud overturns, the edge had drafted another token: its greedy choice after the target's prefix.
    edge = EdgeDecoder(tiny_llama, chat_prompt_ids(tiny_llama.tokenizer, [{"role": "user", "content": PROMPT}]))
    expected = []
    for token_id in ids:
        expected.append("fused" if int(edge.next_beliefs.local.argmax()) == token_id else "cloud")
        edge.append(token_id)
    assert "cloud" in expected
    with _serve(_insisting_cloud(tiny_llama, prefix, TARGET)) as (url, served):
        result = asyncio.run(_generate(tiny_llama, url, rule, max_tokens=len(ids) + 8, lookahead=lookahead))
    assert result.text == TARGET  # and then the end-of-turn token the cloud insisted on: nothing after it
    assert [t.token_id for t in result.tokens] == ids
    assert [t.source for t in result.tokens] == expected
    assert result.fallbacks == 0 and not result.warnings
    assert result.cloud_calls == served["requests"] - 1  # one more request: the model name, once
    assert result.cloud_calls >= expected.count("cloud") + 1  # every overturn ends a round; the end needs one more


def _ahead_cloud(
    edge: LoadedModel,
    prefix: str,
    target: str,
    with_logprobs: bool = True,
    most: int = 64,
    completions: bool = True,
) -> FastAPI:
    """A stub shaped like llama.cpp's server: it ignores `echo`, generates `max_tokens` tokens (at least one), and
    gives logprobs only on them, in the chat shape (`logprobs.content[]`) even on completions. It stops after
    `most` tokens, as a server with a cap on new tokens would. Its chat continues a final assistant message.

    It continues the answer along `target` in the edge's own tokens while the answer so far agrees with it (after
    "...Assistant:" it writes the separating space itself), then the end-of-turn token; elsewhere it writes "~".
    `completions=False` serves chat alone, as hosted chat APIs do.
    """
    starts, app = _pieces(edge, target), _stub_app("ahead")

    def proposal(answer: str, max_tokens: int, separator: str) -> dict:
        content, at = [], len(answer)
        for _ in range(min(max(max_tokens, 1), most)):  # at most `most` tokens per reply
            piece = (starts.get(at) if target.startswith(answer) else None) or "~"
            spelled = (separator if not answer and at == 0 else "") + piece
            entry = {"token": spelled, "logprob": 0.0, "bytes": [] if piece == "<|im_end|>" else list(spelled.encode())}
            content.append({**entry, "top_logprobs": [entry]})
            if piece == "<|im_end|>":
                break
            answer, at = answer + piece, at + len(piece)
        choice = {"index": 0, "text": "", "message": {"role": "assistant", "content": ""}, "finish_reason": "length"}
        if with_logprobs:
            choice["logprobs"] = {"content": content}
        return {"id": "stub", "model": "ahead", "choices": [choice]}

    if completions:

        @app.post("/v1/completions")
        async def complete(body: dict) -> dict:
            text = body["prompt"]
            answer = "" if text == prefix else text.removeprefix(prefix + " ")  # another prompt: it writes "~"
            return proposal(answer, body.get("max_tokens") or 0, " ")

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        messages = body["messages"]
        assert bool(body.get("continue_final_message")) == (messages[-1]["role"] == "assistant")
        answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        return proposal(answer if messages[0]["content"] == PROMPT else "?", body.get("max_tokens") or 0, "")

    return app


@pytest.mark.parametrize("rule", ["router", "proxy"])
@pytest.mark.parametrize("lookahead", [1, 4])
def test_a_cloud_without_prompt_logprobs_is_read_ahead(tiny_llama: LoadedModel, rule: str, lookahead: int) -> None:
    """Against a llama-server-shaped cloud the first reply shows it cannot echo; the same question is asked again
    by generate-ahead, and the cloud's own path overturns the edge exactly as an echoing cloud would."""
    prefix = PLAIN_CLOUD_PREFIX.format(prompt=PROMPT)
    ids = tiny_llama.tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    edge = EdgeDecoder(tiny_llama, chat_prompt_ids(tiny_llama.tokenizer, [{"role": "user", "content": PROMPT}]))
    expected = []
    for token_id in ids:
        expected.append("fused" if int(edge.next_beliefs.local.argmax()) == token_id else "cloud")
        edge.append(token_id)
    with _serve(_ahead_cloud(tiny_llama, prefix, TARGET)) as (url, served):
        result = asyncio.run(_generate(tiny_llama, url, rule, max_tokens=len(ids) + 8, lookahead=lookahead))
    assert result.text == TARGET and [t.token_id for t in result.tokens] == ids
    assert [t.source for t in result.tokens] == expected
    assert result.fallbacks == 0 and not result.warnings
    assert result.cloud_calls == served["requests"] - 1  # the echo on trial included; the model name once


def test_a_cloud_read_ahead_drafts_and_the_edge_checks_its_proposal_in_one_pass(tiny_llama: LoadedModel) -> None:
    """With a lookahead above one, the cloud's proposal is the draft: a round keeps up to `lookahead` of its tokens,
    so a sure cloud needs about a quarter of the rounds at lookahead 4 that it needs at lookahead 1."""
    prefix = PLAIN_CLOUD_PREFIX.format(prompt=PROMPT)
    ids = tiny_llama.tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    edge = EdgeDecoder(tiny_llama, chat_prompt_ids(tiny_llama.tokenizer, [{"role": "user", "content": PROMPT}]))
    expected = []  # "fused" where the edge alone would have written the cloud's token too: its beliefs must be right
    for token_id in ids:
        expected.append("fused" if int(edge.next_beliefs.local.argmax()) == token_id else "cloud")
        edge.append(token_id)
    calls = {}
    for lookahead in (1, 4):
        with _serve(_ahead_cloud(tiny_llama, prefix, TARGET)) as (url, _):
            result = asyncio.run(_generate(tiny_llama, url, "router", max_tokens=len(ids) + 8, lookahead=lookahead))
        assert result.text == TARGET and [t.source for t in result.tokens] == expected
        calls[lookahead] = result.cloud_calls
    assert calls[1] >= len(ids) and calls[4] <= len(ids) // 4 + 3, calls


def test_where_the_clouds_reading_ends_the_draft_is_asked_about_again(tiny_llama: LoadedModel) -> None:
    """Drafts past the end of the cloud's proposal are not left to the edge alone: the round ends before them, the
    edge is rolled back to there, and the next round asks the cloud from there."""
    from fedlm.fusion.decoder import _State

    decoder_loop = FusedDecoder(tiny_llama, make_rule("router"), None, FusionConfig(lookahead=3))
    edge = EdgeDecoder(tiny_llama, chat_prompt_ids(tiny_llama.tokenizer, [{"role": "user", "content": PROMPT}]))
    state = _State(edge, len(edge.ids), time.perf_counter())
    drafts = decoder_loop._draft(edge, 3)
    first = decoder_loop.token_bytes[drafts[0][0]]

    class OneTokenReading:  # the cloud's proposal covers the first draft only
        def candidates_at(self, at: int, text: str) -> list[CloudCandidate] | None:
            return [CloudCandidate(first, 0.0)] if at == 0 else None

        def ask_again(self, at: int, text: str) -> bool:
            return at > 0

    result = FusionResult()
    sent = b"".join(decoder_loop.token_bytes[t] for t, _ in drafts).decode("utf-8", "replace")
    assert decoder_loop._commit(drafts, OneTokenReading(), sent, state, result) == (False, False)
    assert [(t.token_id, t.source) for t in result.tokens] == [(drafts[0][0], "fused")]
    assert edge.ids == [*edge.ids[: state.prompt_len], drafts[0][0]]  # rolled back to just after the kept token
    assert torch_equal(edge.next_beliefs.local, drafts[1][1].local)


@pytest.mark.parametrize("forced", ["auto", "chat"])
def test_a_chat_only_cloud_is_read_ahead_through_chat(tiny_llama: LoadedModel, forced: str) -> None:
    """No completions at all (a hosted chat API): the answer so far goes as a final assistant message that the
    server continues, and its proposals fuse as the completions-based ones do."""
    prefix = PLAIN_CLOUD_PREFIX.format(prompt=PROMPT)
    ids = tiny_llama.tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    with _serve(_ahead_cloud(tiny_llama, prefix, TARGET, completions=False)) as (url, _):
        result = asyncio.run(
            _generate(tiny_llama, url, "router", max_tokens=len(ids) + 8, lookahead=4, protocol=forced)
        )
    assert result.text == TARGET and [t.token_id for t in result.tokens] == ids
    assert result.cloud_protocol == "chat" and result.fallbacks == 0 and not result.warnings


def test_a_cloud_without_any_logprobs_leaves_the_edge_alone_and_says_why(tiny_llama: LoadedModel) -> None:
    prefix = PLAIN_CLOUD_PREFIX.format(prompt=PROMPT)
    alone = asyncio.run(_generate(tiny_llama, None, "none", max_tokens=6))
    with _serve(_ahead_cloud(tiny_llama, prefix, TARGET, with_logprobs=False)) as (url, served):
        result = asyncio.run(_generate(tiny_llama, url, "router", max_tokens=6))
    assert [t.token_id for t in result.tokens] == [t.token_id for t in alone.tokens]
    assert {t.source for t in result.tokens} == {"edge"}
    assert len(result.warnings) == 1 and "gives no logprobs" in result.warnings[0]
    assert result.cloud_calls == 1 and served["requests"] == 2  # the model name, one question, then never again


def test_scoring_against_a_cloud_that_cannot_echo_fails_at_once(tiny_llama: LoadedModel) -> None:
    prefix = PLAIN_CLOUD_PREFIX.format(prompt=PROMPT)
    pairs = [("The capital of France is", " Paris.")] * 50
    with (
        _serve(_ahead_cloud(tiny_llama, prefix, TARGET)) as (url, served),
        pytest.raises(CloudError, match="cannot score text: it returns no prompt logprobs"),
    ):
        FusedScorer(tiny_llama, make_rule("router"), url).score(pairs)
    assert served["requests"] <= 3  # the model name and one question, never the 50 texts


@pytest.mark.parametrize("rule", RULES)
def test_fused_scoring_of_a_model_with_itself_equals_the_edge(
    tiny_llama: LoadedModel, tiny_url: str, rule: str
) -> None:
    pairs = [("The capital of France is", " Paris."), ("Question: What is two plus two?\nAnswer:", " four")]
    fused = FusedScorer(tiny_llama, make_rule(rule), tiny_url)
    assert fused.score(pairs) == pytest.approx(LocalScorer(tiny_llama).score(pairs), abs=1e-4)
    assert fused.fused_tokens == fused.target_tokens > 0


class _serve:
    """Serve an engine (or any app) on loopback; with `die_after`, the server shuts down after that many requests."""

    def __init__(self, engine: Engine | FastAPI, die_after: int | None = None) -> None:
        self.engine, self.die_after, self.counts = engine, die_after, {"requests": 0}

    def __enter__(self) -> tuple[str, dict]:
        app = self.engine if isinstance(self.engine, FastAPI) else create_app(self.engine)
        counts, die_after = self.counts, self.die_after

        @app.middleware("http")
        async def count(request, call_next):
            counts["requests"] += 1
            response = await call_next(request)
            if die_after is not None and counts["requests"] >= die_after:
                self.server.should_exit = True
            return response

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", counts

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def _with_random_adapter(loaded: LoadedModel, folder) -> LoadedModel:
    """A LoRA adapter with non-zero weights, so the adapted model really differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(loaded.model, config).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(folder)
    return LoadedModel("tiny-llama+lora", model, loaded.tokenizer)


def test_proxy_tuning_with_the_base_as_cloud_gives_the_adapted_model(tmp_path, tiny_url: str) -> None:
    from fedlm.models.tiny import tiny_loaded

    adapted = _with_random_adapter(tiny_loaded("llama"), tmp_path / "adapter")  # the served cloud is the same base
    prefix = _same_prompt_as_edge(adapted)
    alone = asyncio.run(_generate(adapted, None, "none", max_tokens=12))
    with adapted.model.disable_adapter():
        base_only = asyncio.run(
            _generate(
                LoadedModel("base", adapted.model.base_model.model, adapted.tokenizer), None, "none", max_tokens=12
            )
        )
    assert [t.token_id for t in alone.tokens] != [t.token_id for t in base_only.tokens], "the adapter must matter"
    # cloud (= base) + (adapted - base) = adapted, exactly: fused proxy tuning reproduces the adapted model
    proxy = asyncio.run(
        _generate(adapted, tiny_url, "proxy", max_tokens=12, lookahead=3, cloud_prefix=prefix, cloud_separator="")
    )
    assert [t.token_id for t in proxy.tokens] == [t.token_id for t in alone.tokens]
    assert proxy.cloud_calls > 0 and proxy.fallbacks == 0


def test_router_weighs_base_adapted_and_cloud(tmp_path, tiny_url: str) -> None:
    from fedlm.fusion.edge import EdgeDecoder
    from fedlm.fusion.rules import Experts, Router
    from fedlm.models.tiny import tiny_loaded

    adapted = _with_random_adapter(tiny_loaded("llama"), tmp_path / "adapter")
    beliefs = EdgeDecoder(adapted, adapted.tokenizer("Once upon a time")["input_ids"]).next_beliefs
    assert beliefs.adapted is not None and not torch_equal(beliefs.base, beliefs.adapted)
    weights = Router().mixture_weights(Experts(beliefs.base, None, beliefs.adapted))
    assert set(weights) == {"edge", "adapted"} and abs(sum(weights.values()) - 1) < 1e-9


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_a_rule_that_never_reads_the_base_spares_the_adapter_off_pass(tmp_path, tiny_url: str) -> None:
    from fedlm.models.tiny import tiny_loaded

    adapted = _with_random_adapter(tiny_loaded("llama"), tmp_path / "adapter")
    passes = {"off": 0}
    disable = adapted.model.disable_adapter

    def counted():  # every adapter-off pass goes through here
        passes["off"] += 1
        return disable()

    adapted.model.disable_adapter = counted
    alone = asyncio.run(_generate(adapted, None, "none", max_tokens=8))  # edge-only needs no base either
    linear = asyncio.run(_generate(adapted, tiny_url, "linear", max_tokens=8, lookahead=2))
    assert passes["off"] == 0 and len(alone.tokens) == len(linear.tokens) == 8
    router = asyncio.run(_generate(adapted, tiny_url, "router", max_tokens=8, lookahead=2))
    assert passes["off"] >= 8 and len(router.tokens) == 8  # the router weighs the base: one pass per token at least


def test_a_cloud_that_scores_only_the_tail_is_asked_for_the_draft_alone(tiny_llama: LoadedModel, tiny_url: str) -> None:
    """Once the client has found that fedlm's server honours `logprob_start_char`, each echo round asks it to score
    the draft's positions only: the same answer, read the same way, for fewer bytes."""
    prefix = _same_prompt_as_edge(tiny_llama)
    config = FusionConfig(max_tokens=16, lookahead=4, cloud_prefix=prefix, cloud_separator="")

    async def run(found: bool) -> FusionResult:
        async with AsyncCloudClient(tiny_url, retries=0) as cloud:
            if found:
                await cloud.protocol()
            assert cloud.logprob_start == found
            return await FusedDecoder(tiny_llama, make_rule("router"), cloud, config).generate("The capital of France")

    everything, tail = asyncio.run(run(False)), asyncio.run(run(True))
    assert [(t.token_id, t.source) for t in tail.tokens] == [(t.token_id, t.source) for t in everything.tokens]
    assert tail.cloud_protocol == everything.cloud_protocol == "echo" and tail.fallbacks == 0
    assert tail.bytes_received < everything.bytes_received
