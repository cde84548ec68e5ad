"""`fedlm generate` end to end on tiny models: the JSON contract, provenance, and the privacy gate in the loop."""

import json
from pathlib import Path

from typer.testing import CliRunner

from fedlm.cli import app

FIELDS = {"text", "tokens", "cloud_calls", "bytes_sent", "bytes_received", "fallbacks", "ttft_ms", "tokens_per_s"}


def _generate(*args: str) -> dict:
    out = CliRunner().invoke(app, ["generate", *args, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def test_json_contract_with_a_cloud(tiny_model_dir: Path, tiny_url: str) -> None:
    result = _generate(
        "Hello there", "--edge", str(tiny_model_dir), "--cloud", tiny_url, "--max-tokens", "12", "--lookahead", "3"
    )
    assert set(result) >= FIELDS
    assert len(result["tokens"]) == 12 and all(t["source"] in {"edge", "cloud", "fused"} for t in result["tokens"])
    assert result["cloud_calls"] >= 4 and result["bytes_sent"] > 0 and result["bytes_received"] > 0
    assert result["tokens_per_s"] > 0 and result["ttft_ms"] > 0


def test_edge_only_makes_no_cloud_call(tiny_model_dir: Path) -> None:
    result = _generate("Hello there", "--edge", str(tiny_model_dir), "--cloud", "none", "--max-tokens", "6")
    assert result["cloud_calls"] == 0 and result["bytes_sent"] == 0
    assert {t["source"] for t in result["tokens"]} == {"edge"}


def test_local_policy_keeps_a_sensitive_prompt_on_the_device(
    tiny_model_dir: Path, tiny_url: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FEDLM_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    prompt = "My IBAN is DE89 3704 0044 0532 0130 00, please summarise my account."
    result = _generate(
        prompt, "--edge", str(tiny_model_dir), "--cloud", tiny_url, "--max-tokens", "6", "--privacy", "local"
    )
    assert result["bytes_sent"] == 0 and {t["source"] for t in result["tokens"]} == {"edge"}
    assert any("local" in w for w in result["warnings"])
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit and all(record["bytes"] == 0 for record in audit)
    assert "DE89" not in (tmp_path / "audit.jsonl").read_text()


def test_bad_options_exit_2(tiny_model_dir: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["generate", "hi", "--fusion", "magic", "--cloud", "none"]).exit_code == 2
    assert runner.invoke(app, ["generate", "hi", "--edge", "no-such-model", "--cloud", "none"]).exit_code == 2
    missing = runner.invoke(
        app, ["generate", "hi", "--edge", str(tiny_model_dir), "--adapter", "/nonexistent", "--cloud", "none"]
    )
    assert missing.exit_code == 2 and "adapter" in missing.output


def test_adapter_folder_is_applied_to_the_edge(tiny_model_dir: Path, tiny_url: str, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from fedlm.models import load

    base = load(str(tiny_model_dir))
    torch.manual_seed(0)
    lora = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    edge = ["Hello there", "--edge", str(tiny_model_dir), "--max-tokens", "8"]
    plain = _generate(*edge, "--cloud", "none")
    adapted = _generate(*edge, "--adapter", str(tmp_path / "adapter"), "--cloud", "none")
    assert adapted["tokens"] != plain["tokens"]  # the adapter changed what the edge says
    fused = _generate(*edge, "--adapter", str(tmp_path / "adapter"), "--cloud", tiny_url, "--fusion", "proxy")
    assert fused["cloud_calls"] > 0 and len(fused["tokens"]) == 8
