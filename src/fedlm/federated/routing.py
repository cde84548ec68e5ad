"""Parameter-free routing of a prompt to a cluster adapter: the one under which the prompt is least surprising.

No router is trained: each cluster's adapter scores the prompt's own tokens, and the lowest perplexity wins.
A prompt in the style of a task cluster is, by construction, best predicted by the adapter trained on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.numpy import load_file

from fedlm.federated import lora
from fedlm.federated.local import heldout_loss


def read_adapter(folder: str | Path) -> lora.LoraState:
    """A PEFT adapter folder written by `lora.save_adapter` (or PEFT itself) as a LoraState."""
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    flat = {
        key.removeprefix(lora.PEFT_PREFIX).replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B"): v
        for key, v in tensors.items()
    }
    return lora.from_arrays(flat)


@torch.no_grad()
def adapter_losses(model, tokenizer, prompt: str, adapters: dict[str, lora.LoraState], seq_len: int = 256):
    """Mean token loss of `prompt` under each adapter."""
    losses = {}
    for name, state in adapters.items():
        targets = tuple(sorted({module.rsplit(".", 1)[-1] for module in state}))
        peft_model = lora.wrap(model, lora.state_rank(state), targets)
        try:
            lora.load_into(peft_model, state)
            losses[name] = heldout_loss(peft_model, tokenizer, [prompt], 1, seq_len)
        finally:
            peft_model.unload()
    return losses


def route(model, tokenizer, prompt: str, adapters: dict[str, lora.LoraState]) -> str:
    """The name of the adapter with the lowest perplexity on `prompt`."""
    losses = adapter_losses(model, tokenizer, prompt, adapters)
    return min(losses, key=losses.get)
