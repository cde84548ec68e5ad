"""Shared fixtures: tiny random models served over real loopback HTTP, and the real default models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_service
from fedlm.models import LoadedModel
from fedlm.models.tiny import save_tiny, tiny_loaded


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
