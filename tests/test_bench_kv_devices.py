"""The devices benchmark's bookkeeping: the targets it reports, the record of whom selection asked, the plot."""

from pathlib import Path

from fedlm.bench.kv_devices import plot_devices, selection_record, summarize
from fedlm.kvcomm.client import Probe
from fedlm.kvcomm.receiver import Transmitter
from fedlm.kvcomm.select import LinkEstimate, ValueSelector


def _mode(accuracy: float, seconds: float, size: float) -> dict:
    return {
        "accuracy": accuracy,
        "latency_p50_s": seconds,
        "latency_p95_s": 2 * seconds,
        "ready_p50_s": seconds - 0.1,  # the context is ready; scoring the choices takes the rest
        "bytes_per_question": size,
    }


MODES = {
    "receiver": _mode(0.2, 0.3, 0),
    **{f"t2t-{k}": _mode(0.3, 1.0 + k / 10, 500 * k) for k in (1, 2, 4)},
    **{f"c2c-{k}": _mode(a, 0.5, 300_000 * k) for k, a in ((1, 0.3), (2, 0.4), (4, 0.6))},
    "c2c-zeroed-4": _mode(0.15, 0.5, 0),
    "c2c-select": {**_mode(0.75, 0.4, 300_000), "right": [True, False, True, True] * 2},
    "t2t-select": _mode(0.7, 0.8, 500),
}


def test_the_summary_states_each_target_as_measured() -> None:
    summary = summarize(MODES)
    assert summary["c2c-4_vs_t2t-4"] == {
        "points_over_receiver": 40.0,
        "points_over_t2t": 30.0,
        "latency_over_t2t": 0.357,
        "ready_over_t2t": 0.308,  # 0.4 s against 1.3 s
    }
    assert summary["c2c-select_vs_t2t-select"]["points_over_t2t"] == 5.0
    assert summary["by_owner"] == {"c2c-select": [1.0, 0.0, 1.0, 1.0]}  # device i owns questions i, i+4
    assert summary["zeroed_minus_receiver_points"] == -5.0
    assert summary["c2c_by_devices"] == [0.3, 0.4, 0.6] and summary["t2t_by_devices"] == [0.3, 0.3, 0.3]


def test_the_selection_record_counts_how_often_the_owner_was_asked() -> None:
    served = [Transmitter(name, None, lambda text: None) for name in ("a", "b")]  # type: ignore[arg-type]
    links = [LinkEstimate(name, 0.0, 0.01, 1e6, 100) for name in ("a", "b")]
    sure = {"q0": {"a": 0.9, "b": 0.1}, "q1": {"a": 0.8, "b": 0.2}, "q2": {"a": 0.1, "b": 0.7}}
    probes = {name: (lambda text, name=name: Probe(10, sure[text][name], 0.0)) for name in ("a", "b")}
    picker = ValueSelector(links, probes, latency_budget_s=1.0, byte_budget=1_500)
    for text in sure:
        picker(text)
    record = selection_record(picker, served, owner=[0, 1, 1])  # q1 belongs to b, but a was surer
    assert record["asked_the_owner"] == round(2 / 3, 4) and record["devices_asked_mean"] == 1.0
    assert record["owner_certainty_median"] == 0.7 and record["others_certainty_median"] == 0.1


def test_the_plot_is_written(tmp_path: Path) -> None:
    plot_devices({"modes": MODES, "questions": 80, "devices": ["a", "b", "c", "d"]}, tmp_path / "kv_devices.png")
    assert (tmp_path / "kv_devices.png").stat().st_size > 10_000
