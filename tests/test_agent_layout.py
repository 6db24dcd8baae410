"""The agent's layering: pure modules import no I/O, and node_agent/ stays a namespace."""

from __future__ import annotations

import pytest
from test_layout import forbidden_imports, imports_of

from corpus import ROOT

AGENT = ROOT / "node_agent"
PURE = [
    "node_agent/health.py",
    "node_agent/desired.py",
    "node_agent/snapshot.py",
    "node_agent/clock.py",
    "node_agent/nvml/types.py",
    "node_agent/nvml/fake.py",
]
IO = (
    "kubernetes",
    "kubernetes_asyncio",
    "kopf",
    "pynvml",
    "prometheus_client",
    "http",
    "socket",
    "gpumesh.node_agent.report",
    "gpumesh.node_agent.kube",
    "gpumesh.node_agent.agent",
    "gpumesh.node_agent.metrics",
)


@pytest.mark.parametrize("path", PURE)
def test_pure_agent_modules_do_no_io(path: str) -> None:
    assert not forbidden_imports(path, IO)


def test_only_the_real_backend_imports_pynvml() -> None:
    users = {
        str(p.relative_to(ROOT))
        for p in AGENT.rglob("*.py")
        if "pynvml" in imports_of(str(p.relative_to(ROOT)))
    }
    assert users == {"node_agent/nvml/real.py"}


def test_the_agent_never_uses_kopf() -> None:
    for p in AGENT.rglob("*.py"):
        assert not any(n.startswith("kopf") for n in imports_of(str(p.relative_to(ROOT)))), p


def test_node_agent_top_has_no_init_but_its_packages_do() -> None:
    assert not (AGENT / "__init__.py").exists()
    assert (AGENT / "nvml" / "__init__.py").exists()
