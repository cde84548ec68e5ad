"""Weight-only int8 for serving: every linear layer (the LM head included) keeps its weights as int8 with one scale
per output row, and multiplies in bfloat16.

Decoding on a CPU reads every weight once per token, so it runs at the speed of memory: int8 weights are a quarter
of float32's bytes. Activations are not quantized (Gemma's have outliers that per-tensor activation quantization
ruins: measured, top-20 logprobs 0.9 nats off). Measured on Gemma-3-270M, one core: a decode step takes 25 ms
against 75 ms in float32 and 44 ms in bfloat16, with top-20 logprobs 0.10 nats from float32's on average.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one scale per output row, and no bias (the models served have none)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("int8 weights are for linear layers without a bias")
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def int8_weights(model: nn.Module) -> nn.Module:
    """Cast `model` to bfloat16 and give every bias-free linear layer int8 weights, in place."""
    model.to(torch.bfloat16)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, Int8Linear(child))
    return model
