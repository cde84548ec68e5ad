"""A real Flower Simulation Runtime run: tiny model, 3 clients of different ranks, 2 rounds, then a resume."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from peft import PeftModel

from fedlm.egress.audit import AuditLog
from fedlm.federated.config import TrainConfig
from fedlm.federated.runtime import run_simulation
from fedlm.models import load
from fedlm.models.tiny import save_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("federated")
    config = TrainConfig(
        model=str(save_tiny(root / "tiny")),
        data="mix",
        clients=3,
        rounds=2,
        local_steps=2,
        batch_size=4,
        seq_len=32,
        aggregator="hetlora",
        rank_profile="low,mid,high",
        max_texts=12,
        out=str(root / "out"),
    )
    seen: list[int] = []
    run_simulation(config, on_round=seen.append)
    return config, seen


def test_metrics_per_round_and_client(run):
    config, seen = run
    rounds = json.loads((config.out_path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and seen[-1] == 2
    for record in rounds:
        assert [c["rank"] for c in record["clients"]] == [2, 8, 32]
        for client in record["clients"]:
            assert client["ppl"] > 1 and client["global_ppl"] > 1 and client["bytes_up"] > 0
        assert record["bytes_up"] == sum(c["bytes_up"] for c in record["clients"])
    low, mid, high = rounds[0]["clients"]
    assert low["bytes_up"] < mid["bytes_up"] < high["bytes_up"]


def test_adapters_load_with_peft_at_each_clients_rank(run):
    config, _ = run
    for pid, rank in ((0, 2), (2, 32)):
        folder = config.out_path / "clients" / str(pid)
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == rank
        model = PeftModel.from_pretrained(load(config.model).model, folder)
        assert model.peft_config["default"].r == rank
    assert (config.out_path / "clusters" / "0" / "adapter_model.safetensors").is_file()


def test_every_upload_is_in_the_audit_log_without_its_content(run):
    config, _ = run
    rounds = json.loads((config.out_path / "metrics.json").read_text())
    records = [r for r in AuditLog().records() if r.destination.startswith("flower://")]
    uploads = Counter((r.destination, r.bytes) for r in records)
    expected = Counter(
        (f"flower://server/round-{r['round']}/partition-{c['partition_id']}", c["bytes_up"])
        for r in rounds
        for c in r["clients"]
    )
    assert uploads == expected
    assert all(r.policy == "off" and r.action == "sent" and len(r.sha256) == 64 for r in records)


def test_resume_runs_only_the_missing_rounds(run):
    config, _ = run
    before = json.loads((config.out_path / "metrics.json").read_text())
    run_simulation(TrainConfig.from_flat({**config.to_flat(), "rounds": 3}))
    after = json.loads((config.out_path / "metrics.json").read_text())
    assert [r["round"] for r in after] == [1, 2, 3]
    assert after[:2] == before  # rounds 1-2 come from the checkpoint, not from training again


def test_outputs_one_round_behind_their_checkpoint_are_repaired(run):
    """A kill after a round's checkpoint but before its outputs left metrics.json and the adapters a round behind,
    and the restart (nothing left to train) exited 0 without repairing them."""
    config, _ = run
    metrics = config.out_path / "metrics.json"
    complete = json.loads(metrics.read_text())
    metrics.write_text(json.dumps(complete[:-1]))  # as the kill left them
    adapter = config.out_path / "clients" / "0" / "adapter_model.safetensors"
    adapter.unlink()
    run_simulation(TrainConfig.from_flat({**config.to_flat(), "rounds": len(complete)}))
    assert json.loads(metrics.read_text()) == complete and adapter.is_file()


def test_a_real_run_goes_on_past_clients_that_fail_and_names_them(tmp_path: Path) -> None:
    """Through Flower's Simulation Runtime: a client that raises comes back as an error reply, is left out, and the
    round completes with the others; only the sampled clients are asked."""
    config = TrainConfig(
        model=str(save_tiny(tmp_path / "tiny")),
        data="gsm8k",
        clients=6,
        rounds=2,
        local_steps=1,
        batch_size=4,
        seq_len=32,
        max_texts=8,
        participation=0.5,
        fail_rate=0.4,
        out=str(tmp_path / "out"),
    )
    run_simulation(config)
    rounds = json.loads((config.out_path / "metrics.json").read_text())
    assert [len(r["asked"]) for r in rounds] == [3, 3]
    failed = [entry for r in rounds for entry in r["left_out"]]
    assert failed and all("injected failure" in entry["reason"] for entry in failed)
    for r in rounds:  # every asked client either trained or is named as left out
        trained = {c["partition_id"] for c in r["clients"]}
        assert trained | {entry["partition_id"] for entry in r["left_out"]} == set(r["asked"]) and trained


def _descendants(root: int) -> set[int]:
    """Every process below `root`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="processes are listed from /proc")
def test_a_sigkilled_train_takes_its_simulation_with_it(tmp_path: Path) -> None:
    """`fedlm train` killed with SIGKILL runs no cleanup of its own: its simulation (the runtime child and Ray)
    used to run on as orphans and finish the round into the same --out. Now they die with it, and the same
    command resumes from the last complete round to the result of a run never killed."""
    out, model = tmp_path / "out", str(save_tiny(tmp_path / "tiny"))
    settings = ["--model", model, "--data", "mix", "--clients", "2", "--rounds", "4", "--local-steps", "6"]
    settings += ["--max-texts", "8"]
    command = [sys.executable, "-m", "fedlm", "train", *settings]
    train = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, below = time.monotonic() + 120, set()
        while time.monotonic() < deadline and not (out / "metrics.json").exists():  # a round is done: Ray is up
            below |= _descendants(train.pid)
            time.sleep(0.5)
        below |= _descendants(train.pid)
        assert (out / "metrics.json").exists() and len(below) >= 2, "the simulation never got going"
        train.kill()
        train.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in below):
            time.sleep(0.5)
        survivors = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in below if _alive(pid)}
        assert not survivors, f"processes of the killed run live on: {survivors}"
        rounds = len(json.loads((out / "metrics.json").read_text()))
        time.sleep(3)
        assert len(json.loads((out / "metrics.json").read_text())) == rounds  # nothing writes to --out any more
        assert rounds < 4, "the run finished before it could be killed: nothing to resume"
    finally:
        for pid in _descendants(train.pid) | {train.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    clean = tmp_path / "clean"
    for folder in (out, clean):  # the killed run resumed, and a run never killed
        done = subprocess.run([*command, "--out", str(folder)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    resumed, whole = (_without_timing(json.loads((f / "metrics.json").read_text())) for f in (out, clean))
    assert resumed == whole  # given the same seeds, the kill changed nothing


def _without_timing(rounds: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]
