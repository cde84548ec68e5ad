"""Convert built-in GGUF models once into a safetensors cache.

Loading a GGUF file dequantizes every tensor and, for Gemma, converts a 262k-entry tokenizer: about a minute.
A safetensors reload takes seconds, so each built-in model is converted once. The conversion is written to a
staging folder beside the cache entry and swapped into place (`fedlm.atomic.staged_dir`), so an interrupted run never
leaves a broken entry.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlm import atomic
from fedlm.models.registry import BuiltinModel

COMPLETE_MARKER = "fedlm-complete"


def cache_root() -> Path:
    """`$FEDLM_CACHE`, else `~/.cache/fedlm`."""
    return Path(os.environ.get("FEDLM_CACHE") or Path.home() / ".cache" / "fedlm")


def cached_model_dir(model: BuiltinModel) -> Path:
    return cache_root() / "models" / model.name


def ensure_converted(model: BuiltinModel, quiet: bool = False) -> Path:
    """Return the cached HF folder for `model`, converting it from GGUF first if needed."""
    target = cached_model_dir(model)
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Replaces whatever is there: a partial folder from a run older than the marker scheme.
    with (
        tempfile.TemporaryDirectory(prefix=f".{model.name}-", dir=target.parent) as tmp,
        atomic.staged_dir(target) as staging,
    ):
        _convert(model, Path(tmp), staging, quiet)
        (staging / COMPLETE_MARKER).write_text(model.package + "\n")
    return target


def _convert(model: BuiltinModel, scratch: Path, out: Path, quiet: bool) -> None:
    steps = ["locate GGUF", "convert tokenizer", "dequantize weights", "write safetensors"]
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=quiet, transient=False) as progress:
        task = progress.add_task(f"{model.name}: {steps[0]}", total=len(steps))
        gguf = model.gguf_path(scratch)
        progress.update(task, advance=1, description=f"{model.name}: {steps[1]}")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress.update(task, advance=1, description=f"{model.name}: {steps[2]}")
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        progress.update(task, advance=1, description=f"{model.name}: {steps[3]}")
        lm.hf_quantizer = None  # the weights are dequantized already; this lets save_pretrained run
        lm.save_pretrained(out)
        tokenizer.save_pretrained(out)
        progress.update(task, advance=1, description=f"{model.name}: done")
