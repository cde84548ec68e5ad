"""`fedlm bench serve` on tiny models: every path gives the same answers, and every client is answered."""

from pathlib import Path

import pytest

from fedlm.bench.endpoint import measure, plot
from fedlm.fusion.rules import make_rule
from fedlm.models import LoadedModel


def test_the_endpoint_bench_measures_every_path_and_every_client(
    tiny_llama: LoadedModel, tiny_url: str, tmp_path: Path
) -> None:
    # a deadline no busy machine misses: greedy answers are then the same on every path
    result = measure(tiny_llama, make_rule("router"), tiny_url, max_tokens=6, repeats=2, clients=3, deadline_ms=60_000)
    overhead, clients = result["overhead"], result["clients"]
    assert overhead["same_answers"] and len(overhead["direct_ms_per_token"]) == len(overhead["kept_ms_per_token"]) == 2
    for name, against in (("ratio", "direct"), ("ratio_to_kept_client", "kept")):
        measured = overhead["endpoint_ms_per_token_median"] / overhead[f"{against}_ms_per_token_median"]
        assert overhead[name] == pytest.approx(measured, abs=0.002)  # the medians are rounded to 0.01 ms
    at_once, one = clients["at_once"], clients["one_client"]
    assert at_once["errors"] == 0 and at_once["requests"] == one["requests"] == 3
    assert at_once["tokens"] == one["tokens"] > 0  # greedy: the same answers both times
    plot(result, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").stat().st_size > 0
