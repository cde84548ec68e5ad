"""Shipped fusers: exported in float16 with a manifest, found when nothing was trained here, and never preferred
over a fuser trained here for the pair."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlm.kvcomm import shipped
from fedlm.kvcomm.fuser import WEIGHTS_FILE, CacheFuser, FuserConfig, trained_fuser_dir
from fedlm.models import LoadedModel


def _trained(receiver: LoadedModel, transmitter: LoadedModel, folder: Path) -> CacheFuser:
    torch.manual_seed(0)
    fuser = CacheFuser(FuserConfig.for_pair(receiver, transmitter, hidden=8))
    with torch.no_grad():
        for param in fuser.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    fuser.config.extra = {
        "data": "city-facts",
        "transmitters": 2,
        "train_pairs": 10,
        "heldout_pairs": 2,
        "schedule": {"steps": 3},
        "curve": {
            "receiver_alone_loss": 9.0,
            "eval_loss": [3.0, 1.5, 2.0],
            "best_step": 2,
            "zeroed_transmitter_loss": 4.0,
        },
        "parameters": sum(p.numel() for p in fuser.parameters()),
    }
    fuser.save(folder)
    return fuser


def test_a_shipped_fuser_is_half_precision_with_a_manifest_and_loads_for_its_pair(
    tiny_llama: LoadedModel, tiny_gemma: LoadedModel, tmp_path: Path
) -> None:
    fuser = _trained(tiny_llama, tiny_gemma, tmp_path / "trained")
    figures = {"accuracy": {"c2c-4": 0.5}}
    dest = shipped.ship_fuser(
        tmp_path / "trained", tmp_path / "ship", tiny_llama.name, "tiny-gemma+adapter", "cmd", figures
    )
    assert dest == tmp_path / "ship" / "tiny-llama--tiny-gemma"  # keyed by base model: any adapter reads through it
    assert {t.dtype for t in load_file(dest / WEIGHTS_FILE).values()} == {torch.float16}
    record = shipped.manifest(dest)
    assert record is not None and record["command"] == "cmd" and record["benchmark"] == figures
    assert record["transmitter_fingerprint"] == fuser.config.transmitter_fingerprint
    assert record["heldout_loss_per_token"] == {
        "receiver_alone": 9.0, "fused_best": 1.5, "fused_best_step": 2, "transmitter_zeroed": 4.0,
    }  # fmt: skip
    assert (record["steps"], record["train_pairs"], record["transmitters_trained_over"]) == (3, 10, 2)
    loaded = CacheFuser.load(dest, tiny_llama, tiny_gemma)
    for name, value in fuser.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, atol=1e-3, rtol=1e-3)  # float16 steps
    assert shipped.manifest(tmp_path / "trained") is None


def test_a_fuser_trained_here_comes_before_the_shipped_one(
    tiny_llama: LoadedModel, tiny_gemma: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shipped, "SHIPPED", tmp_path / "ship")
    nowhere = shipped.find_fuser("tiny-llama", "tiny-gemma")
    assert nowhere == trained_fuser_dir("tiny-llama", "tiny-gemma")  # loading it says how to train one
    _trained(tiny_llama, tiny_gemma, tmp_path / "made")
    shipped.ship_fuser(tmp_path / "made", tmp_path / "ship", "tiny-llama", "tiny-gemma", "cmd", {})
    assert shipped.find_fuser("tiny-llama", "tiny-gemma+my-adapter") == tmp_path / "ship" / "tiny-llama--tiny-gemma"
    _trained(tiny_llama, tiny_gemma, trained_fuser_dir("tiny-llama", "tiny-gemma", "plays"))
    assert shipped.find_fuser("tiny-llama", "tiny-gemma") == trained_fuser_dir("tiny-llama", "tiny-gemma", "plays")


def test_the_shipped_fusers_are_whole() -> None:
    """Every fuser in the package has weights, a config and a manifest that agree (the weights' hash)."""
    import hashlib

    folders = sorted(p for p in shipped.SHIPPED.iterdir() if p.is_dir()) if shipped.SHIPPED.is_dir() else []
    assert folders, "fedlm ships fusers for its default pairs"
    for folder in folders:
        record = json.loads((folder / shipped.MANIFEST).read_text())
        assert record["weights_sha256"] == hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
        assert folder.name == f"{record['receiver']}--{record['transmitter']}"
        assert record["command"].startswith("fedlm ") and record["heldout_loss_per_token"]["fused_best"] is not None
