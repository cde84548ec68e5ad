"""Launchers for Flower's Simulation Runtime and Deployment Runtime, strictly offline and on loopback.

Flower sends telemetry and an update check and lets the SuperLink install app dependencies; Ray probes cloud
metadata addresses and binds the machine's external IP. Every process started here gets `offline_env()`, which
switches all of that off and gives Ray a HOME whose `ray_bootstrap_config.yaml` says `provider: local`, so every
connection stays on 127.0.0.1. The deployment launcher stops exactly the processes it started.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedlm.federated.config import TrainConfig
from fedlm.models.cache import cache_root

LOOPBACK = "127.0.0.1"
RAY_BOOTSTRAP = "provider:\n  type: local\n"


def offline_env(home: Path) -> dict[str, str]:
    """The environment for every Flower and Ray process: no telemetry, no update check, no installs, loopback."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text(RAY_BOOTSTRAP)
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        HOME=str(home),
        FLWR_HOME=str(home / ".flwr"),
        FEDLM_CACHE=str(cache_root()),  # the model cache stays where it is although HOME moves
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    return env


def _rounds_done(out: Path) -> int:
    try:
        return len(json.loads((out / "metrics.json").read_text()))
    except (OSError, ValueError):
        return 0


def _watch(processes: list[subprocess.Popen], out: Path, on_round: Callable[[int], None], done: Callable[[], bool]):
    """Report finished rounds until `done()`; fail as soon as one of our processes dies."""
    reported = _rounds_done(out)
    while not done():
        for process in processes:
            if process.poll() not in (None, 0):
                raise RuntimeError(f"{Path(process.args[0]).name} exited with {process.returncode}; see {out}/logs")
        rounds = _rounds_done(out)
        if rounds != reported:
            reported = rounds
            on_round(rounds)
        time.sleep(1.0)
    on_round(_rounds_done(out))


def run_simulation(config: TrainConfig, on_round: Callable[[int], None] = lambda _: None) -> Path:
    """Run the apps in Flower's Simulation Runtime (Ray), in a child process with the offline environment."""
    out = Path(config.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = offline_env(out / ".home")
    command = [sys.executable, "-m", "fedlm.federated.runtime", json.dumps(config.to_flat())]
    with (logs / "simulation.log").open("w") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _watch([child], out, on_round, lambda: child.poll() is not None)
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait(timeout=30)
    if child.returncode != 0:
        tail = (logs / "simulation.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"simulation failed (exit {child.returncode}):\n{tail}")
    return out


def _simulate(config: TrainConfig) -> None:
    """Child process body: Flower's run_simulation with one CPU per client and Ray on loopback."""
    from flwr.simulation import run_simulation as flower_run_simulation

    from fedlm.federated.client_app import app as client_app
    from fedlm.federated.server_app import make_server_app

    flower_run_simulation(
        server_app=make_server_app(config),
        client_app=client_app,
        num_supernodes=config.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "log_to_driver": False},
        },
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    _simulate(TrainConfig.from_flat(json.loads(sys.argv[1])))
