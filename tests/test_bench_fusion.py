"""The fusion benchmark on tiny models over loopback: its readings agree with the scorers, and its speed runs say
how the cloud was read."""

from fedlm.bench.fusion import quality, speed
from fedlm.data.jsonl import BpbRow, McqRow
from fedlm.eval.bpb import evaluate_bpb
from fedlm.eval.mcq import evaluate_mcq
from fedlm.eval.scorers import CloudScorer, LocalScorer
from fedlm.models import LoadedModel

QUESTIONS = [
    McqRow(question="What is the capital of France?", choices=["Paris", "Rome", "Madrid"], answer=0),
    McqRow(question="Which one is a colour?", choices=["seven", "blue", "walk", "under"], answer=1),
    McqRow(question="What do bees make?", choices=["honey", "iron"], answer=0),
]
TEXTS = [BpbRow(prompt="Question: what is two and two?\nAnswer:", target=" Two and two make four.")]


def test_quality_reads_each_model_as_its_scorer_does(tiny_llama: LoadedModel, tiny_url: str) -> None:
    result = quality(tiny_llama, CloudScorer(tiny_url), {"mcq": QUESTIONS, "more": QUESTIONS[:2]}, {"bpb": TEXTS})
    assert set(result) == {"mcq", "more", "bpb"}
    modes = {"edge", "cloud", "fused-linear", "fused-router", "fused-proxy", "fused-route"}
    assert all(set(metrics) == modes for metrics in result.values())
    # the benchmark reads both models once per text; its edge and cloud figures are the scorers' own
    assert result["mcq"]["edge"] == evaluate_mcq(QUESTIONS, LocalScorer(tiny_llama))["accuracy"]
    assert result["mcq"]["cloud"] == evaluate_mcq(QUESTIONS, CloudScorer(tiny_url))["accuracy"]
    edge_bpb = evaluate_bpb(TEXTS, LocalScorer(tiny_llama))["bits_per_byte"]
    assert abs(result["bpb"]["edge"] - edge_bpb) < 1e-6
    assert abs(result["bpb"]["cloud"] - evaluate_bpb(TEXTS, CloudScorer(tiny_url))["bits_per_byte"]) < 1e-3


def test_speed_runs_each_lookahead_and_names_how_the_cloud_was_read(tiny_llama: LoadedModel, tiny_url: str) -> None:
    result = speed(tiny_llama, tiny_url, rtts=[0.0], lookaheads=[1, 4], max_tokens=8, deadline_ms=5000)
    runs = {run["lookahead"]: run for run in result["runs"]}
    assert set(runs) == {1, 4} and result["edge_tokens_per_s"] > 0
    cost = result["edge_cost"]  # the edge decoder beside HF generate and the memory floor
    assert cost["edge_ms_per_token"] > 0 and cost["hf_generate_ms_per_token"] > 0
    weights = sum(p.numel() * p.element_size() for p in tiny_llama.model.parameters()) / 1e6
    assert cost["weights_mb"] <= round(weights, 1) and cost["memory_gb_per_s"] > 0
    assert runs[1]["cloud_protocol"] == "ahead"  # lockstep asks for the next token only
    assert runs[4]["cloud_protocol"] == "echo"  # drafts ahead are scored by echo where the server has it
    for run in runs.values():
        assert run["fallbacks"] == 0 and run["cloud_calls"] > 0 and run["ratio_to_edge"] > 0
        assert run["cloud_ms_p50"] is not None and run["cloud_ms_in_edge_tokens"] > 0
