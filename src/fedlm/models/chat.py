"""Chat prompts for any model: its own chat template, or a plain transcript for base models that have none."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

PLAIN_TURN_STOP = "\nUser:"


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    if tokenizer.chat_template is None:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def chat_stops(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Stops that end the assistant's turn in the plain transcript, so a base model answers once."""
    return () if tokenizer.chat_template else (PLAIN_TURN_STOP,)
