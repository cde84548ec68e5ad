"""Rewrite a sensitive prompt on the device so only its generic intent leaves, as FedRefine does for transmitters.

A rewriter is any `str -> str` callable, so tests and other edge models can stand in. The default one runs the
edge SLM greedily through its chat template. The gate hands the rewriter an already redacted text (so a model
that echoes or garbles a value cannot leak it in a form the detector no longer recognises) and redacts the rewrite
again; the rewrite's job is to drop what the detector missed and the private intent around the placeholders.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Rewriter = Callable[[str], str]

INSTRUCTION = (
    "Rewrite the user's message so it asks for the same thing in general terms. Remove every personal detail: "
    "names, e-mail addresses, phone numbers, account and card numbers, passwords, keys, birth dates, and health "
    "facts about specific people. Keep placeholders such as <PERSON_1> as they are. Do not answer the message; "
    "reply with the rewritten message only."
)


class SlmRewriter:
    """The edge SLM as a rewriter; the model loads on first use and stays loaded."""

    def __init__(self, model: str | None = None, max_new_tokens: int = 128) -> None:
        self.model_name = model
        self.max_new_tokens = max_new_tokens
        self._loaded: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._loaded is None:
                from fedlm.models import EDGE_DEFAULT, load

                self._loaded = load(self.model_name or EDGE_DEFAULT, quiet=True)
            return self._loaded

    def __call__(self, text: str) -> str:
        import torch

        loaded = self._load()
        tokenizer, model = loaded.tokenizer, loaded.model
        messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt_len = inputs["input_ids"].shape[1]
        # A rewrite should be no longer than the original; the cap also bounds the time on a slow device.
        budget = min(self.max_new_tokens, 2 * len(tokenizer(text)["input_ids"]) + 16)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=budget,
                pad_token_id=tokenizer.pad_token_id,
            )
        rewritten = tokenizer.decode(output[0, prompt_len:], skip_special_tokens=True).strip()
        return rewritten or text
