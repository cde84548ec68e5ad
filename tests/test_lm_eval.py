"""lm-evaluation-harness scores through `fedlm serve` as it would through any OpenAI-compatible server: its
`local-completions` model asks each choice's log-likelihood with `echo` + `logprobs`, and the endpoint answers with
the fused model. On the real default models, the accuracy it reports is `fedlm eval --mode fused`'s on the same data.

The task is a local YAML over a JSONL file of the repo, read offline by `datasets`' json builder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_app, background_service
from fedlm.data.jsonl import McqRow, read_rows
from fedlm.eval.mcq import evaluate_mcq
from fedlm.eval.scorers import FusedScorer
from fedlm.fusion.decoder import FusionConfig
from fedlm.fusion.rules import make_rule
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT, LoadedModel, load, resolve
from fedlm.privacy import EgressGate
from fedlm.serve.app import MODEL_NAME, Gateway, create_gateway_app

pytestmark = pytest.mark.real
EXAMPLES = Path(__file__).parent.parent / "examples"
TASK = """task: fedlm_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def edge() -> LoadedModel:
    return load(EDGE_DEFAULT, quiet=True)


@pytest.fixture(scope="module")
def cloud_url() -> Iterator[str]:
    with background_service(Engine(load(CLOUD_DEFAULT, quiet=True))) as url:
        yield url


def test_lm_eval_through_the_endpoint_agrees_with_fedlm_eval_fused(
    edge: LoadedModel, cloud_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(offline, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    rows = read_rows(EXAMPLES / "mcq.jsonl", McqRow)
    data = tmp_path / "mcq.jsonl"
    data.write_text("".join(json.dumps(row.model_dump()) + "\n" for row in rows))
    (tmp_path / "fedlm_mcq.yaml").write_text(TASK.format(data=data))
    expected = evaluate_mcq(rows, FusedScorer(edge, make_rule("router"), cloud_url))["accuracy"]
    with EgressGate("off") as gate:
        app = create_gateway_app(Gateway(edge, make_rule("router"), FusionConfig(max_tokens=1), cloud_url, gate))
        with background_app(app, "fedlm serve") as url:
            model_args = {
                "model": MODEL_NAME,
                "base_url": f"{url}/completions",
                "tokenizer": str(resolve(EDGE_DEFAULT)),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": False,
                "max_retries": 1,
            }
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=model_args,
                tasks=["fedlm_mcq"],
                task_manager=TaskManager(include_path=str(tmp_path)),
                num_fewshot=0,
            )
    measured = results["results"]["fedlm_mcq"]["acc,none"]
    assert measured == pytest.approx(expected)
