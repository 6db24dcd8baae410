"""The mesh's layering: the planner and the peer logic are pure; I/O stays at the edges."""

from __future__ import annotations

import pytest
from test_layout import forbidden_imports, imports_of

from corpus import ROOT

PURE = sorted(
    [str(p.relative_to(ROOT)) for p in (ROOT / "operator" / "mesh").glob("*.py")]
    + [
        "node_agent/wg/peers.py",
        "node_agent/wg/diff.py",
        "node_agent/wg/rtt.py",
        "node_agent/wg/report.py",
    ]
)
IO = (
    "kubernetes",
    "kubernetes_asyncio",
    "kopf",
    "socket",
    "subprocess",
    "pyroute2",
    "prometheus_client",
    "http",
    "gpumesh.node_agent.kube",
    "gpumesh.operator.handlers",
)


@pytest.mark.parametrize("path", PURE)
def test_mesh_core_does_no_io(path: str) -> None:
    assert not forbidden_imports(path, IO)


def test_mesh_packages_have_init_but_the_top_folders_do_not() -> None:
    assert (ROOT / "operator" / "mesh" / "__init__.py").exists()
    assert (ROOT / "node_agent" / "wg" / "__init__.py").exists()
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "node_agent" / "__init__.py").exists()


def test_the_planner_never_imports_the_agent() -> None:
    for path in PURE:
        if path.startswith("operator/"):
            assert not any(n.startswith("gpumesh.node_agent") for n in imports_of(path)), path
