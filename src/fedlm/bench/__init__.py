"""Evaluation and benchmarks: accuracy, bits per byte, speed, bytes on the wire."""
