"""The incremental edge decoder: a rollback leaves exactly the state a fresh decoder of the kept prefix has."""

import pytest
import torch

from fedlm.fusion.edge import Beliefs, EdgeDecoder
from fedlm.models import LoadedModel

PROMPT = "Once upon a time, a keeper watched the sea"  # longer than the tiny gemma's sliding window (6 tokens)


def _greedy(decoder: EdgeDecoder, n: int) -> tuple[list[int], list[Beliefs]]:
    """n greedy tokens, each with the beliefs it was drawn from."""
    tokens, beliefs = [], []
    for _ in range(n):
        before = decoder.next_beliefs
        tokens.append(int(before.local.argmax()))
        beliefs.append(before)
        decoder.append(tokens[-1])
    return tokens, beliefs


def _assert_same_beliefs(a: Beliefs, b: Beliefs) -> None:
    assert torch.allclose(a.base, b.base, atol=1e-5)
    assert (a.adapted is None) == (b.adapted is None)
    if a.adapted is not None:
        assert torch.allclose(a.adapted, b.adapted, atol=1e-5)


def _assert_same_caches(a: EdgeDecoder, b: EdgeDecoder) -> None:
    assert [c is None for c in a.caches] == [c is None for c in b.caches]
    for mine, theirs in zip(a.caches, b.caches, strict=True):
        if mine is None:
            continue
        assert mine.get_seq_length() == theirs.get_seq_length()
        for x, y in zip(mine.layers, theirs.layers, strict=True):
            assert x.keys.shape == y.keys.shape and torch.allclose(x.keys, y.keys, atol=1e-5)
            assert x.values.shape == y.values.shape and torch.allclose(x.values, y.values, atol=1e-5)


def _check_rollback(loaded: LoadedModel, kept: int, drafted: int = 8) -> None:
    prompt = loaded.tokenizer(PROMPT)["input_ids"]
    decoder = EdgeDecoder(loaded, prompt)
    tokens, beliefs = _greedy(decoder, drafted)
    decoder.rollback(len(prompt) + kept, beliefs[kept])
    fresh = EdgeDecoder(loaded, prompt + tokens[:kept])
    assert decoder.ids == fresh.ids == prompt + tokens[:kept]
    assert decoder.caches[0].get_seq_length() == fresh.caches[0].get_seq_length()
    _assert_same_beliefs(decoder.next_beliefs, fresh.next_beliefs)
    _assert_same_caches(decoder, fresh)
    # The caches carry on alike: another token than the dropped one (as after an overturn), then a few more.
    other = (tokens[kept] + 1) % len(beliefs[0].base)
    for token in [other, *tokens[:3]]:
        _assert_same_beliefs(decoder.append(token), fresh.append(token))
    _assert_same_caches(decoder, fresh)


@pytest.mark.parametrize("kept", [0, 3, 7])
def test_rollback_on_llama_equals_a_fresh_decoder(tiny_llama: LoadedModel, kept: int) -> None:
    _check_rollback(tiny_llama, kept)


@pytest.mark.parametrize("kept", [0, 3, 7])
def test_rollback_on_gemma3_with_sliding_layers_equals_a_fresh_decoder(tiny_gemma: LoadedModel, kept: int) -> None:
    layers = EdgeDecoder(tiny_gemma, tiny_gemma.tokenizer(PROMPT)["input_ids"]).caches[0].layers
    assert any(getattr(layer, "is_sliding", False) for layer in layers), "the tiny gemma must have sliding layers"
    assert len(tiny_gemma.tokenizer(PROMPT)["input_ids"]) > tiny_gemma.model.config.sliding_window
    _check_rollback(tiny_gemma, kept)


def test_rollback_with_an_adapter_rolls_back_both_caches() -> None:
    from peft import LoraConfig, get_peft_model

    from fedlm.models.tiny import tiny_loaded

    base = tiny_loaded("llama")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = LoadedModel("tiny-llama+lora", get_peft_model(base.model, config).eval(), base.tokenizer)
    decoder = EdgeDecoder(adapted, adapted.tokenizer(PROMPT)["input_ids"])
    assert decoder.has_adapter and decoder.next_beliefs.adapted is not None
    _check_rollback(adapted, 3)


def test_reading_a_proposal_in_one_pass_equals_appending_it_token_by_token(tiny_llama: LoadedModel) -> None:
    prompt = tiny_llama.tokenizer(PROMPT)["input_ids"]
    proposal = tiny_llama.tokenizer(" and then some more words", add_special_tokens=False)["input_ids"]
    one_pass, stepwise = EdgeDecoder(tiny_llama, prompt), EdgeDecoder(tiny_llama, prompt)
    before = one_pass.extend(proposal)
    for token_id, belief in zip(proposal, before, strict=True):
        assert torch.allclose(belief.local, stepwise.next_beliefs.local, atol=1e-4)
        stepwise.append(token_id)
    assert one_pass.ids == stepwise.ids
    assert torch.allclose(one_pass.next_beliefs.local, stepwise.next_beliefs.local, atol=1e-4)
