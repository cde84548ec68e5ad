"""The busy-cloud load used to measure what sharing one machine costs the edge: it keeps a cloud serving, and
stops when its block ends."""

import os
import time

import pytest
from fastapi import FastAPI, Request

from fedlm.bench.placement import busy_cloud
from fedlm.cloud.service import background_app


def test_a_busy_cloud_is_sent_scoring_requests_until_the_block_ends() -> None:
    bodies: list[dict] = []
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        bodies.append(await request.json())
        return {}

    with background_app(app, "counting-cloud") as url:
        with busy_cloud(url, "some-model", "Why is the sky blue?", sorted(os.sched_getaffinity(0))):
            time.sleep(1.0)
        sent = len(bodies)
        time.sleep(0.5)
        assert len(bodies) == sent  # the load process is gone
    assert sent >= 2
    assert {b["model"] for b in bodies} == {"some-model"}
    assert all(b["echo"] and b["max_tokens"] == 0 for b in bodies)
    assert len({b["prompt"] for b in bodies}) == len(bodies)  # no two alike, so no answer is read from a cache


def test_a_busy_cloud_that_cannot_reach_its_cloud_says_so() -> None:
    load = busy_cloud("http://127.0.0.1:9/v1", "m", "p", sorted(os.sched_getaffinity(0)))
    with pytest.raises(RuntimeError, match="got no answer"), load:
        pass
