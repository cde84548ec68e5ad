"""Launchers for Flower's Simulation Runtime and Deployment Runtime, strictly offline and on loopback.

Flower sends telemetry and an update check and lets the SuperLink install app dependencies; Ray probes cloud
metadata addresses and binds the machine's external IP. Every process started here gets `offline_env()`, which
switches all of that off and gives Ray a HOME whose `ray_bootstrap_config.yaml` says `provider: local`, so every
connection stays on 127.0.0.1. The deployment launcher stops exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedlm.egress.audit import default_audit_path
from fedlm.federated.config import TrainConfig
from fedlm.federated.tls import make_keys
from fedlm.models.cache import cache_root
from fedlm.net import LOOPBACK, free_port

LIFELINE_ENV = "FEDLM_LIFELINE_FD"  # the simulation child's end of a pipe its parent holds open while it lives
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
        FEDLM_CACHE=str(cache_root()),  # the model cache and the audit log stay where they are although HOME moves
        FEDLM_AUDIT_LOG=str(default_audit_path()),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        RAY_worker_niceness="0",  # Ray lowers its workers' priority (nice 15) by default: clients would starve
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
    lifeline, held = os.pipe()  # the child's read end sees EOF the moment this process is gone, however it went
    env[LIFELINE_ENV] = str(lifeline)
    with (logs / "simulation.log").open("w") as log:
        child = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lifeline,), start_new_session=True
        )
        os.close(lifeline)
        try:
            _watch([child], out, on_round, lambda: child.poll() is not None)
        finally:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)  # the child and Ray, which run in its process group
                child.wait(timeout=30)
            os.close(held)
    if child.returncode != 0:
        tail = (logs / "simulation.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"simulation failed (exit {child.returncode}):\n{tail}")
    return out


def _hold_lifeline() -> None:
    """In the simulation child: when the process that started it is gone (the lifeline pipe reads EOF), kill the
    child's whole process group, Ray included. Killed with SIGKILL, `fedlm train` runs no cleanup of its own;
    without this its simulation ran on as orphans and finished the round into the same `--out`."""
    fd = int(os.environ.pop(LIFELINE_ENV, "-1"))
    if fd < 0:
        return

    def watch() -> None:
        while os.read(fd, 1):  # nothing is ever written: this returns only at EOF
            continue
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="fedlm-lifeline", daemon=True).start()


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


def write_app(folder: Path, config: TrainConfig) -> Path:
    """A Flower App folder whose components are the installed fedlm apps (no code is shipped or installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    defaults = "\n".join(f"{key} = {json.dumps(value)}" for key, value in config.to_flat().items())
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "fedlm-federated"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "fedlm"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedlm.federated.server_app:app"\n'
        'clientapp = "fedlm.federated.client_app:app"\n\n'
        f"[tool.flwr.app.config]\n{defaults}\n"
    )
    return folder


def run_deployment(
    config: TrainConfig,
    budgets: list[str] | None = None,
    on_round: Callable[[int], None] = lambda _: None,
    timeout: float = 3600.0,
) -> Path:
    """Start a SuperLink and one SuperNode per client on 127.0.0.1, run the app with `flwr run`, stop them.

    Each SuperNode gets its partition and, from `budgets` (round-robin), its `hardware-budget` through
    `--node-config`, as a real device would. Only the processes started here are stopped, by their own handles.
    """
    from fedlm.federated.profiles import budget_for, parse_profile_map

    out = Path(config.out).resolve()
    config = TrainConfig.from_flat({**config.to_flat(), "out": str(out)})
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = offline_env(out / ".home")
    budgets = budgets or parse_profile_map(config.rank_profile)
    link_port = free_port()
    flwr_home = Path(env["FLWR_HOME"])
    flwr_home.mkdir(parents=True, exist_ok=True)
    keys = make_keys(out / ".home" / "keys", config.clients)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedlm"\n\n[superlink.fedlm]\naddress = "{LOOPBACK}:{link_port}"\n'
        f'root-certificates = "{keys.ca}"\n'
    )
    bin_dir = Path(sys.executable).parent
    tls = ["--ssl-ca-certfile", str(keys.ca), "--ssl-certfile", str(keys.server_cert), "--ssl-keyfile"]
    commands = [
        [
            str(bin_dir / "flower-superlink"),
            *tls,
            str(keys.server_key),
            "--enable-supernode-auth",
            "--host",
            LOOPBACK,
            "--port",
            str(link_port),
            "--disable-runtime-dependency-installation",
            "--database",
            str(out / ".home" / "superlink.db"),
        ],
    ]
    for pid in range(config.clients):
        node_config = f'partition-id={pid} num-partitions={config.clients} hardware-budget="{budget_for(pid, budgets)}"'
        commands.append(
            [
                str(bin_dir / "flower-supernode"),
                "--root-certificates",
                str(keys.ca),
                "--auth-supernode-private-key",
                str(keys.node_keys[pid]),
                "--superlink",
                f"{LOOPBACK}:{link_port}",
                "--host",
                LOOPBACK,
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ]
        )
    started: list[subprocess.Popen] = []
    handles = []
    try:
        for index, command in enumerate(commands):
            handle = (logs / ("superlink.log" if index == 0 else f"supernode-{index - 1}.log")).open("w")
            handles.append(handle)
            started.append(subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT))
            if index == 0:
                _wait_for_port(link_port, started[0])
                for node_key in keys.node_keys:  # only these SuperNodes may join
                    _flwr(bin_dir, env, ["supernode", "register", str(node_key.with_suffix(".pub")), "fedlm"])
        app_dir = write_app(out / ".home" / "app", config)
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in config.to_flat().items())
        submitted = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app_dir), "fedlm", "--run-config", overrides, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if submitted.returncode != 0:
            raise RuntimeError(f"flwr run failed: {submitted.stdout}{submitted.stderr}")
        run_id = json.loads(submitted.stdout)["run-id"]
        deadline = time.monotonic() + timeout
        _watch(started, out, on_round, lambda: _run_finished(bin_dir, env, run_id, deadline))
        status = _run_status(bin_dir, env, run_id)
        if status != "finished:completed":
            raise RuntimeError(f"deployment run {run_id} ended as {status!r}; see {logs}")
    finally:
        for process in reversed(started):
            if process.poll() is None:
                process.terminate()
        for process in reversed(started):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for handle in handles:
            handle.close()
    return out


def _flwr(bin_dir: Path, env: dict[str, str], args: list[str]) -> str:
    """Run one `flwr` CLI command against the SuperLink; its output, or an error naming what it said."""
    done = subprocess.run([str(bin_dir / "flwr"), *args], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args[:2])} failed: {done.stdout}{done.stderr}")
    return done.stdout


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the SuperLink did not listen on {LOOPBACK}:{port} within {seconds:.0f} s")


def _run_status(bin_dir: Path, env: dict[str, str], run_id: int) -> str:
    """`flwr list` for one run (about a second of CPU per call, so it is polled slowly)."""
    listed = subprocess.run(
        [str(bin_dir / "flwr"), "list", "fedlm", "--run-id", str(run_id), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return str(json.loads(listed.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"


def _run_finished(bin_dir: Path, env: dict[str, str], run_id: int, deadline: float) -> bool:
    if time.monotonic() > deadline:
        raise RuntimeError(f"deployment run {run_id} did not finish in time")
    time.sleep(4.0)
    return _run_status(bin_dir, env, run_id).startswith("finished")


if __name__ == "__main__":
    _hold_lifeline()
    _simulate(TrainConfig.from_flat(json.loads(sys.argv[1])))
