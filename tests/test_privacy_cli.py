"""`fedlm privacy scan|audit` and `fedlm bench privacy`: the output contracts and the usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlm.cli import app
from fedlm.privacy import AuditLog, Detector, EgressBlocked, EgressGate

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def loaded() -> None:
    Detector().load()


def test_scan_json_one_object_per_row_in_order(tmp_path: Path) -> None:
    rows = ["Email jordan.reyes@northwind-mail.com today.", "What is the capital of France?", "Call +44 20 7946 0958"]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(rows)) + "\n")
    result = runner.invoke(app, ["privacy", "scan", "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["text"] for o in out] == rows
    assert [o["sensitive"] for o in out] == [True, False, True]
    [email] = out[0]["entities"]
    assert set(email) == {"type", "start", "end", "score", "text"}
    assert (email["type"], rows[0][email["start"] : email["end"]]) == (
        "EMAIL_ADDRESS",
        "jordan.reyes@northwind-mail.com",
    )


def test_scan_text_threshold_and_plain_output() -> None:
    text = "Order (415) 555-2671 arrived."
    assert json.loads(runner.invoke(app, ["privacy", "scan", text, "--json"]).stdout)["sensitive"] is False
    low = runner.invoke(app, ["privacy", "scan", text, "--json", "--threshold", "0.4"])
    assert [e["type"] for e in json.loads(low.stdout)["entities"]] == ["PHONE_NUMBER"]
    plain = runner.invoke(app, ["privacy", "scan", "My password: Hunter2!x"])
    assert plain.exit_code == 0 and "SENSITIVE" in plain.stdout and "PASSWORD" in plain.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["privacy", "scan"], "either TEXT or --data"),
        (["privacy", "scan", "hello", "--data", "x.jsonl"], "either TEXT or --data"),
        (["privacy", "scan", "--data", "missing.jsonl"], "cannot read"),
        (["privacy", "scan", "hi", "--threshold", "2"], "threshold"),
        (["privacy", "audit", "--log", "missing.jsonl"], "no audit log"),
        (["bench", "privacy", "--data", "missing.jsonl"], "no such file"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()).replace("│", "").replace("  ", " ")


def test_scan_rejects_rows_without_text(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "no text field"}\n')
    result = runner.invoke(app, ["privacy", "scan", "--data", str(data), "--json"])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output.replace("\n", "").replace("│", "").replace(" ", "")


def test_audit_summary(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    gate = EgressGate("redact", audit=log)
    gate.outbound("http://127.0.0.1:1/v1/completions", {"prompt": "Tell Sofia Rossi to call +44 20 7946 0958."})
    gate.outbound("http://127.0.0.1:1/v1/completions", {"prompt": "What is the capital of France?"})
    with pytest.raises(EgressBlocked):
        EgressGate("local", audit=log).outbound("kv://peer", {"text": "Tell Sofia Rossi."})
    result = runner.invoke(app, ["privacy", "audit", "--log", str(log.path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["records"], summary["sent"], summary["blocked"]) == (3, 2, 1)
    assert summary["bytes_sent"] == sum(r.bytes for r in log.records())
    assert summary["removed"] == {"PERSON": 2, "PHONE_NUMBER": 1}
    assert summary["by_policy"] == {"redact": 2, "local": 1}
    plain = runner.invoke(app, ["privacy", "audit", "--log", str(log.path)])
    assert "blocked 1" in plain.stdout and "Sofia" not in plain.stdout


def test_bench_privacy_json(tmp_path: Path) -> None:
    data = tmp_path / "labelled.jsonl"
    rows = [
        {"text": "Call Daniel Okafor now.", "entities": [{"type": "PERSON", "start": 5, "end": 18}]},
        {"text": "What is the capital of France?", "entities": []},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "result.json"
    result = runner.invoke(app, ["bench", "privacy", "--data", str(data), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert report["n"] == 2 and report["entities"]["overall"]["recall"] == 1.0
    assert set(report["latency_ms"]["gate"]) == {"p50", "p95", "mean"}
    table = runner.invoke(app, ["bench", "privacy", "--data", str(data)])
    assert table.exit_code == 0 and "sensitive prompts" in table.stdout
