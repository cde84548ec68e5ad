"""End to end on the real default models: converted from the PyPI GGUF packages, served over loopback HTTP.

The first run converts both models into the cache (about 2 minutes on 2 cores); later runs reload in seconds.
"""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedlm.cli import app
from fedlm.cloud.client import CloudClient
from fedlm.cloud.engine import Engine, SamplingParams
from fedlm.cloud.service import background_service
from fedlm.eval.scorers import CloudScorer, LocalScorer
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT, LoadedModel, load
from fedlm.models.token_bytes import token_bytes_table

pytestmark = pytest.mark.real
EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def edge() -> LoadedModel:
    return load(EDGE_DEFAULT, quiet=True)


@pytest.fixture(scope="module")
def cloud() -> LoadedModel:
    return load(CLOUD_DEFAULT, quiet=True)


@pytest.fixture(scope="module")
def cloud_url(cloud: LoadedModel) -> Iterator[str]:
    with background_service(Engine(cloud)) as url:
        yield url


@pytest.mark.parametrize("which", ["edge", "cloud"])
def test_real_tokenizers_round_trip_through_token_bytes(which: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(which).tokenizer
    table = token_bytes_table(tokenizer)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.text(max_size=40))
    def check(text: str) -> None:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        assume(tokenizer.decode(ids, skip_special_tokens=True) == text)  # rare characters can be lossy in the vocab
        assert b"".join(table[i] for i in ids) == text.encode()

    check()


def test_edge_answers_a_factual_question(edge: LoadedModel) -> None:
    engine = Engine(edge)
    ids = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    result = asyncio.run(engine.complete(ids, SamplingParams(max_tokens=24, temperature=0)))
    assert "Paris" in result.text


