"""Model names to loaded HF models: built-in offline defaults, local folders, tiny test models."""

from fedlm.models.loader import WEIGHTS, LoadedModel, UnknownModelError, load, load_weights, resolve
from fedlm.models.registry import BUILTIN, CLOUD_DEFAULT, EDGE_DEFAULT

__all__ = [
    "BUILTIN",
    "CLOUD_DEFAULT",
    "EDGE_DEFAULT",
    "WEIGHTS",
    "LoadedModel",
    "UnknownModelError",
    "load",
    "load_weights",
    "resolve",
]
