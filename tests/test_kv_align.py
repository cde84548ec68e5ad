"""Layer and token alignment between a receiver and a transmitter with different depths and tokenizers."""

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedlm.kvcomm.align import align_tokens, context_text, encode_with_spans, layer_map
from fedlm.kvcomm.train import chat_context
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT, LoadedModel, load
from fedlm.models.tiny import tiny_model, tiny_tokenizer

TEXT = st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]), min_size=1, max_size=40)


def test_last_alignment_pairs_the_final_layers_and_leaves_the_first_receiver_layers_alone() -> None:
    assert layer_map(30, 18, "last") == [None] * 12 + list(range(18))
    assert layer_map(4, 6, "last") == [2, 3, 4, 5]  # a deeper transmitter: its first layers are not used
    assert layer_map(3, 3, "last") == [0, 1, 2]


@pytest.mark.parametrize(("receiver", "transmitter"), [(30, 18), (18, 30), (4, 3), (7, 2), (5, 5), (2, 9)])
def test_depth_alignment_rounds_the_relative_depth(receiver: int, transmitter: int) -> None:
    pairs = layer_map(receiver, transmitter, "depth")
    half_up = [int(Fraction(i * (transmitter - 1), receiver - 1) + Fraction(1, 2)) for i in range(receiver)]
    assert pairs == half_up and pairs[0] == 0 and pairs[-1] == transmitter - 1
    assert pairs == sorted(pairs)


def test_layer_alignment_edge_cases() -> None:
    assert layer_map(1, 18, "depth") == [17]
    with pytest.raises(ValueError, match="unknown layer alignment"):
        layer_map(4, 3, "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need layers"):
        layer_map(0, 3)


def test_tokens_pair_with_the_transmitter_token_covering_their_last_character() -> None:
    # text "Hello world": receiver "Hel|lo| wor|ld", transmitter "<bos>|Hello| w|orld"
    receiver = [(0, 3), (3, 5), (5, 9), (9, 11)]
    transmitter = [(0, 0), (0, 5), (5, 7), (7, 11)]
    assert align_tokens(receiver, transmitter).tolist() == [1, 1, 3, 3]
    # a receiver token with no text (a BOS, a lone continuation byte) pairs with what precedes it
    assert align_tokens([(0, 0), (0, 5), (5, 5), (5, 7)], transmitter).tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="sent no tokens"):
        align_tokens(receiver, [])
    with pytest.raises(ValueError, match="text order"):
        align_tokens(receiver, [(4, 6), (0, 4)])


def check_alignment(receiver: LoadedModel, transmitter: LoadedModel, ids: list[int]) -> None:
    """The properties of a token map on any text both tokenizers spell exactly."""
    text, receiver_spans = context_text(receiver, ids)
    transmitter_ids, transmitter_spans = encode_with_spans(transmitter, text)
    assume(transmitter_spans[-1][1] == len(text))  # a character outside a vocabulary can be lost
    pairs = align_tokens(receiver_spans, transmitter_spans).tolist()
    assert len(pairs) == len(ids)
    assert all(0 <= j < len(transmitter_ids) for j in pairs)
    assert pairs == sorted(pairs)  # monotone: reading on never pairs with an earlier transmitter token
    for (start, end), j in zip(receiver_spans, pairs, strict=True):
        t_start, t_end = transmitter_spans[j]
        assert t_start < end or j == 0  # the paired token overlaps or precedes the receiver token's text
        if start < end:  # and it is the one that reads the receiver token's last character
            assert t_start <= end - 1 < t_end
        if j + 1 < len(transmitter_spans):
            assert transmitter_spans[j + 1][0] >= end  # the transmitter has not been read past it


TINY_RECEIVER = LoadedModel("tiny-r", tiny_model("llama", 400), tiny_tokenizer(vocab_size=400))
TINY_TRANSMITTER = LoadedModel("tiny-t", tiny_model("gemma3", 300), tiny_tokenizer(vocab_size=300))


@settings(max_examples=80, deadline=None)
@given(TEXT)
def test_token_alignment_properties_on_two_tiny_tokenizers(text: str) -> None:
    ids = TINY_RECEIVER.tokenizer(text, add_special_tokens=False)["input_ids"]
    assume(ids)
    check_alignment(TINY_RECEIVER, TINY_TRANSMITTER, ids)


@pytest.mark.real
def test_token_alignment_properties_on_the_real_tokenizers() -> None:
    """SmolLM2 receives, Gemma-3 transmits: plain text, and the receiver's chat context with its markers."""
    receiver, transmitter = load(EDGE_DEFAULT, quiet=True), load(CLOUD_DEFAULT, quiet=True)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(TEXT, st.booleans())
    def check(text: str, chat: bool) -> None:
        if chat:
            text = chat_context(receiver, text)
        ids = receiver.tokenizer(text, add_special_tokens=False)["input_ids"]
        assume(ids and receiver.tokenizer.decode(ids, skip_special_tokens=False) == text)
        check_alignment(receiver, transmitter, ids)

    check()
