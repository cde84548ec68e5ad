"""What a device does with its own data: a few LoRA steps, and held-out loss. No Flower here."""

from __future__ import annotations

import math
import random

import torch

from fedlm.federated.profiles import MAX_RANK


def _batch(tokenizer, texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def rank_scaled_lr(lr: float, rank: int, reference: int = MAX_RANK) -> float:
    """The learning rate for a rank-`rank` adapter, given `lr` for a rank-`reference` one (rsLoRA's argument).

    With alpha = rank (scaling 1), B starts at zero and Adam moves each entry by about lr per step, so ΔW = B·A
    grows like √rank: a rank-2 device learned 4x slower than a rank-32 one and its update was nearly lost in
    the average. Scaling the rate by √(reference/rank) gives every rank the same speed.
    """
    return lr * math.sqrt(reference / rank)


def train_steps(
    model, tokenizer, texts: list[str], steps: int, batch_size: int, seq_len: int, lr: float, seed: int
) -> float:
    """`steps` AdamW steps on the trainable (LoRA) parameters; returns the mean training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    total = 0.0
    for _ in range(steps):
        loss = model(**_batch(tokenizer, rng.sample(texts, min(batch_size, len(texts))), seq_len)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    model.eval()
    return total / max(steps, 1)


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], batch_size: int, seq_len: int) -> float:
    """Token-weighted mean cross-entropy (nats) on `texts`."""
    model.eval()
    nll, tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = _batch(tokenizer, texts[start : start + batch_size], seq_len)
        count = int((batch["labels"][:, 1:] != -100).sum())
        nll += float(model(**batch).loss) * count
        tokens += count
    return nll / max(tokens, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
