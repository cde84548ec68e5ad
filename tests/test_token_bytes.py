from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedlm.models.tiny import tiny_tokenizer
from fedlm.models.token_bytes import char_len, token_bytes_table, token_text

TOKENIZER = tiny_tokenizer()
TABLE = token_bytes_table(TOKENIZER)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_token_bytes_concatenate_to_the_text(text: str) -> None:
    # Text that spells a special token ("<|im_start|>") is read as that token, which carries no bytes (below).
    assume(not any(special in text for special in TOKENIZER.all_special_tokens))
    ids = TOKENIZER(text, add_special_tokens=True)["input_ids"]
    assert b"".join(TABLE[i] for i in ids) == text.encode()
    assert sum(char_len(TABLE[i]) for i in ids) == len(text)


def test_special_tokens_contribute_no_bytes() -> None:
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert TABLE[TOKENIZER.convert_tokens_to_ids(token)] == b""


def test_partial_utf8_is_shown_as_bytes() -> None:
    assert token_text("é".encode()[:1]) == "bytes:\\xc3"
    assert token_text(b" Paris") == " Paris"
