"""Run the cloud service: in the foreground for `fedlm cloud serve`, or in a background thread on a free loopback
port, so that even in-process users (the demo, `fedlm eval --mode cloud`) go through real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from fedlm.cloud.engine import Engine
from fedlm.cloud.server import Limits, create_app
from fedlm.net import LOOPBACK


def serve(
    engine: Engine, host: str = LOOPBACK, port: int = 8000, api_key: str | None = None, limits: Limits = Limits()
) -> None:
    uvicorn.run(create_app(engine, api_key, limits), host=host, port=port, log_level="warning")


@contextmanager
def background_app(app: Any, name: str, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve an ASGI app on a free 127.0.0.1 port in a thread until the block exits; yields `http://.../v1`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start on {LOOPBACK}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{LOOPBACK}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def background_service(
    engine: Engine, api_key: str | None = None, startup_timeout_s: float = 30.0, limits: Limits = Limits()
) -> Iterator[str]:
    """Serve `engine` on a free 127.0.0.1 port until the block exits; yields the base URL (`http://.../v1`)."""
    app = create_app(engine, api_key, limits)
    with background_app(app, "the embedded cloud service", startup_timeout_s) as url:
        yield url


@contextmanager
def embedded_service(model: str, api_key: str | None = None, quiet: bool = False) -> Iterator[str]:
    """Load `model`, serve it on a free loopback port for the block, and yield the base URL."""
    from fedlm.models import load  # loading pulls in torch and transformers: only when a service is wanted

    with background_service(Engine(load(model, quiet=quiet)), api_key) as url:
        yield url
