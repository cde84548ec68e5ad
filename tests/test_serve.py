"""`fedlm serve` through the official `openai` package: the tiny edge fused with a tiny cloud over loopback. The
answer and its per-token sources are what `fedlm generate` gives with the same settings, and every answer carries
its provenance beside it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from conftest import TASK_TEXTS
from fedlm.cloud.service import background_app
from fedlm.eval.scorers import FusedScorer, LocalScorer
from fedlm.federated.routing import AdapterRouter, cluster_adapters
from fedlm.fusion.decoder import FusionConfig, fuse_once
from fedlm.fusion.rules import make_rule
from fedlm.models import LoadedModel
from fedlm.models.loader import with_adapter
from fedlm.models.tiny import tiny_loaded
from fedlm.privacy import EgressGate
from fedlm.serve.app import MODEL_NAME, Gateway, create_gateway_app

PROMPT = "The capital of France"
CONFIG = FusionConfig(max_tokens=12)


@pytest.fixture(scope="module")
def client(tiny_llama: LoadedModel, tiny_url: str) -> Iterator[OpenAI]:
    with EgressGate("off") as gate:
        app = create_gateway_app(Gateway(tiny_llama, make_rule("router"), CONFIG, tiny_url, gate))
        with background_app(app, "fedlm serve") as url:
            yield OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_chat_answers_as_generate_does_and_says_how(client: OpenAI, tiny_llama: LoadedModel, tiny_url: str) -> None:
    expected = fuse_once(tiny_llama, make_rule("router"), PROMPT, CONFIG, tiny_url)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT}])
    assert reply.choices[0].message.content == expected.text
    fedlm = reply.model_extra["fedlm"]
    assert fedlm["sources"] == [t.source for t in expected.tokens] and fedlm["cloud_protocol"] == "ahead"
    assert fedlm["cloud_calls"] > 0 and fedlm["bytes_sent"] > 0 and fedlm["privacy"] == "off"
    assert reply.usage.completion_tokens == len(expected.tokens) and reply.usage.prompt_tokens > 0


def test_a_stream_carries_the_same_answer_as_it_is_decided(client: OpenAI) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert sum(bool(c.choices[0].delta.content) for c in chunks) > 2  # token by token, not all at the end
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and "fedlm" in chunks[-1].model_extra


def test_completions_and_a_conversation(client: OpenAI) -> None:
    text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6).choices[0].text
    assert isinstance(text, str)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": PROMPT},
    ]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=conversation, max_tokens=5)
    assert reply.usage.completion_tokens <= 5 and len(reply.model_extra["fedlm"]["sources"]) <= 5


def test_bad_requests_get_openai_errors(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}])
    with pytest.raises(openai.BadRequestError, match="last message must be the user"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "assistant", "content": "Hi"}])


def test_a_dead_cloud_leaves_the_answer_to_the_edge_with_a_warning(tiny_llama: LoadedModel) -> None:
    alone = fuse_once(tiny_llama, make_rule("none"), PROMPT, CONFIG)
    with EgressGate("off") as gate:
        dead = Gateway(tiny_llama, make_rule("router"), CONFIG, "http://127.0.0.1:9/v1", gate)
        with background_app(create_gateway_app(dead), "fedlm serve") as url:
            reply = OpenAI(base_url=url, api_key="unused", max_retries=0).chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT}]
            )
    assert reply.choices[0].message.content == alone.text  # an answer, never an error to the app
    assert reply.model_extra["fedlm"]["warnings"] and set(reply.model_extra["fedlm"]["sources"]) == {"edge"}


def test_echo_scores_the_prompt_with_the_fused_model_as_fedlm_eval_does(
    client: OpenAI, tiny_llama: LoadedModel, tiny_url: str
) -> None:
    context, target = "Question: What is the capital of France?\nAnswer:", " Paris"
    reply = client.completions.create(model=MODEL_NAME, prompt=context + target, max_tokens=0, echo=True, logprobs=3)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert choice.text == context + target and "".join(logprobs.tokens) == context + target
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(len(top) == 3 for top in logprobs.top_logprobs[1:])
    in_target = [lp for lp, at in zip(logprobs.token_logprobs, logprobs.text_offset, strict=True) if at >= len(context)]
    expected = FusedScorer(tiny_llama, make_rule("router"), tiny_url).score([(context, target)])[0]
    assert in_target and math.isclose(sum(in_target), expected, rel_tol=1e-6, abs_tol=1e-6)
    fedlm = reply.model_extra["fedlm"]
    assert "fused" in fedlm["prompt_sources"] and fedlm["cloud_calls"] >= 1 and fedlm["sources"] == []
    assert reply.usage.prompt_tokens == len(logprobs.tokens) and reply.usage.completion_tokens == 0


def test_echo_with_an_answer_as_evaluation_tools_ask(client: OpenAI) -> None:
    # lm-evaluation-harness asks max_tokens=1, echo, logprobs=1, and drops the one answered token
    reply = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1)
    logprobs = reply.choices[0].logprobs
    assert reply.choices[0].text.startswith(PROMPT) and len(logprobs.tokens) == reply.usage.total_tokens
    answered = logprobs.top_logprobs[-1]
    assert logprobs.token_logprobs[-1] == max(answered.values())  # greedy: the answer is its distribution's top
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    spelled = b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace")
    assert spelled == chat.choices[0].message.content


def test_echo_without_a_cloud_is_the_edge_and_with_a_dead_one_a_503(tiny_llama: LoadedModel) -> None:
    context, target = "Question: What is the capital of France?\nAnswer:", " Paris"
    with EgressGate("off") as gate:
        alone = Gateway(tiny_llama, make_rule("router"), CONFIG, None, gate)
        with background_app(create_gateway_app(alone), "fedlm serve") as url:
            reply = OpenAI(base_url=url, api_key="unused", max_retries=0).completions.create(
                model=MODEL_NAME, prompt=context + target, max_tokens=0, echo=True, logprobs=0
            )
        logprobs = reply.choices[0].logprobs
        in_target = [
            lp for lp, at in zip(logprobs.token_logprobs, logprobs.text_offset, strict=True) if at >= len(context)
        ]
        assert math.isclose(sum(in_target), LocalScorer(tiny_llama).logprob(context, target), rel_tol=1e-6)
        assert set(reply.model_extra["fedlm"]["prompt_sources"]) == {"edge"}
        dead = Gateway(tiny_llama, make_rule("router"), CONFIG, "http://127.0.0.1:9/v1", gate)
        with (
            background_app(create_gateway_app(dead), "fedlm serve") as url,
            pytest.raises(openai.InternalServerError, match="cloud"),
        ):
            OpenAI(base_url=url, api_key="unused", max_retries=0).completions.create(
                model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1
            )


def test_each_request_goes_to_the_cluster_adapter_that_fits_its_prompt(tiny_clusters: Path, tiny_url: str) -> None:
    maths, story = TASK_TEXTS[0][0], TASK_TEXTS[1][0]
    router = AdapterRouter(tiny_loaded("llama"), cluster_adapters(tiny_clusters))
    with EgressGate("off") as gate:
        gateway = Gateway(router.edge, make_rule("router"), CONFIG, tiny_url, gate, router=router)
        with background_app(create_gateway_app(gateway), "fedlm serve") as url:
            client = OpenAI(base_url=url, api_key="unused", max_retries=0)
            replies = {
                prompt: client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}])
                for prompt in (maths, story)
            }
    for prompt, adapter in ((maths, "0"), (story, "1")):
        fedlm = replies[prompt].model_extra["fedlm"]
        assert fedlm["adapter"] == adapter and min(fedlm["routing"], key=fedlm["routing"].get) == adapter
        # the answer is the one that adapter gives, as `fedlm generate --adapter clusters/<adapter>` would
        alone = with_adapter(tiny_loaded("llama"), tiny_clusters / adapter)
        expected = fuse_once(alone, make_rule("router"), prompt, CONFIG, tiny_url)
        assert replies[prompt].choices[0].message.content == expected.text
