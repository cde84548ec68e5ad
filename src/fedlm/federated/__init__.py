"""Federated specialization on Flower: per-device LoRA ranks, heterogeneous-rank aggregation, task clusters, DP."""
