"""Evaluation: scorers (in process, over HTTP, fused, KV) and metrics (MCQ accuracy, bits per byte, timing)."""
