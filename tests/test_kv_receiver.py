"""The receiving side of KV communication on tiny models: fusion of several transmitters, masks, QoS selection,
the T2T baseline, and one scorer for every mode."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedlm.bench.kv import wire_sizes
from fedlm.cloud.client import CloudClient
from fedlm.data.jsonl import McqRow
from fedlm.eval.kv_scorer import KVScorer
from fedlm.eval.mcq import mcq_context
from fedlm.eval.scorers import LocalScorer
from fedlm.kvcomm.client import Probe
from fedlm.kvcomm.fuser import CacheFuser, FuserConfig
from fedlm.kvcomm.receiver import KVReceiver, Transmitter, certainty_weights, token_map
from fedlm.kvcomm.select import LinkEstimate, ValueSelector, select
from fedlm.kvcomm.t2t import TextTransmitter, TextTransmitters, hinted_context
from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters
from fedlm.kvcomm.wire import capture
from fedlm.models import LoadedModel

PAIRS = [("Question: What is the capital of France?\nAnswer:", t) for t in (" Paris", " Rome", " Berlin")]


def _fuser(receiver: LoadedModel, transmitter: LoadedModel, seed: int | None) -> CacheFuser:
    """A fuser; with a seed its zero-initialised output layers get random weights, so it changes the cache."""
    fuser = CacheFuser(FuserConfig.for_pair(receiver, transmitter, align="depth", hidden=16))
    if seed is not None:
        torch.manual_seed(seed)
        torch.nn.init.normal_(fuser.projectors.w3, std=0.5)
    return fuser.eval()


def _transmitter(name: str, fuser: CacheFuser, model: LoadedModel) -> Transmitter:
    return Transmitter(name, fuser, lambda text: capture(model, text))


def test_an_untrained_fuser_leaves_the_receiver_exactly_as_it_was(tiny_llama: LoadedModel, tiny_gemma: LoadedModel):
    alone = KVScorer(KVReceiver(tiny_llama, []))
    fused = KVScorer(
        KVReceiver(tiny_llama, [_transmitter("t", _fuser(tiny_llama, tiny_gemma, None), tiny_gemma)]), {"t": True}
    )
    assert alone.score(PAIRS) == pytest.approx(fused.score(PAIRS), abs=1e-6)


def test_the_receiver_alone_scores_as_fedlm_eval_does(tiny_llama: LoadedModel) -> None:
    """Receiver alone through the KV path (context cache, then the target) equals the edge scorer's reading."""
    ours = KVScorer(KVReceiver(tiny_llama, [])).score(PAIRS)
    assert ours == pytest.approx(LocalScorer(tiny_llama).score(PAIRS), abs=1e-4)


def test_targets_read_together_score_as_each_read_alone(tiny_llama: LoadedModel) -> None:
    """One padded batch over the repeated cache gives every target what a pass of its own gives, the cache is left
    as it was, and an empty target scores 0."""
    receiver = KVReceiver(tiny_llama, [])
    ids = tiny_llama.tokenizer(PAIRS[0][0], add_special_tokens=True)["input_ids"]
    cache = receiver.context_cache(ids)
    length = cache.get_seq_length()
    targets = [[5, 9, 13, 2], [7], [], [11, 3]]
    together = receiver.target_logprobs(cache, ids[-1], targets)
    alone = [receiver.target_logprobs(cache, ids[-1], [t])[0] for t in targets]
    assert together == pytest.approx(alone, abs=1e-4) and together[2] == 0.0 and together[0] < together[1] < 0
    assert cache.get_seq_length() == length and cache.layers[0].keys.shape[0] == 1


