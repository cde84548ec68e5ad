"""fedlm: federated LLM inference and federated specialization, edge and cloud together."""

__version__ = "0.1.0"
