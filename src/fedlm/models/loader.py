"""Resolve a model name or folder to a loaded HF causal LM and its tokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedlm.models.cache import ensure_converted
from fedlm.models.registry import BUILTIN


class UnknownModelError(ValueError):
    """Raised for a name that is neither built in nor an existing HF model folder."""


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    load_seconds: float = field(default=0.0)

    @property
    def eos_ids(self) -> list[int]:
        """Every token that ends generation: the generation config's, then the tokenizer's own if it differs."""
        configured = self.model.generation_config.eos_token_id
        ids = [configured] if isinstance(configured, int) else list(configured or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids


def resolve(name_or_path: str, quiet: bool = False) -> Path:
    """Return the HF folder for a built-in name (converting it once) or a local model folder."""
    if name_or_path in BUILTIN:
        return ensure_converted(BUILTIN[name_or_path], quiet=quiet)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    known = ", ".join(sorted(BUILTIN))
    hint = "that folder has no config.json" if path.is_dir() else "no such built-in name or folder"
    raise UnknownModelError(
        f"unknown model {name_or_path!r} ({hint}). Built-in names: {known}; or pass a local HF model folder."
    )


def load(name_or_path: str, quiet: bool = False, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load model and tokenizer in eval mode. Never reaches a hub: only local files are read."""
    start = time.perf_counter()
    folder = resolve(name_or_path, quiet=quiet)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name_or_path, model, tokenizer, time.perf_counter() - start)


WEIGHTS = ("float32", "bfloat16", "int8")


def load_weights(name_or_path: str, weights: str = "float32", quiet: bool = False) -> LoadedModel:
    """Load a model to serve with `weights`: float32, bfloat16, or int8 linear layers (`models.quantize`), which
    decode faster on a CPU at some cost in exactness (measured in `models.quantize`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    loaded = load(name_or_path, quiet=quiet, dtype=torch.float32 if weights == "float32" else torch.bfloat16)
    if weights == "int8":
        from fedlm.models.quantize import int8_weights

        int8_weights(loaded.model)
    return loaded


def with_adapter(loaded: LoadedModel, adapter: str | Path, merge: bool = False) -> LoadedModel:
    """`loaded` with a PEFT adapter folder applied, named `<model>+<folder>`.

    Unmerged, the result keeps `disable_adapter()`, so the base model's beliefs stay available (fusion's experts).
    Merged, it is a plain model again, faster to run: the form a transmitter wants.
    """
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{str(adapter)!r} is not a PEFT adapter folder (no adapter_config.json)")
    from peft import PeftModel

    model = PeftModel.from_pretrained(loaded.model, folder).eval()
    if merge:
        model = model.merge_and_unload()
    return LoadedModel(f"{loaded.name}+{folder.name}", model, loaded.tokenizer, loaded.load_seconds)


def load_spec(spec: str, quiet: bool = False) -> LoadedModel:
    """`MODEL` or `MODEL+ADAPTER_DIR` (the adapter merged in): how a command names, e.g., an adapted transmitter."""
    name, plus, adapter = spec.partition("+")
    loaded = load(name, quiet=quiet)
    return with_adapter(loaded, adapter, merge=True) if plus else loaded
