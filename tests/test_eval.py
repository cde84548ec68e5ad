"""Scoring: in-process and over HTTP must agree; the metrics are computed as documented."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlm.cli import app
from fedlm.data.jsonl import BpbRow, DataError, McqRow, read_rows
from fedlm.eval.bpb import evaluate_bpb
from fedlm.eval.mcq import evaluate_mcq, mcq_pairs
from fedlm.eval.scorers import CloudScorer, LocalScorer
from fedlm.models import LoadedModel

EXAMPLES = Path(__file__).parent.parent / "examples"
PAIRS = [
    ("The capital of France is", " Paris."),
    ("Question: What is two plus two?\nAnswer:", " four"),
    ("Les élèves", " étudient à l'école 🎉"),
]


def test_local_and_http_scores_agree(tiny_llama: LoadedModel, tiny_url: str) -> None:
    local = LocalScorer(tiny_llama).score(PAIRS)
    remote = CloudScorer(tiny_url).score(PAIRS)
    assert all(v < 0 for v in local)
    assert local == pytest.approx(remote, abs=1e-3)


def test_local_score_is_the_sum_over_target_tokens(tiny_llama: LoadedModel) -> None:
    import torch

    scorer = LocalScorer(tiny_llama)
    context, target = "The capital of France is", " Paris."
    ids = tiny_llama.tokenizer(context + target)["input_ids"]
    n_context = len(tiny_llama.tokenizer(context)["input_ids"])
    assert tiny_llama.tokenizer.decode(ids[n_context:]) == target  # this pair splits cleanly on a token boundary
    with torch.no_grad():
        logprobs = tiny_llama.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(n_context, len(ids)))
    assert scorer.logprob(context, target) == pytest.approx(expected, abs=1e-5)


class FixedScorer:
    """Returns given scores, to check the metrics' arithmetic by hand."""

    name = "fixed"

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def score(self, pairs, progress=None) -> list[float]:
        assert len(pairs) == len(self.scores)
        return self.scores


def test_mcq_accuracy_and_length_normalised_accuracy() -> None:
    rows = [
        McqRow(question="q1", choices=["a", "bbbbbbbb"], answer=1),
        McqRow(question="q2", choices=["x", "y"], answer=0),
    ]
    assert mcq_pairs(rows[0]) == [("Question: q1\nAnswer:", " a"), ("Question: q1\nAnswer:", " bbbbbbbb")]
    result = evaluate_mcq(rows, FixedScorer([-2.0, -3.0, -1.0, -2.0]))
    assert result["accuracy"] == 0.5  # q1 picks "a" by sum, q2 picks "x"
    assert result["accuracy_norm"] == 1.0  # per byte: -2/2 = -1 vs -3/9: "bbbbbbbb" wins q1


def test_bits_per_byte_pools_bits_over_bytes() -> None:
    rows = [BpbRow(prompt="p", target="ab"), BpbRow(prompt="p", target="é")]  # 2 + 2 UTF-8 bytes
    result = evaluate_bpb(rows, FixedScorer([-math.log(2) * 3, -math.log(2) * 5]))
    assert result["bits_per_byte"] == pytest.approx(8 / 4)
    assert result["target_bytes"] == 4


def test_bad_rows_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
        + "\n"
        + json.dumps({"question": "q", "choices": ["a"], "answer": 3})
        + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_rows(bad, McqRow)
    with pytest.raises(DataError, match="not found"):
        read_rows(tmp_path / "missing.jsonl", BpbRow)


def test_examples_are_valid() -> None:
    assert len(read_rows(EXAMPLES / "mcq.jsonl", McqRow)) >= 20
    assert len(read_rows(EXAMPLES / "bpb.jsonl", BpbRow)) >= 10


def test_cli_eval_edge_and_cloud_json(tiny_model_dir: Path, tiny_url: str) -> None:
    runner = CliRunner()
    edge = runner.invoke(
        app,
        [
            "eval",
            "--task",
            "bpb",
            "--data",
            str(EXAMPLES / "bpb.jsonl"),
            "--mode",
            "edge",
            "--edge",
            str(tiny_model_dir),
            "--limit",
            "3",
            "--json",
        ],
    )
    assert edge.exit_code == 0, edge.output
    cloud = runner.invoke(
        app,
        [
            "eval",
            "--task",
            "bpb",
            "--data",
            str(EXAMPLES / "bpb.jsonl"),
            "--mode",
            "cloud",
            "--cloud",
            tiny_url,
            "--limit",
            "3",
            "--json",
        ],
    )
    assert cloud.exit_code == 0, cloud.output
    e, c = json.loads(edge.stdout), json.loads(cloud.stdout)
    assert e["task"] == c["task"] == "bpb" and e["n"] == c["n"] == 3
    assert e["mode"] == "edge" and c["mode"] == "cloud" and c["model"] == "tiny-llama"
    assert e["bits_per_byte"] > 0  # a saved-and-reloaded copy of another random model: no agreement expected here
    mcq = runner.invoke(
        app,
        [
            "eval",
            "--task",
            "mcq",
            "--data",
            str(EXAMPLES / "mcq.jsonl"),
            "--mode",
            "cloud",
            "--cloud",
            tiny_url,
            "--limit",
            "4",
            "--json",
        ],
    )
    assert mcq.exit_code == 0, mcq.output
    assert 0 <= json.loads(mcq.stdout)["accuracy"] <= 1


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["eval", "--task", "mcq", "--data", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "not found" in missing.output
    unknown = runner.invoke(
        app, ["eval", "--task", "bpb", "--data", str(EXAMPLES / "bpb.jsonl"), "--edge", "no-such-model"]
    )
    assert unknown.exit_code == 2 and "smollm2-135m-instruct" in unknown.output
    bad_task = runner.invoke(app, ["eval", "--task", "qa", "--data", str(EXAMPLES / "bpb.jsonl")])
    assert bad_task.exit_code == 2