def test_cloud_answers_over_http(cloud_url: str) -> None:
    with CloudClient(cloud_url) as client:
        reply = client.chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        assert "Paris" in reply["choices"][0]["message"]["content"]
        assert len(reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 5
        assert client.probe().echo


def test_http_scoring_matches_in_process_on_both_models(edge: LoadedModel, cloud: LoadedModel, cloud_url: str) -> None:
    pairs = [
        ("The capital of France is", " Paris."),
        ("Question: What is 7 times 8?\nAnswer:", " 7 * 8 = 56. The answer is 56."),
    ]
    assert CloudScorer(cloud_url).score(pairs) == pytest.approx(LocalScorer(cloud).score(pairs), abs=1e-3)
    with background_service(Engine(edge)) as edge_url:
        assert CloudScorer(edge_url).score(pairs) == pytest.approx(LocalScorer(edge).score(pairs), abs=1e-3)


def test_eval_on_examples_reflects_model_quality(cloud_url: str) -> None:
    runner = CliRunner()
    results = {}
    for task in ("mcq", "bpb"):
        for mode in ("edge", "cloud"):
            args = [
                "eval",
                "--task",
                task,
                "--data",
                str(EXAMPLES / f"{task}.jsonl"),
                "--mode",
                mode,
                "--cloud",
                cloud_url,
                "--json",
            ]
            out = runner.invoke(app, args)
            assert out.exit_code == 0, out.output
            results[task, mode] = json.loads(out.stdout)
    for mode in ("edge", "cloud"):
        assert results["mcq", mode]["accuracy"] >= 0.5  # four choices: chance is 0.25
        assert 0.2 < results["bpb", mode]["bits_per_byte"] < 2.0  # real LMs on plain English


@pytest.mark.parametrize(("lookahead", "protocol"), [(1, "ahead"), (4, "echo")])
def test_fused_generation_on_the_real_pair(edge: LoadedModel, cloud_url: str, lookahead: int, protocol: str) -> None:
    from fedlm.cloud.client import AsyncCloudClient
    from fedlm.fusion.decoder import FusedDecoder, FusionConfig
    from fedlm.fusion.rules import make_rule

    async def run() -> object:
        async with AsyncCloudClient(cloud_url) as client:
            config = FusionConfig(max_tokens=24, lookahead=lookahead, deadline_ms=120_000)
            return await FusedDecoder(edge, make_rule("router"), client, config).generate(
                "What is the capital of France?"
            )

    result = asyncio.run(run())
    assert "Paris" in result.text and not result.text.startswith(" ")
    sources = {t.source for t in result.tokens}
    assert sources & {"fused", "cloud"}, "the cloud's tokenizer shares boundaries with the edge's on plain English"
    assert result.cloud_calls >= 1 and result.fallbacks == 0 and result.cloud_protocol == protocol
    if lookahead == 1:  # lockstep: one request a token, every token read by the cloud
        assert result.cloud_calls == len(result.tokens) + 1 and sources <= {"fused", "cloud"}  # + the end of turn


def test_fused_scoring_on_the_real_pair(edge: LoadedModel, cloud_url: str) -> None:
    from fedlm.eval.scorers import FusedScorer
    from fedlm.fusion.rules import make_rule

    pairs = [
        ("The capital of France is", " Paris, a city on the river Seine."),
        ("Question: What is 7 times 8?\nAnswer:", " 56"),
    ]
    edge_scores = LocalScorer(edge).score(pairs)
    same = FusedScorer(edge, make_rule("router"), cloud_url)
    fused_scores = same.score(pairs)
    assert same.fused_tokens / same.target_tokens > 0.5  # most edge tokens start where a Gemma token starts
    assert all(f < 0 for f in fused_scores) and fused_scores != pytest.approx(edge_scores, abs=1e-3)


def test_projection_between_the_real_tokenizers_moves_mass_only_to_consistent_text(
    edge: LoadedModel, cloud: LoadedModel
) -> None:
    """At every shared boundary of a random text, the cloud's token there lands only on edge tokens that spell
    the same next text, and the edge's own token is among them: no byte is lost or duplicated."""
    import math

    import torch

    from fedlm.cloud.logprobs import CloudCandidate
    from fedlm.fusion.vocab import VocabAligner
    from fedlm.models.token_bytes import token_starts

    aligner = VocabAligner(edge.tokenizer, [edge.tokenizer.eos_token_id])
    edge_table, cloud_table = token_bytes_table(edge.tokenizer), token_bytes_table(cloud.tokenizer)
    flat = torch.full((len(edge_table),), -math.log(len(edge_table)))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=1, max_size=40))
    def check(text: str) -> None:
        e_ids = edge.tokenizer(text, add_special_tokens=False)["input_ids"]
        c_ids = cloud.tokenizer(text, add_special_tokens=False)["input_ids"]
        assume(b"".join(edge_table[i] for i in e_ids) == text.encode() == b"".join(cloud_table[i] for i in c_ids))
        e_starts, _ = token_starts((edge_table[i], "") for i in e_ids)
        c_starts, _ = token_starts((cloud_table[i], "") for i in c_ids)
        edge_at = dict(zip(e_starts, e_ids, strict=True))
        for start, c_id in zip(c_starts, c_ids, strict=True):
            if start not in edge_at:
                continue  # not a shared boundary: the decoder fuses nothing here
            raw = cloud_table[c_id]
            claimed = aligner.targets(CloudCandidate(raw, 0.0)).tolist()
            rest = text[start:].encode()
            assert claimed and all(rest.startswith(edge_table[i]) or edge_table[i].startswith(raw) for i in claimed)
            own = edge_table[edge_at[start]]
            if raw not in aligner.exact:  # with no exact twin, the edge's own spelling is one of the claimants
                assert (own.startswith(raw) or raw.startswith(own)) and edge_at[start] in claimed
            projected = aligner.project([CloudCandidate(raw, math.log(0.5))], flat).logprobs.exp()
            assert abs(float(projected.sum()) - 1) < 1e-4

    check()


