"""Schemathesis against both HTTP services, in process (its ASGI transport) on tiny models: every operation of
each service's own OpenAPI schema, valid and invalid requests, every built-in check on (no 5xx, responses and status
codes as documented, invalid data rejected and valid data accepted, ...), a bounded number of requests each.

Schemathesis' pytest plugin does not load under this pytest, so each operation's strategy is driven by hypothesis
directly: the same generation and checks, one test per operation and mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from fedlm.cloud.engine import Engine
from fedlm.cloud.server import Limits, create_app
from fedlm.fusion.decoder import FusionConfig
from fedlm.fusion.rules import make_rule
from fedlm.kvcomm.service import create_transmitter_app
from fedlm.models import LoadedModel
from fedlm.privacy import EgressGate
from fedlm.serve.app import MODEL_NAME, Gateway, create_gateway_app

# per operation and mode: bounded, and the same requests every run, so the suite stays fast and repeatable;
# FEDLM_FUZZ_EXAMPLES=N with FEDLM_FUZZ_RANDOM=1 searches further
EXAMPLES = int(os.environ.get("FEDLM_FUZZ_EXAMPLES", "100"))
DERANDOMIZE = os.environ.get("FEDLM_FUZZ_RANDOM") != "1"
MAX_TOKENS = 8
CLOUD = ["GET /health", "GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions"]
KV = ["GET /health", "GET /v1/models", "POST /v1/kv", "POST /v1/kv/probe"]
GATEWAY = ["GET /health", "GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions"]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


@pytest.fixture(scope="module")
def cloud_app(tiny_llama: LoadedModel) -> FastAPI:
    return create_app(Engine(tiny_llama, max_batch=4, max_model_len=256))


@pytest.fixture(scope="module")
def kv_app(tiny_llama: LoadedModel) -> FastAPI:
    return create_transmitter_app(tiny_llama)


@pytest.fixture(scope="module")
def gateway_app(tiny_llama: LoadedModel, tiny_url: str) -> Iterator[FastAPI]:
    with EgressGate("off") as gate:
        yield create_gateway_app(Gateway(tiny_llama, make_rule("router"), FusionConfig(max_tokens=8), tiny_url, gate))


def _fuzz(app: FastAPI, operation: str, mode: GenerationMode, model: str) -> None:
    method, path = operation.split()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # a request names the served model, or every one of them would stop at the 404 before reaching the engine
    strategy = schema[path][method].as_strategy(generation_mode=mode).map(lambda case: _serving(case, model))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=DERANDOMIZE,
    )
    @given(strategy)
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(excluded_checks=[positive_data_acceptance], additional_checks=[valid_data_accepted])

    run()


# limits that depend on how many tokens a text makes, which no schema can state: a 400 for them is no contract breach
UNSTATABLE = {"context_length_exceeded", "kv_too_large", "last_message_not_user"}


def valid_data_accepted(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Schemathesis' `positive_data_acceptance`, but for the limits in UNSTATABLE: any other 4xx to a request that
    the schema allows breaks the contract."""
    if case.meta is None or not case.meta.generation.mode.is_positive or not 400 <= response.status_code < 500:
        return
    if response.status_code in (401, 404):  # no key, or a model that is not served: the request itself was fine
        return
    code = (response.json().get("error") or {}).get("code")
    assert response.status_code == 400 and code in UNSTATABLE, f"schema-valid request rejected: {response.text}"


def _serving(case: schemathesis.Case, model: str) -> schemathesis.Case:
    """Two rules a schema cannot state: a request names the served model (else each would stop at the 404 before
    reaching the engine), and the prompt and the tokens asked for fit the context together (a budget the schema
    allows is capped at 8 tokens, which also keeps the run fast)."""
    if isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str):
            case.body["model"] = model
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            # only a whole number is capped: a fraction is the invalid value a negative case sent on purpose
            whole = isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
            if whole and 0 <= value <= Limits.max_tokens:
                case.body[field] = min(int(value), MAX_TOKENS)
    return case


def _cases(operations: list[str]) -> list:
    """Each operation in each mode; an operation without parameters or body has no invalid request to make."""
    return [
        pytest.param(op, mode, id=f"{op}-{mode.value}")
        for op in operations
        for mode in MODES
        if not (op.startswith("GET") and mode is GenerationMode.NEGATIVE)
    ]


@pytest.mark.parametrize(("operation", "mode"), _cases(CLOUD))
def test_the_cloud_service_holds_to_its_schema(cloud_app: FastAPI, operation: str, mode: GenerationMode) -> None:
    _fuzz(cloud_app, operation, mode, "tiny-llama")


@pytest.mark.parametrize(("operation", "mode"), _cases(KV))
def test_the_kv_service_holds_to_its_schema(kv_app: FastAPI, operation: str, mode: GenerationMode) -> None:
    _fuzz(kv_app, operation, mode, "tiny-llama")


@pytest.mark.parametrize(("operation", "mode"), _cases(GATEWAY))
def test_the_devices_endpoint_holds_to_its_schema(gateway_app: FastAPI, operation: str, mode: GenerationMode) -> None:
    _fuzz(gateway_app, operation, mode, MODEL_NAME)
