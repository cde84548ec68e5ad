"""The batching engine: joined, batched decoding must give what each request gets alone."""

import asyncio

import pytest

from fedlm.cloud.engine import ContextLengthError, Engine, SamplingParams
from fedlm.models import LoadedModel

PROMPTS = ["The capital of France", "Once upon a time, a keeper watched", "Q", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100"]


async def _staggered(engine: Engine, ids: list[list[int]], params: list[SamplingParams]) -> list:
    tasks = []
    for prompt_ids, p in zip(ids, params, strict=True):
        tasks.append(asyncio.create_task(engine.complete(prompt_ids, p)))
        await asyncio.sleep(0.005)  # arrive while the batch is running, so requests join mid-decode
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma"])
def test_joined_batch_equals_solo_decoding(arch: str, request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(arch)
    engine = Engine(loaded, max_batch=4)
    ids = [engine.encode_prompt(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=10 + 3 * k, temperature=0, top_logprobs=3) for k in range(len(ids))]
    solo = [asyncio.run(engine.complete(i, p)) for i, p in zip(ids, params, strict=True)]
    engine.batch_sizes.clear()
    together = asyncio.run(_staggered(engine, ids, params))
    assert max(engine.batch_sizes) > 1, "requests were never decoded together"
    for alone, batched in zip(solo, together, strict=True):
        assert [t.token.token_id for t in alone.tokens] == [t.token.token_id for t in batched.tokens]
        for a, b in zip(alone.tokens, batched.tokens, strict=True):
            assert abs(a.token.logprob - b.token.logprob) < 1e-4
            assert [c.token_id for c in a.top] == [c.token_id for c in b.top]
        assert alone.text == batched.text


def test_gemma_sliding_window_is_exceeded_in_these_tests(tiny_gemma: LoadedModel) -> None:
    engine = Engine(tiny_gemma)
    assert len(engine.encode_prompt(PROMPTS[3])) > tiny_gemma.model.config.sliding_window


def test_seeded_sampling_is_reproducible(tiny_engine: Engine) -> None:
    ids = tiny_engine.encode_prompt("Once upon a time")
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first, second = (asyncio.run(tiny_engine.complete(ids, params)) for _ in range(2))
    assert first.text == second.text
    assert len(first.tokens) == 12


def test_stop_string_ends_generation_and_is_not_returned(tiny_engine: Engine) -> None:
    ids = tiny_engine.encode_prompt("Numbers: 0 1 2")
    free = asyncio.run(tiny_engine.complete(ids, SamplingParams(max_tokens=20, temperature=0)))
    stop = free.text[3:5]
    assert stop, "the free run should produce some text"
    stopped = asyncio.run(tiny_engine.complete(ids, SamplingParams(max_tokens=20, temperature=0, stop=(stop,))))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]


def test_echo_scores_every_prompt_token_but_the_first(tiny_engine: Engine) -> None:
    ids = tiny_engine.encode_prompt("The capital of France is Paris.")
    result = asyncio.run(tiny_engine.complete(ids, SamplingParams(max_tokens=0, echo=True, top_logprobs=2)))
    assert [p.token.token_id for p in result.prompt] == ids
    assert result.prompt[0].token.logprob != result.prompt[0].token.logprob  # NaN: nothing to condition on
    assert all(p.token.logprob <= 0 and len(p.top) == 2 for p in result.prompt[1:])
    assert result.tokens == [] and result.finish_reason == "length"


def test_too_long_prompt_is_refused_before_decoding(tiny_engine: Engine) -> None:
    with pytest.raises(ContextLengthError, match="maximum context length"):
        tiny_engine.check_length(list(range(250)), SamplingParams(max_tokens=10))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefix_cache_gives_the_same_answers_as_reading_everything(arch: str) -> None:
    from fedlm.models.loader import LoadedModel as Loaded
    from fedlm.models.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, len(tokenizer), seed=3, sliding_window=64)  # wide enough to keep every position
    loaded = Loaded(f"tiny-{arch}", model, tokenizer)
    cached, plain = Engine(loaded, prefix_cache=4), Engine(loaded, prefix_cache=0)
    base = "Once upon a time, a keeper watched the sea from a lighthouse. The capital of France is Paris."
    prompts = [base, base + " Numbers: 0 1 2", base + " Numbers: 0 1 2 3 4 5", base + " def add(a, b):"]
    for prompt in prompts:
        ids = cached.encode_prompt(prompt)
        for params in (
            SamplingParams(max_tokens=0, echo=True, top_logprobs=3),
            SamplingParams(max_tokens=6, temperature=0, top_logprobs=2),
        ):
            a = asyncio.run(cached.complete(ids, params))
            b = asyncio.run(plain.complete(ids, params))
            assert [t.token.token_id for t in a.tokens] == [t.token.token_id for t in b.tokens]
            for x, y in zip(a.prompt[1:] + a.tokens, b.prompt[1:] + b.tokens, strict=True):
                assert abs(x.token.logprob - y.token.logprob) < 1e-4
                assert [c.token_id for c in x.top] == [c.token_id for c in y.top]
    assert cached.prefix_cache.hits >= 5 and cached.prefix_cache.reused_tokens > 5 * 16
