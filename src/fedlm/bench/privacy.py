"""How well the privacy gate finds what it must, what it costs in time, and what it changes that it should not.

A predicted entity counts as found when it has the labelled type and overlaps the labelled span; boundaries may
differ (a title, a trailing word), since the gate replaces whole spans either way. Latency is measured per prompt
on the full gate path (scan, redact, serialise, audit) after the engine has loaded, with the scan cache off.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from fedlm.egress.audit import AuditLog
from fedlm.privacy.detector import Detector, Entity
from fedlm.privacy.gate import EgressGate

LABELLED_SET = "labelled_prompts.jsonl"


@dataclass(frozen=True)
class Label:
    type: str
    start: int
    end: int


@dataclass(frozen=True)
class LabelledPrompt:
    id: int | str
    text: str
    labels: tuple[Label, ...]


def default_labelled_path() -> Path:
    return Path(str(files("fedlm.privacy").joinpath("data", LABELLED_SET)))


def load_labelled(path: Path | None = None) -> list[LabelledPrompt]:
    """Rows `{"text", "entities": [{"type", "start", "end"}]}`; a malformed row raises ValueError naming its line."""
    path = path or default_labelled_path()
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"]
            labels = tuple(Label(e["type"], int(e["start"]), int(e["end"])) for e in row.get("entities", []))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: expected {{'text', 'entities': [...]}} ({err})") from err
        if any(not 0 <= lb.start < lb.end <= len(text) for lb in labels):
            raise ValueError(f"{path}:{number}: a label span lies outside the text")
        rows.append(LabelledPrompt(row.get("id", number), text, labels))
    return rows


def match(labels: tuple[Label, ...], found: tuple[Entity, ...]) -> tuple[list[Label], list[Entity], list[Label]]:
    """Pair labels with same-type overlapping predictions: (matched labels, unmatched predictions, missed labels)."""
    free = list(found)
    hits, misses = [], []
    for label in labels:
        partner = next(
            (e for e in free if e.type == label.type and e.start < label.end and label.start < e.end),
            None,
        )
        if partner is None:
            misses.append(label)
        else:
            free.remove(partner)
            hits.append(label)
    return hits, free, misses


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _scores(tp: int, fp: int, fn: int) -> dict[str, Any]:
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = round(2 * precision * recall / (precision + recall), 4) if precision and recall else None
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"p50": round(statistics.median(ms), 2), "p95": round(p95, 2), "mean": round(statistics.fmean(ms), 2)}


def evaluate(prompts: list[LabelledPrompt], threshold: float = 0.5) -> dict[str, Any]:
    """Entity- and prompt-level precision/recall, gate latency, and how often the gate alters clean prompts."""
    detector = Detector(threshold=threshold, cache_size=0)
    load_seconds = detector.load()
    tp, fp, fn = Counter[str](), Counter[str](), Counter[str]()
    prompt_counts = Counter[str]()
    errors: list[dict[str, Any]] = []
    for prompt in prompts:
        scan = detector.scan(prompt.text)
        hits, extra, missed = match(prompt.labels, scan.entities)
        tp.update(h.type for h in hits)
        fp.update(e.type for e in extra)
        fn.update(m.type for m in missed)
        errors += [{"id": prompt.id, "error": "fp", "type": e.type, "text": e.text} for e in extra]
        errors += [
            {"id": prompt.id, "error": "fn", "type": m.type, "text": prompt.text[m.start : m.end]} for m in missed
        ]
        truth, said = bool(prompt.labels), scan.sensitive
        prompt_counts["tp" if truth and said else "fp" if said else "fn" if truth else "tn"] += 1

    types = sorted(set(tp) | set(fp) | set(fn))
    with tempfile.TemporaryDirectory() as tmp:
        latency, changed = _gate_measurements(prompts, detector, Path(tmp))
    clean = sum(not p.labels for p in prompts)
    return {
        "n": len(prompts),
        "sensitive_prompts": len(prompts) - clean,
        "threshold": threshold,
        "entities": {
            "overall": _scores(sum(tp.values()), sum(fp.values()), sum(fn.values())),
            "by_type": {t: _scores(tp[t], fp[t], fn[t]) for t in types},
        },
        "prompts": _scores(prompt_counts["tp"], prompt_counts["fp"], prompt_counts["fn"]) | {"tn": prompt_counts["tn"]},
        "latency_ms": latency,
        "load_seconds": round(load_seconds, 2),
        "clean_prompts_changed": {policy: {"changed": n, "of": clean} for policy, n in changed.items()},
        "errors": errors,
    }


def _gate_measurements(
    prompts: list[LabelledPrompt], detector: Detector, tmp: Path
) -> tuple[dict[str, Any], dict[str, int]]:
    """Per-prompt latency through the redact gate, and how many clean prompts each policy alters on the wire.

    Each prompt gets fresh gates (one conversation each), so values remembered from one prompt do not mask another.
    """
    audit = AuditLog(tmp / "audit.jsonl")
    scan_seconds, gate_seconds = [], []
    changed = Counter({"redact": 0, "rephrase": 0})
    for prompt in prompts:
        body = {"model": "cloud", "messages": [{"role": "user", "content": prompt.text}], "max_tokens": 16}
        start = time.perf_counter()
        detector.scan(prompt.text)
        scan_seconds.append(time.perf_counter() - start)
        redact = EgressGate("redact", detector=detector, audit=audit)
        sent = redact.outbound("bench", body)
        gate_seconds.append(redact.last_seconds)
        if not prompt.labels:
            plain = EgressGate("off", audit=audit).outbound("bench", body)
            rephrase = EgressGate("rephrase", detector=detector, audit=audit, rewriter=lambda t: "rewritten")
            changed["redact"] += sent != plain
            changed["rephrase"] += rephrase.outbound("bench", body) != plain
    return {"gate": _percentiles_ms(gate_seconds), "detector": _percentiles_ms(scan_seconds)}, dict(changed)
