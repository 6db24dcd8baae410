"""The package layout keeps its promises: stdlib `operator` stays reachable, and the pure
core never imports Kubernetes clients or the I/O shell."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from corpus import ROOT

# Modules that must stay pure: no API clients, no handlers, no agent I/O.
PURE = [
    "gpumesh/api",
    "gpumesh/crdgen.py",
    "operator/placement",
    "operator/mesh",
    "operator/render",
    "operator/liveness.py",
    "operator/reputation.py",
    "operator/rejection.py",
    "operator/status.py",
    "operator/world.py",
]
IMPURE_IMPORTS = ("kubernetes", "kubernetes_asyncio", "kopf", "gpumesh.operator.handlers")


def test_import_operator_from_the_repository_root_gives_the_standard_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator, collections; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT / "operator") not in out
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "node_agent" / "__init__.py").exists()


def test_operator_and_agent_folders_are_reached_under_gpumesh() -> None:
    import gpumesh.node_agent
    import gpumesh.operator

    assert next(iter(gpumesh.operator.__path__)).endswith("operator")
    assert next(iter(gpumesh.node_agent.__path__)).endswith("node_agent")


def imports_of(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def pure_files() -> list[str]:
    files: list[str] = []
    for entry in PURE:
        target = ROOT / entry
        found = target.rglob("*.py") if target.is_dir() else [target]
        files += [str(p.relative_to(ROOT)) for p in found]
    return sorted(files)


def forbidden_imports(path: str, forbidden: tuple[str, ...]) -> set[str]:
    """The imports of ``path`` that are, or live under, one of ``forbidden``."""
    return {
        name
        for name in imports_of(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }


@pytest.mark.parametrize("path", pure_files())
def test_pure_core_imports_no_kubernetes_client(path: str) -> None:
    assert not forbidden_imports(path, IMPURE_IMPORTS)
