"""Overload is refused at once: past the admission limit a request gets a 503 with Retry-After, the requests
admitted are answered, and /health answers throughout (the load benchmark's own measurement, on a tiny model)."""

import time

from fedlm.bench.load import burst
from fedlm.cloud import engine as engine_module
from fedlm.cloud.engine import Engine
from fedlm.cloud.server import Limits
from fedlm.cloud.service import background_service
from fedlm.models import LoadedModel


def test_a_burst_past_capacity_gets_503s_with_retry_after_and_health_holds(tiny_llama: LoadedModel) -> None:
    original = engine_module._Batch.step

    def slow_step(self: object) -> None:  # 10 ms a token, so the burst outlasts its own arrival
        time.sleep(0.01)
        original(self)

    engine_module._Batch.step = slow_step  # type: ignore[method-assign]
    try:
        with background_service(Engine(tiny_llama, max_batch=4), limits=Limits(max_pending=4, retry_after_s=2)) as url:
            result = burst(url.removesuffix("/v1"), "cloud", "tiny-llama", clients=12, max_tokens=16)
    finally:
        engine_module._Batch.step = original  # type: ignore[method-assign]
    assert set(result["statuses"]) == {"200", "503"} and result["statuses"]["200"] >= 4
    assert sum(result["statuses"].values()) == 12 and result["retry_after"] == ["2"]
    assert result["health_checks"] >= 1 and result["health_ms_max"] is not None
    assert result["latency_ms_p50"] <= result["latency_ms_p95"]
