"""Imports run one way: each package of fedlm imports only from the layers below it (and from itself).

Lazy imports inside functions count too: they are dependencies all the same, only deferred. The layers are the
ones in the README's layout table; a new package must be placed in one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedlm

LAYERS: list[set[str]] = [
    {"atomic", "models", "net"},
    {"egress", "data"},
    {"cloud", "privacy"},
    {"fusion", "kvcomm", "federated"},
    {"eval"},
    {"serve"},
    {"bench"},
    {"cli"},
]
ROOT = Path(fedlm.__file__).parent
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def imported_packages(path: Path) -> set[str]:
    """The fedlm packages that the module at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("fedlm.")}
    return found


def modules() -> list[Path]:
    return [path for path in sorted(ROOT.rglob("*.py")) if package_of(path) not in {"__init__", "__main__"}]


def test_every_package_has_a_layer() -> None:
    assert {package_of(path) for path in modules()} <= set(LAYER_OF)


def test_imports_run_one_way() -> None:
    wrong = [
        f"{path.relative_to(ROOT)} imports fedlm.{target}"
        for path in modules()
        for target in imported_packages(path)
        if target != package_of(path) and LAYER_OF.get(target, len(LAYERS)) >= LAYER_OF[package_of(path)]
    ]
    assert wrong == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedlm.cli.options import EMBEDDED\n    import fedlm.cloud.client\n")
    assert imported_packages(module) == {"cli", "cloud"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_itself_back() -> None:
    """No cycle among fedlm's modules, within a package either."""
    names = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in names and c != name}
        graph[name] = targets

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for target in graph[node]:
                if target == start:
                    return [*trail, start]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, [*trail, target]))
        return None

    cycles = [trail for name in sorted(graph) if (trail := cycle_from(name))]
    assert cycles == []
