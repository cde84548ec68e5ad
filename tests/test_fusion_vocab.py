"""Vocabulary projection across two different tokenizers."""

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedlm.cloud.logprobs import CloudCandidate, candidate
from fedlm.fusion.vocab import VocabAligner
from fedlm.models.tiny import tiny_tokenizer
from fedlm.models.token_bytes import token_bytes_table

EDGE = tiny_tokenizer(vocab_size=400)
CLOUD = tiny_tokenizer(vocab_size=300)  # a different merge table: the same text splits differently
EDGE_TABLE, CLOUD_TABLE = token_bytes_table(EDGE), token_bytes_table(CLOUD)
ALIGNER = VocabAligner(EDGE, [EDGE.eos_token_id])


def _edge_logprobs(seed: int) -> torch.Tensor:
    return torch.randn(len(EDGE_TABLE), generator=torch.Generator().manual_seed(seed)).log_softmax(-1)


def _agrees(a: bytes, b: bytes) -> bool:
    return a.startswith(b) or b.startswith(a)


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=30), st.integers(0, 1000))
def test_projection_is_a_distribution_that_only_moves_mass_to_agreeing_tokens(text: str, seed: int) -> None:
    ids = CLOUD(text)["input_ids"]
    raw = CLOUD_TABLE[ids[0]]
    assume(raw)  # a text that spells a special token ("<|endoftext|>") starts with a token that adds no text
    edge = _edge_logprobs(seed)
    p = 0.6
    projected = ALIGNER.project([CloudCandidate(raw, math.log(p))], edge)
    probs = projected.logprobs.exp()
    assert abs(float(probs.sum()) - 1) < 1e-4
    claimed = ALIGNER.targets(CloudCandidate(raw, 0.0)).tolist()
    assert claimed, "some edge token always agrees: byte-level vocabularies hold every single byte"
    assert all(_agrees(EDGE_TABLE[i], raw) for i in claimed)
    if raw in EDGE_TABLE:
        assert claimed == [EDGE_TABLE.index(raw)]  # an exact twin takes the candidate's whole mass
    assert float(probs[claimed].sum()) >= p - 1e-4  # the candidate's mass landed on tokens that spell its text
    others = torch.ones_like(probs, dtype=torch.bool)
    others[claimed] = False
    rest = edge.exp()[others]
    # the unseen 40% follows the edge's own shape on the tokens the candidate did not claim
    assert torch.allclose(probs[others], (1 - p) * rest / rest.sum(), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 20))
def test_same_vocabulary_gives_back_the_edge_distribution(seed: int, k: int) -> None:
    edge = _edge_logprobs(seed)
    values, ids = edge.topk(k)
    candidates = [
        CloudCandidate(EDGE_TABLE[i], float(v)) if EDGE_TABLE[i] else CloudCandidate(b"", float(v), special=True)
        for i, v in zip(ids.tolist(), values, strict=True)
    ]
    candidates = [c for c in candidates if not c.special]
    projected = ALIGNER.project(candidates, edge)
    assert torch.allclose(projected.logprobs.exp(), edge.exp(), atol=1e-6)


def test_legacy_token_strings_are_read_back_as_bytes() -> None:
    assert candidate("bytes:\\xe2\\x80", -1.0).raw == b"\xe2\x80"
    assert candidate(" Paris", -0.5).raw == b" Paris"
    assert candidate("<eos>", -2.0).special and candidate("<end_of_turn>", -2.0).special


def test_end_of_text_candidate_maps_to_edge_eos() -> None:
    edge = _edge_logprobs(0)
    projected = ALIGNER.project([CloudCandidate(b"", math.log(0.9), special=True)], edge)
    assert float(projected.logprobs[EDGE.eos_token_id].exp()) > 0.9


def test_cloud_entropy_counts_the_unseen_bucket() -> None:
    edge = _edge_logprobs(1)
    sure = ALIGNER.project([CloudCandidate(b"a", math.log(0.99))], edge)
    unsure = ALIGNER.project([CloudCandidate(b"a", math.log(0.3)), CloudCandidate(b"b", math.log(0.3))], edge)
    assert sure.entropy < unsure.entropy
    assert abs(unsure.seen_mass - 0.6) < 1e-9


def test_a_cloud_token_longer_than_one_edge_token_goes_to_the_edges_first_token_of_it() -> None:
    """ " Kampala" against an edge with " Kamp" + "ala": the cloud's mass goes to " Kamp", the token the edge writes
    first for that text, not shared by the edge's own probabilities among " K", " Ka" and " Kamp"."""
    for word in (" capital", " language", " beautiful", " information", " important"):
        ids = EDGE(word, add_special_tokens=False)["input_ids"]
        if len(ids) > 1:
            break
    else:
        raise AssertionError("the tiny edge spells every test word in one token")
    raw = word.encode()
    assert raw not in ALIGNER.exact and EDGE_TABLE[ids[0]] != raw
    assert ALIGNER.targets(CloudCandidate(raw, 0.0)).tolist() == [ids[0]]
    edge = _edge_logprobs(3)
    projected = ALIGNER.project([CloudCandidate(raw, math.log(0.9))], edge).logprobs.exp()
    assert float(projected[ids[0]]) >= 0.9 - 1e-6  # the whole belief reaches the token that starts the word
