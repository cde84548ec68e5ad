"""Model names to loaded HF models: built-in offline defaults, local folders, tiny test models."""

from fedlm.models.loader import LoadedModel, UnknownModelError, load, resolve
from fedlm.models.registry import BUILTIN, CLOUD_DEFAULT, EDGE_DEFAULT

__all__ = ["BUILTIN", "CLOUD_DEFAULT", "EDGE_DEFAULT", "LoadedModel", "UnknownModelError", "load", "resolve"]
