"""Prompt -> cluster routing by lowest perplexity, on adapter folders as a `fedlm train` run writes them."""

from pathlib import Path

import pytest

from conftest import TASK_TEXTS
from fedlm.federated.routing import AdapterRouter, cluster_adapters
from fedlm.models.tiny import tiny_loaded

MATHS, STORY = TASK_TEXTS


def test_a_prompt_goes_to_the_adapter_trained_on_its_task(tiny_clusters: Path) -> None:
    router = AdapterRouter(tiny_loaded(), cluster_adapters(tiny_clusters))
    choice, losses = router.route(MATHS[0])
    assert choice == "0" and losses["0"] < losses["1"] and router.edge.model.active_adapter == "0"
    choice, losses = router.route(STORY[0])
    assert choice == "1" and losses["1"] < losses["0"] and router.edge.model.active_adapter == "1"


def test_a_folder_without_adapters_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        cluster_adapters(tmp_path / "missing")
    (tmp_path / "empty" / "0").mkdir(parents=True)
    with pytest.raises(ValueError, match="no PEFT adapter"):
        cluster_adapters(tmp_path / "empty")
