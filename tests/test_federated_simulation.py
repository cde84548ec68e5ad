"""A real Flower Simulation Runtime run: tiny model, 3 clients of different ranks, 2 rounds, then a resume."""

import json
from collections import Counter

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
