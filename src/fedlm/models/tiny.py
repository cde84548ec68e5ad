"""Tiny random models and a tiny trained tokenizer, for tests that need real code paths but not real quality.

Two architectures mirror the defaults: a llama (like SmolLM2) and a gemma3_text with sliding-window layers (like
Gemma-3), so cache handling, masks and tokenizers are exercised as in production, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from fedlm.models.loader import LoadedModel

Arch = Literal["llama", "gemma3"]

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: What is two plus two?\nAnswer: four",
    "Once upon a time, a keeper watched the sea from a lighthouse.",
    "Les élèves étudient à l'école. ¿Dónde está la estación? 東京は日本の首都です。 🎉",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000, and symbols: !@#$%^&*()[]{}<>?/\\|~`'\"",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 400, chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a small fixed corpus: every string round-trips, as with real tokenizers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(arch: Arch, vocab_size: int, seed: int = 0, sliding_window: int = 6) -> PreTrainedModel:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    if arch == "llama":
        model: PreTrainedModel = LlamaForCausalLM(LlamaConfig(**common))
    else:
        config = Gemma3TextConfig(
            **common, head_dim=16, sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"]
        )
        model = Gemma3ForCausalLM(config)
    return model.eval()


def tiny_loaded(arch: Arch = "llama", seed: int = 0, chat: bool = True) -> LoadedModel:
    tokenizer = tiny_tokenizer(chat=chat)
    model = tiny_model(arch, len(tokenizer), seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(f"tiny-{arch}", model, tokenizer)


def save_tiny(folder: str | Path, arch: Arch = "llama", seed: int = 0) -> Path:
    """Write a tiny model as an HF folder, so it loads through the same path as any local model."""
    loaded = tiny_loaded(arch, seed)
    folder = Path(folder)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder
