"""Fusers that ship with fedlm, so KV communication works on a fresh machine without a training run.

Each lives in `fedlm/kvcomm/trained/<receiver>--<transmitter>/`: the weights in float16, the fuser's own config
(model fingerprints, layer map, learning curve) and `manifest.json`, which says what it learned from, the figures
it reached on questions it never saw, and the command that trains it again. They are keyed by base model: a
fuser reads a transmitter's cache whatever adapter that transmitter carries (weights are not in a fingerprint).

A fuser trained on this machine for the pair (`fedlm kv train`, under <cache>/fusers) comes first; the shipped one
is the fallback (`find_fuser`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlm import atomic
from fedlm.kvcomm.fuser import CONFIG_FILE, WEIGHTS_FILE, is_trained, trained_fuser_dir

SHIPPED = Path(__file__).parent / "trained"
MANIFEST = "manifest.json"


def base_name(model: str) -> str:
    """`smollm2-135m-instruct` for `smollm2-135m-instruct+some-adapter` (and for a model folder, its name)."""
    return Path(model.partition("+")[0]).name


def shipped_fuser_dir(receiver: str, transmitter: str, root: Path | None = None) -> Path:
    """Where the pair's fuser is shipped (in `root`, default: the package's)."""
    return (root or SHIPPED) / f"{base_name(receiver)}--{base_name(transmitter)}"


def find_fuser(receiver: str, transmitter: str, task: str | None = "plays") -> Path:
    """The fuser for a model pair: one trained here for `task` if there is one, else the one fedlm ships, else
    where a trained one would be (loading it then says how to train it)."""
    trained = trained_fuser_dir(receiver, transmitter, task)
    if is_trained(trained):
        return trained
    shipped = shipped_fuser_dir(receiver, transmitter)
    return shipped if is_trained(shipped) else trained


def manifest(folder: Path) -> dict[str, Any] | None:
    """A shipped fuser's manifest (None for a fuser trained here)."""
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def ship_fuser(folder: Path, root: Path, receiver: str, transmitter: str, command: str, figures: dict) -> Path:
    """Copy a trained fuser into `root` for shipping: float16 weights, its config, and a manifest with the data,
    the steps, the held-out figures (`figures`: what the benchmark measured with it) and the command."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    state = {
        k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(folder / WEIGHTS_FILE).items()
    }
    extra = config.get("extra", {})
    curve = extra.get("curve", {})
    best = min(curve.get("eval_loss") or [float("nan")])
    dest = shipped_fuser_dir(receiver, transmitter, root)
    with atomic.staged_dir(dest) as staging:
        save_file(state, staging / WEIGHTS_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        weights = hashlib.sha256((staging / WEIGHTS_FILE).read_bytes()).hexdigest()
        record = {
            "receiver": config["receiver"],
            "transmitter": base_name(transmitter),
            "receiver_fingerprint": config["receiver_fingerprint"],
            "transmitter_fingerprint": config["transmitter_fingerprint"],
            "weights_sha256": weights,
            "dtype": "float16",
            "parameters": extra.get("parameters"),
            "data": extra.get("data"),
            "transmitters_trained_over": extra.get("transmitters"),
            "train_pairs": extra.get("train_pairs"),
            "heldout_pairs": extra.get("heldout_pairs"),
            "steps": (extra.get("schedule") or {}).get("steps"),
            "heldout_loss_per_token": {
                "receiver_alone": curve.get("receiver_alone_loss"),
                "fused_best": best,
                "fused_best_step": curve.get("best_step"),
                "transmitter_zeroed": curve.get("zeroed_transmitter_loss"),
            },
            "benchmark": figures,
            "command": command,
            "trained_at": time.strftime("%Y-%m-%d"),
            "fedlm_commit": _commit(),
        }
        (staging / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return dest


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()