def test_transmitters_add_up_and_the_mask_leaves_them_out(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    a = _transmitter("a", _fuser(tiny_llama, tiny_gemma, 1), tiny_gemma)
    b = _transmitter("b", _fuser(tiny_llama, tiny_gemma, 2), tiny_gemma)
    receiver = KVReceiver(tiny_llama, [a, b])
    ids = tiny_llama.tokenizer(PAIRS[0][0], add_special_tokens=True)["input_ids"]
    caches = {key: receiver.context_cache(ids, {"a": "a" in key, "b": "b" in key}) for key in ("", "a", "b", "ab")}
    assert receiver.received == {
        "a": 2 * len(capture(tiny_gemma, PAIRS[0][0]).token_ids),
        "b": 2 * len(capture(tiny_gemma, PAIRS[0][0]).token_ids),
    }
    changed = 0
    for layer in range(len(caches[""].layers)):
        base = caches[""].layers[layer].keys
        both = caches["ab"].layers[layer].keys
        expected = base + (caches["a"].layers[layer].keys - base) + (caches["b"].layers[layer].keys - base)
        torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)
        changed += int(not torch.equal(caches["a"].layers[layer].keys, base))
    assert changed > 0  # the seeded fusers do move the cache
    masked = KVScorer(receiver, {"a": False, "b": False}).score(PAIRS)
    assert masked == pytest.approx(KVScorer(KVReceiver(tiny_llama, [])).score(PAIRS), abs=1e-6)
    assert KVScorer(receiver, {"a": True}).score(PAIRS) != pytest.approx(masked, abs=1e-4)


