"""Shared fixtures: tiny random models served over real loopback HTTP, and the real default models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_service
from fedlm.models import LoadedModel
from fedlm.models.tiny import save_tiny, tiny_loaded


def missing_peer(message: str) -> NoReturn:
    """A peer (software nobody here wrote) is not installed: skip, or fail where `make test` requires peers."""
    if os.environ.get("FEDLM_REQUIRE_PEERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's Chromium and its ChromeDriver (`make peers` installs them)."""
    paths = ("/usr/bin/chromium", "/usr/bin/chromedriver")
    if not all(Path(path).is_file() for path in paths):
        missing_peer(f"{' and '.join(paths)} are needed: make peers installs Debian's chromium and chromium-driver")
    return paths


@pytest.fixture(scope="session", autouse=True)
def _audit_log_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every cloud request is audited: keep the tests' records out of the user's own log."""
    patch = pytest.MonkeyPatch()
    patch.setenv("FEDLM_AUDIT_LOG", str(tmp_path_factory.mktemp("audit") / "audit.jsonl"))
    patch.delenv("FEDLM_PRIVACY", raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return tiny_loaded("llama")


@pytest.fixture(scope="session")
def tiny_gemma() -> LoadedModel:
    return tiny_loaded("gemma3", seed=1)


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama: LoadedModel) -> Engine:
    return Engine(tiny_llama, max_batch=4)


@pytest.fixture(scope="session")
def tiny_url(tiny_engine: Engine) -> Iterator[str]:
    with background_service(tiny_engine) as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


TASK_TEXTS = (
    ["Question: What is two plus two?\nAnswer: four"] * 4,
    ["Once upon a time, a keeper watched the sea from a lighthouse."] * 4,
)


@pytest.fixture(scope="session")
def tiny_clusters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `fedlm train` run's `clusters/` for the tiny llama: adapter "0" learned maths, "1" a story (TASK_TEXTS)."""
    from fedlm.federated import lora
    from fedlm.federated.local import train_steps

    out, loaded, targets = tmp_path_factory.mktemp("run") / "clusters", tiny_loaded("llama"), ("q_proj", "v_proj")
    for name, texts in zip(("0", "1"), TASK_TEXTS, strict=True):
        start = lora.init_state(loaded.model, 4, targets, seed=0)
        model = lora.wrap(loaded.model, 4, targets)
        lora.load_into(model, start)
        train_steps(model, loaded.tokenizer, texts, steps=25, batch_size=2, seq_len=32, lr=3e-2, seed=0)
        lora.save_adapter(lora.extract(model), out / name, "tiny")
        model.unload()
    return out
