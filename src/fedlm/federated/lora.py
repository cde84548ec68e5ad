"""LoRA adapter state as plain arrays: slicing to a rank, padding, ΔW, PEFT folders and Flower records.

Every adapter here uses `lora_alpha == r`, so PEFT's scaling alpha/r is 1 and the weight update is exactly
ΔW = B·A whatever the rank. That makes adapters of different ranks comparable, sliceable and summable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    """One adapted linear layer: A is (rank, in_features), B is (out_features, rank)."""

    a: np.ndarray
    b: np.ndarray

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> np.ndarray:
        return self.b @ self.a

    def sliced(self, rank: int) -> LoraPair:
        """The first `rank` components: what a device of that rank receives (HetLoRA's truncation)."""
        return LoraPair(self.a[:rank].copy(), self.b[:, :rank].copy())

    def padded(self, rank: int) -> LoraPair:
        """Zero components appended up to `rank`; ΔW is unchanged."""
        extra = rank - self.rank
        return LoraPair(np.pad(self.a, ((0, extra), (0, 0))), np.pad(self.b, ((0, 0), (0, extra))))


LoraState = dict[str, LoraPair]  # module path (e.g. "model.layers.0.self_attn.q_proj") -> pair


def state_rank(state: LoraState) -> int:
    return max(pair.rank for pair in state.values())


def slice_state(state: LoraState, rank: int, targets: tuple[str, ...]) -> LoraState:
    """The part of a global state a device gets: its own rank, on its own target modules."""
    return {name: pair.sliced(rank) for name, pair in state.items() if name.rsplit(".", 1)[-1] in targets}


def nbytes(state: LoraState) -> int:
    return sum(pair.a.nbytes + pair.b.nbytes for pair in state.values())


def to_arrays(state: LoraState) -> dict[str, np.ndarray]:
    """Flat name -> array mapping, the shape Flower's ArrayRecord and safetensors both take."""
    flat: dict[str, np.ndarray] = {}
    for name, pair in state.items():
        flat[f"{name}.lora_A"] = np.ascontiguousarray(pair.a)
        flat[f"{name}.lora_B"] = np.ascontiguousarray(pair.b)
    return flat


def from_arrays(flat: dict[str, np.ndarray]) -> LoraState:
    names = sorted({key.rsplit(".", 1)[0] for key in flat})
    return {name: LoraPair(flat[f"{name}.lora_A"], flat[f"{name}.lora_B"]) for name in names}


def lora_config(rank: int, targets: tuple[str, ...], base: str | None = None, layers: Sequence[int] | None = None):
    """A PEFT LoraConfig with alpha = rank (scaling 1) and no dropout, so local training is deterministic.
    `layers` limits the adapter to those decoder layers (all when None)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(targets),
        layers_to_transform=None if layers is None else list(layers),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


def wrap(model: torch.nn.Module, rank: int, targets: tuple[str, ...], layers: Sequence[int] | None = None):
    """Inject a fresh LoRA adapter of `rank` into `model` (in place, on `layers` or all) and return the PEFT model."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(rank, targets, layers=layers))


def extract(peft_model) -> LoraState:
    """Read the adapter weights out of a PEFT model as float32 arrays."""
    flat: dict[str, np.ndarray] = {}
    for key, tensor in peft_model.named_parameters():
        if ".lora_A." in key or ".lora_B." in key:
            module, kind = key.removeprefix(PEFT_PREFIX).split(".lora_")
            flat[f"{module}.lora_{kind[0]}"] = tensor.detach().float().cpu().numpy().copy()
    return from_arrays(flat)


def load_into(peft_model, state: LoraState) -> None:
    """Copy `state` into the PEFT model's adapter; shapes must match its rank."""
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, pair in state.items():
            for kind, array in (("A", pair.a), ("B", pair.b)):
                param = params[f"{PEFT_PREFIX}{name}.lora_{kind}.default.weight"]
                param.copy_(torch.from_numpy(array))


def init_state(model: torch.nn.Module, rank: int, targets: tuple[str, ...], seed: int) -> LoraState:
    """PEFT's own initialisation at `rank` (A random, B zero), read out and removed again from `model`."""
    torch.manual_seed(seed)
    peft_model = wrap(model, rank, targets)
    state = extract(peft_model)
    peft_model.unload()
    return state


def save_adapter(state: LoraState, folder: str | Path, base: str) -> Path:
    """Write a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in state}))
    lora_config(state_rank(state), targets, base).save_pretrained(folder)
    tensors = {}
    for name, pair in state.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(pair.a, dtype=np.float32)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(pair.b, dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "fedlm.json").write_text(json.dumps({"rank": state_rank(state), "targets": targets}) + "\n")
    return folder