def test_the_surest_transmitter_speaks_loudest(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    """Two transmitters: each residual is weighed by its sender's certainty over the surest one's."""

    def stating(certainty: float):
        return lambda text: replace(capture(tiny_gemma, text), certainty=certainty)

    sure = Transmitter("sure", _fuser(tiny_llama, tiny_gemma, 1), stating(0.8))
    unsure = Transmitter("unsure", _fuser(tiny_llama, tiny_gemma, 2), stating(0.2))
    receiver = KVReceiver(tiny_llama, [sure, unsure])
    ids = tiny_llama.tokenizer(PAIRS[0][0], add_special_tokens=True)["input_ids"]
    masks = {"": {}, "sure": {"sure": True}, "unsure": {"unsure": True}, "both": {"sure": True, "unsure": True}}
    caches = {key: receiver.context_cache(ids, mask) for key, mask in masks.items()}
    for layer in range(len(caches[""].layers)):
        base = caches[""].layers[layer].values
        own = {key: caches[key].layers[layer].values - base for key in ("sure", "unsure")}  # each alone: weight 1
        expected = base + own["sure"] + 0.25 * own["unsure"]
        torch.testing.assert_close(caches["both"].layers[layer].values, expected, atol=1e-5, rtol=0)
    assert certainty_weights([capture(tiny_gemma, "a b"), replace(capture(tiny_gemma, "a b"), certainty=None)]) == [
        1.0,
        1.0,
    ]  # a sender that states no certainty: plain sums, as before


def test_tokens_pair_by_relative_position_when_the_transmitter_read_other_text(tiny_gemma: LoadedModel) -> None:
    text = "Question: What is the capital of France?\nAnswer:"
    spans = [(i, i + 1) for i in range(len(text))]  # one receiver token per character
    same = token_map(text, spans, capture(tiny_gemma, text))
    other = capture(tiny_gemma, "Which city is the French capital? Answer:")
    moved = token_map(text, spans, other)
    assert same.tolist() == sorted(same.tolist()) and moved.tolist() == sorted(moved.tolist())
    assert moved[0] == 0 and moved[-1] == len(other.token_ids) - 1  # the ends meet the ends


def test_t2t_puts_the_transmitters_hint_in_front(tiny_llama: LoadedModel, tiny_url: str) -> None:
    with CloudClient(tiny_url) as client:
        transmitter = TextTransmitter(client, max_tokens=6)
        hint = transmitter.hint(PAIRS[0][0])
        scorer = KVScorer(KVReceiver(tiny_llama, []), hint=transmitter)
        scores = scorer.score(PAIRS)
    hinted = [(hinted_context(c, hint.text), t) for c, t in PAIRS]
    assert scores == pytest.approx(LocalScorer(tiny_llama).score(hinted), abs=1e-4)
    assert hint.bytes_sent > 0 and hint.bytes_received > 0 and scorer.bytes[0] > 0
    assert hinted_context("Q", "  ") == "Q"


def test_t2t_with_several_transmitters_reads_every_hint(tiny_llama: LoadedModel, tiny_url: str) -> None:
    with CloudClient(tiny_url) as first, CloudClient(tiny_url) as second:
        one = TextTransmitter(first, max_tokens=4).hint(PAIRS[0][0])
        both = TextTransmitters([TextTransmitter(first, max_tokens=4), TextTransmitter(second, max_tokens=4)])
        hint = both.hint(PAIRS[0][0])
    # the same greedy server twice: two copies of the one hint, each on a line of its own, and both paid for
    assert hint.text.splitlines() == ([one.text.strip()] * 2 if one.text.strip() else [])
    assert hint.bytes_sent == 2 * one.bytes_sent
    assert hinted_context("Q", "a\nb") == "Hint from another model: a\nHint from another model: b\nQ"


def test_fusion_over_http_matches_fusion_in_process(
    tiny_llama: LoadedModel, tiny_gemma: LoadedModel, tmp_path: Path
) -> None:
    fuser = _fuser(tiny_llama, tiny_gemma, 3)
    fuser.save(tmp_path / "fuser")
    local = KVScorer(
        KVReceiver(tiny_llama, [_transmitter(tiny_gemma.name, fuser, tiny_gemma)]), {tiny_gemma.name: True}
    )
    with serve_transmitters(tiny_llama, [TransmitterSpec(tiny_gemma, tmp_path / "fuser")]) as (transmitters, clients):
        remote = KVScorer(
            KVReceiver(tiny_llama, transmitters),
            {tiny_gemma.name: True},
            wire_bytes=lambda: clients[0].traffic.bytes_received,
        )
        scores = remote.score(PAIRS)
    assert scores == pytest.approx(local.score(PAIRS), abs=1e-2)  # fp16 on the wire
    assert remote.bytes[0] > 0
    sizes = wire_sizes(tiny_gemma, PAIRS[0][0], [1])
    assert sizes["int8/1-layers"]["bytes_per_token"] < sizes["int8/all-layers"]["bytes_per_token"]
    assert (
        sizes["int4/all-layers"]["bytes_per_token"]
        < sizes["int8/all-layers"]["bytes_per_token"]
        < sizes["fp16/all-layers"]["bytes_per_token"]
    )


def _link(name: str, value: float, rtt_s: float, bytes_per_token: float) -> LinkEstimate:
    return LinkEstimate(name, value, rtt_s, bytes_per_s=1e6, bytes_per_token=bytes_per_token)


def test_selection_takes_the_most_value_that_fits_the_budgets() -> None:
    # at 100 tokens: a costs 0.1 + 0.1 = 0.2 s and 100 kB; b 0.05 + 0.05 = 0.1 s and 50 kB; c 0.6 s
    links = [
        _link("a", 0.3, 0.1, 1000),
        _link("b", 0.2, 0.05, 500),
        _link("c", 0.9, 0.5, 1000),
        _link("d", 0.0, 0.0, 1),
    ]
    assert select(links, 100, latency_budget_s=0.25).names == ("a", "b")  # parallel: the slower one's 0.2 s
    assert select(links, 100, latency_budget_s=0.25, byte_budget=120_000).names == ("a",)
    assert select(links, 100, latency_budget_s=0.15).names == ("b",)
    assert select(links, 100, latency_budget_s=1.0).names == ("a", "b", "c")  # d adds nothing, so it is not asked
    nothing = select(links, 100, latency_budget_s=0.01)
    assert nothing.names == () and nothing.mask(links) == {"a": False, "b": False, "c": False, "d": False}
    assert select(links, 100, 0.25).mask(links) == {"a": True, "b": True, "c": False, "d": False}
    with pytest.raises(ValueError, match="distinct"):
        select([links[0], links[0]], 100, 1.0)
    with pytest.raises(ValueError, match="link speed"):
        select([LinkEstimate("x", 1.0, 0.1, 0.0, 1.0)], 100, 1.0)


def test_mcq_rows_score_through_the_shared_metric(tiny_llama: LoadedModel) -> None:
    from fedlm.bench.kv import run_mode

    rows = [McqRow(question="What is the capital of France?", choices=["Paris", "Rome", "Berlin"], answer=0)]
    result = run_mode(rows, KVScorer(KVReceiver(tiny_llama, [])))
    assert result["n"] == 1 and result["accuracy"] in (0.0, 1.0) and result["latency_p50_s"] > 0
    assert mcq_context(rows[0]) == PAIRS[0][0]


def test_cli_eval_kv_and_t2t(tiny_model_dir: Path, tiny_url: str, tmp_path: Path) -> None:
    """`fedlm eval --mode kv` with an untrained (identity) fuser scores exactly as the edge; t2t reads a hint."""
    import json

    from typer.testing import CliRunner

    from fedlm.cli import app
    from fedlm.models import load

    model = load(str(tiny_model_dir), quiet=True)
    CacheFuser(FuserConfig.for_pair(model, model, hidden=8)).save(tmp_path / "fuser")
    data = Path(__file__).parent.parent / "examples" / "mcq.jsonl"
    common = ["eval", "--task", "mcq", "--data", str(data), "--edge", str(tiny_model_dir), "--limit", "4", "--json"]
    runner = CliRunner()
    edge = runner.invoke(app, [*common, "--mode", "edge"])
    kv = runner.invoke(
        app, [*common, "--mode", "kv", "--transmitter", str(tiny_model_dir), "--fuser", str(tmp_path / "fuser")]
    )
    t2t = runner.invoke(app, [*common, "--mode", "t2t", "--cloud", tiny_url])
    assert edge.exit_code == kv.exit_code == t2t.exit_code == 0, kv.output + t2t.output
    e, k, t = (json.loads(r.stdout) for r in (edge, kv, t2t))
    assert k["mode"] == "kv" and t["mode"] == "t2t" and k["n"] == t["n"] == 4
    assert k["accuracy"] == e["accuracy"] and k["bytes_per_text"] > 0
    ask = runner.invoke(
        app,
        ["kv", "ask", "What is the capital of France?", "--receiver", str(tiny_model_dir), "--transmitter",
         str(tiny_model_dir), "--fuser", str(tmp_path / "fuser"), "--max-tokens", "5", "--json"],
    )  # fmt: skip
    assert ask.exit_code == 0, ask.output
    answers = json.loads(ask.stdout)
    assert answers["c2c"]["answer"] == answers["receiver_alone"]["answer"] and answers["c2c"]["bytes_received"] > 0
    missing = runner.invoke(
        app, [*common, "--mode", "kv", "--transmitter", str(tiny_model_dir), "--fuser", str(tmp_path)]
    )
    assert missing.exit_code == 2 and "no trained fuser" in missing.output


def test_the_zeroed_control_feeds_the_fuser_zeros(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    from fedlm.bench.kv import zeroed

    real = _transmitter("t", _fuser(tiny_llama, tiny_gemma, 4), tiny_gemma)
    payload = zeroed(real).send(PAIRS[0][0])
    assert all(not k.any() and not v.any() for k, v in zip(payload.keys, payload.values, strict=True))
    assert payload.spans == real.send(PAIRS[0][0]).spans
    with_cache = KVScorer(KVReceiver(tiny_llama, [real]), {"t": True}).score(PAIRS)
    with_zeros = KVScorer(KVReceiver(tiny_llama, [zeroed(real)]), {"t": True}).score(PAIRS)
    assert with_zeros != pytest.approx(with_cache, abs=1e-5)


def test_a_probe_turns_two_requests_into_a_link_estimate() -> None:
    from fedlm.kvcomm.select import fuser_value, probe_link

    answers = {".": (1, 1_000, 0.05), "a long context": (50, 51_000, 0.15)}
    link = probe_link("t", 0.4, answers.__getitem__, "a long context")
    assert link.rtt_s == 0.05 and link.bytes_per_s == pytest.approx(500_000) and link.bytes_per_token == 1020
    assert link.cost(50) == pytest.approx((0.05 + 51_000 / 500_000, 51_000))
    assert fuser_value({"curve": {"receiver_alone_loss": 4.0, "eval_loss": [1.5, 1.2, 1.3]}}) == pytest.approx(2.8)
    assert fuser_value({}) == 0.0 and fuser_value({"curve": {"receiver_alone_loss": 1.0, "eval_loss": [2.0]}}) == 0.0


def test_the_qos_mode_measures_links_and_runs_with_what_it_chose(
    tiny_llama: LoadedModel, tiny_gemma: LoadedModel, tmp_path: Path
) -> None:
    from fedlm.bench.kv import qos_mode

    fuser = _fuser(tiny_llama, tiny_gemma, 5)
    fuser.config.extra = {"curve": {"receiver_alone_loss": 3.0, "eval_loss": [2.0]}}
    fuser.save(tmp_path / "fuser")
    rows = [McqRow(question="What is the capital of France?", choices=["Paris", "Rome"], answer=0)]
    with serve_transmitters(tiny_llama, [TransmitterSpec(tiny_gemma, tmp_path / "fuser")]) as (transmitters, clients):
        kv = KVReceiver(tiny_llama, transmitters)
        generous = qos_mode(kv, clients, rows, 60.0, lambda: clients[0].traffic.bytes_received)
        strict = qos_mode(kv, clients, rows, 0.0, lambda: clients[0].traffic.bytes_received)
    assert generous["chosen"] == [tiny_gemma.name] and generous["links"][0]["value"] == pytest.approx(1.0)
    assert strict["chosen"] == [] and strict["bytes_per_question"] == 0


def test_the_value_selector_asks_the_devices_most_sure_of_this_text() -> None:
    links = [_link(name, 0.0, 0.05, 1_000) for name in "abc"]  # 100 tokens: 0.15 s and 100 KB each
    sure = {"a": {"x": 0.9, "y": 0.1}, "b": {"x": 0.2, "y": 0.95}, "c": {"x": 0.125, "y": 0.125}}
    probes = {name: (lambda text, name=name: Probe(100, sure[name][text], 0.0)) for name in "abc"}
    one_cache = ValueSelector(links, probes, latency_budget_s=1.0, byte_budget=150_000)
    assert one_cache("x").names == ("a",) and one_cache.names("y") == ("b",)
    assert one_cache.values[1] == {"a": 0.1, "b": 0.95, "c": 0.125}
    assert ValueSelector(links, probes, latency_budget_s=1.0)("x").names == ("a", "b", "c")  # no byte limit
    assert ValueSelector(links, probes, latency_budget_s=0.1)("x").names == ()  # no link is that fast
    with pytest.raises(ValueError, match="every link needs a probe"):
        ValueSelector(links, {"a": probes["a"]}, 1.0)


def test_a_choice_per_context_fuses_only_the_chosen(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    a = _transmitter("a", _fuser(tiny_llama, tiny_gemma, 1), tiny_gemma)
    b = _transmitter("b", _fuser(tiny_llama, tiny_gemma, 2), tiny_gemma)
    receiver = KVReceiver(tiny_llama, [a, b])
    asked: list[str] = []

    def choose(text: str) -> list[str]:
        asked.append(text)
        return ["b"]

    chosen = KVScorer(receiver, choose=choose).score(PAIRS)
    assert chosen == pytest.approx(KVScorer(receiver, {"b": True}).score(PAIRS), abs=1e-6)
    assert chosen != pytest.approx(KVScorer(receiver, {"a": True}).score(PAIRS), abs=1e-4)
    assert asked == [PAIRS[0][0]]  # once per context, with the very text the transmitters would read
    nobody = KVScorer(receiver, choose=lambda text: []).score(PAIRS)
    assert nobody == pytest.approx(KVScorer(KVReceiver(tiny_llama, [])).score(PAIRS), abs=1e-6)


def test_t2t_asks_only_the_chosen_for_hints(tiny_url: str) -> None:
    with CloudClient(tiny_url) as first, CloudClient(tiny_url) as second:
        named = {"first": TextTransmitter(first, max_tokens=4), "second": TextTransmitter(second, max_tokens=4)}
        hint = TextTransmitters(named, choose=lambda context: ["second"]).hint(PAIRS[0][0])
        assert first.traffic.bytes_sent == 0 and second.traffic.bytes_sent == hint.bytes_sent > 0
    with pytest.raises(ValueError, match="by name"):
        TextTransmitters([named["first"]], choose=lambda context: [])
