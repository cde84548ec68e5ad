"""Reading what servers say about tokens: both logprob shapes, the servers' offset quirks, and the fusion views."""

import pytest

from fedlm.cloud.logprobs import LogprobsMissing, read_scored, read_tokens
from fedlm.cloud.readers import AheadReader, ChatReader, EchoReader, Turn, protocol_of


def legacy(tokens: list[str], offsets: list[int], values: list, tops: list | None = None) -> dict:
    logprobs = {"tokens": tokens, "text_offset": offsets, "token_logprobs": values, "top_logprobs": tops}
    return {"choices": [{"index": 0, "text": "", "logprobs": logprobs}]}


def chat_shape(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [{**entry(t, v), "top_logprobs": [entry(c, w) for c, w in top]} for t, v, top in entries]
    return {"choices": [{"index": 0, "text": "", "logprobs": {"content": content}}]}


def test_vllm_counts_its_bos_in_the_offsets_and_the_score_is_still_the_targets() -> None:
    # vLLM's text_offset counts the 5 characters of "<bos>", which the text it returns does not hold
    reply = legacy(["<bos>", "Hello", " there"], [0, 5, 10], [None, -1.0, -2.0])
    scored = read_scored(reply, "Hello", " there")
    assert [t.text for t in scored.target_tokens] == [" there"] and scored.target_logprob == -2.0


def test_our_server_reads_back_partial_characters_and_its_bos() -> None:
    reply = legacy(["<s>", "Hi", " ", "bytes:\\xf0\\x9f", "bytes:\\x8e", "bytes:\\x89"], [0, 0, 2, 3, 4, 4],
                   [None, -1.0, -0.5, -3.0, -0.1, -0.1])  # fmt: skip
    scored = read_scored(reply, "Hi", " 🎉")
    assert scored.target_logprob == pytest.approx(-3.7)


def test_a_server_that_ignores_echo_is_never_taken_for_a_score() -> None:
    # llama.cpp's server: a 200 with logprobs on the one token it generated, in the chat shape
    reply = chat_shape([(" there", -0.5, [(" there", -0.5)])])
    with pytest.raises(LogprobsMissing, match="no prompt logprobs"):
        read_scored(reply, "Hello", " there")
    assert protocol_of(reply) == "ahead"
    assert protocol_of({"choices": [{"index": 0, "text": " there"}]}) == "none"
    assert protocol_of(legacy(["<s>", "Hello", " there"], [0, 0, 5], [None, -1.0, -2.0])) == "echo"


def test_the_chat_shape_spells_tokens_by_their_bytes_and_ends_by_name() -> None:
    reply = chat_shape([(" caf", -0.1, []), ("é", -0.2, [("é", -0.2), ("e", -2.0)]), ("<end_of_turn>", -0.3, [])])
    tokens = read_tokens(reply, start_offset=10)
    assert [(t.raw, t.start, t.end) for t in tokens] == [(b" caf", 10, 14), ("é".encode(), 14, 15), (b"", 15, 15)]
    assert [c.raw for c in tokens[1].top] == ["é".encode(), b"e"]


def test_generate_ahead_counts_the_clouds_candidates_only_along_its_path() -> None:
    reader = AheadReader(tokens=3, separator=" ")
    # no answer yet: the prompt ends at the prefix, and the cloud writes the separator itself
    assert reader.request(Turn("Hi", "User: Hi\nAssistant:"), "", "Hel", 20).prompt == "User: Hi\nAssistant:"
    path = [
        (" Hello", -0.1, [(" Hello", -0.1), (" Hi", -2.5)]),
        (" there", -0.2, [(" there", -0.2)]),
        ("!", -0.3, [("!", -0.3)]),
    ]
    view = reader.view(chat_shape(path), "", "Hello")
    first = view.candidates_at(0, "Hello")
    assert first is not None and [c.raw for c in first] == [b"Hello", b"Hi"]  # the separator is taken off
    assert view.candidates_at(5, "Hellos") is not None  # after "Hello" the cloud's belief holds, whatever comes next
    assert view.candidates_at(11, "Hello there!") is not None  # the edge followed the cloud's path
    assert view.candidates_at(11, "Hellos there") is None  # where the texts part, the rest of the proposal is dropped
    # with an answer, the cloud continues right after it
    assert reader.request(Turn("Hi", "P:"), "Hello", "", 20).prompt == "P: Hello"
    later = reader.view(chat_shape([(" there", -0.2, [(" there", -0.2)])]), "Hello", "")
    assert later.candidates_at(5, "Hello there") is not None and later.candidates_at(0, "Hello") is None


def test_echo_views_read_offsets_from_the_end_of_what_was_sent() -> None:
    reader = EchoReader(separator=" ")
    ask = reader.request(Turn("Hi", "Q:"), "Hi", " you", 20)
    assert ask.prompt == "Q: Hi you" and ask.fields["echo"] and ask.fields["max_tokens"] == 0
    # the cloud read a rewritten prefix (two characters longer) and says so at every token
    tops = [None, {"Q::": -1.0}, {" Hi": -0.1, " Yo": -2.0}, {" you": -0.3}]
    reply = legacy(["<bos>", "Q::", " Hi", " you"], [0, 5, 8, 11], [None, -1.0, -0.1, -0.3], tops)
    view = reader.view(reply, "Hi", " you")
    assert [c.raw for c in view.candidates_at(0, "Hi you") or []] == [b"Hi", b"Yo"]
    assert [c.raw for c in view.candidates_at(2, "Hi you") or []] == [b" you"]
    assert view.candidates_at(2, "Hi!!!") is None  # the cloud's token does not spell the edge's text there


def test_chat_ahead_continues_the_answer_as_a_final_assistant_message() -> None:
    reader = ChatReader(tokens=2)
    first = reader.request(Turn("Capital of France?", "unused"), "", "The", 20)
    assert first.messages == [{"role": "user", "content": "Capital of France?"}]
    assert first.fields["top_logprobs"] == 20 and "continue_final_message" not in first.fields
    later = reader.request(Turn("Capital of France?", "unused"), "The capital", " is", 20)
    assert later.messages[-1] == {"role": "assistant", "content": "The capital"}
    assert later.fields["continue_final_message"] and later.fields["add_generation_prompt"] is False
    view = reader.view(chat_shape([(" is", -0.1, [(" is", -0.1), (" of", -2.0)])]), "The capital", " is")
    assert [c.raw for c in view.candidates_at(11, "The capital is") or []] == [b" is", b" of"]