def test_kv_communication_on_the_real_pair(
    edge: LoadedModel, cloud: LoadedModel, cloud_url: str, tmp_path: Path
) -> None:
    """Gemma's cache crosses the wire into SmolLM2 through a (briefly) trained fuser; T2T reads Gemma's hint."""
    from fedlm.bench.kv import run_mode
    from fedlm.data.plays import play_questions
    from fedlm.eval.kv_scorer import KVScorer
    from fedlm.eval.mcq import mcq_context
    from fedlm.kvcomm.fuser import CacheFuser, FuserConfig
    from fedlm.kvcomm.receiver import KVReceiver
    from fedlm.kvcomm.t2t import TextTransmitter
    from fedlm.kvcomm.train import FuserTrainConfig, train
    from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters

    pairs = [(mcq_context(r), f" {r.choices[r.answer]}") for r in play_questions(6, "train")]
    fuser = CacheFuser(FuserConfig.for_pair(edge, cloud, hidden=32))
    curve = train(
        fuser, edge, cloud, pairs[:4], pairs[4:], FuserTrainConfig(steps=2, accumulate=2, eval_every=2), progress=False
    )
    assert len(curve.train_loss) == 2 and curve.receiver_alone_loss is not None and len(curve.eval_loss) == 1
    fuser.save(tmp_path / "fuser")
    rows = play_questions(2)
    alone = run_mode(rows, KVScorer(KVReceiver(edge, [])))
    with serve_transmitters(edge, [TransmitterSpec(cloud, tmp_path / "fuser")], "int8") as (transmitters, clients):
        scorer = KVScorer(
            KVReceiver(edge, transmitters), {cloud.name: True}, wire_bytes=lambda: clients[0].traffic.bytes_received
        )
        fused = scorer.score([(mcq_context(r), f" {c}") for r in rows for c in r.choices])
    baseline = KVScorer(KVReceiver(edge, [])).score([(mcq_context(r), f" {c}") for r in rows for c in r.choices])
    assert all(s < 0 for s in fused) and fused != pytest.approx(baseline, abs=1e-6)  # the cache did change
    tokens = len(edge.tokenizer(mcq_context(rows[0]))["input_ids"])
    assert min(scorer.bytes) > 100 * tokens  # a cache crossed the wire (kilobytes per token), not a text
    with CloudClient(cloud_url) as client:
        hint = TextTransmitter(client, max_tokens=8).hint(mcq_context(rows[0]))
    assert hint.text and hint.bytes_received > 0 and alone["n"] == 2


def test_kv_runs_out_of_the_box_on_the_shipped_fuser(edge: LoadedModel, cloud: LoadedModel) -> None:
    """`fedlm eval --mode kv` needs no training step: without a fuser trained here, it reads through the one shipped
    for SmolLM2 <- Gemma."""
    from fedlm.kvcomm.shipped import find_fuser, manifest

    folder = find_fuser(edge.name, cloud.name)
    result = CliRunner().invoke(
        app, ["eval", "--task", "mcq", "--data", str(EXAMPLES / "mcq.jsonl"), "--mode", "kv", "--limit", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fuser"] == str(folder) and report["n"] == 3 and report["bytes_per_text"] > 1000
    assert manifest(folder) is not None or "fusers" in report["fuser"]  # shipped, unless one was trained here


def test_the_demo_device_answers_through_its_cache(edge: LoadedModel) -> None:
    """`fedlm demo`'s KV part: a device memorises 20 people (trained once, then cached), and the receiver is asked
    about 4 of them alone, with the device's hint, with its cache, and with the cache zeroed."""
    from fedlm.bench.kv_devices import one_device

    shown = one_device(edge, asked=4, progress=lambda line: None)
    assert shown["device_recall"] >= 0.9  # the device knows its facts
    modes = shown["modes"]
    assert [m["n"] for m in modes.values()] == [4, 4, 4, 4]
    c2c, t2t = modes["C2C (the device's int8 cache)"], modes["T2T (the device's 8-token hint)"]
    assert c2c["bytes_per_question"] > 10 * t2t["bytes_per_question"] > 0  # a cache crossed, not a line of text
    assert modes["receiver alone"]["bytes_per_question"] == 0
    assert set(shown["example"]["picks"]) == set(modes) and shown["example"]["answer"] in (
        "Paris",
        "Tokyo",
        "Cairo",
        "Lima",
        "Oslo",
        "Delhi",
        "Rome",
        "Sydney",
    )
