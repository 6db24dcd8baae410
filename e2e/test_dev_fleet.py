"""`python -m testbed up` with a changed fleet converges on a running mesh.

A newcomer edits the fleet file and runs `make up` again: nodes that left lose their agent,
Node and GPUNode; new nodes get all three; nodes that stayed keep their running agent.
This runs the real command against a control plane of its own (its own state directory),
so the session's cluster and its fleet are untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.config import new_client_from_config

from testbed import mesh
from testbed.testing import wait_for

pytestmark = pytest.mark.e2e


def fleet(*suppliers: tuple[str, list[str]]) -> dict[str, Any]:
    return {
        "suppliers": [
            {
                "name": name,
                "region": "eu-north",
                "pricePerGpuHour": "1.00",
                "headCapable": True,
                "nodes": [
                    {
                        "name": node,
                        "gpuModel": "NVIDIA A100-SXM4-80GB",
                        "gpuCount": 2,
                        "gpuMemoryMiB": 81920,
                        "computeCapability": "8.0",
                        "cpu": 32,
                        "memory": "256Gi",
                    }
                    for node in nodes
                ],
            }
            for name, nodes in suppliers
        ]
    }


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    if os.environ.get("GPUMESH_E2E_KUBECONFIG"):
        pytest.skip("external cluster: `python -m testbed` runs only the local control plane")
    state = tmp_path / "dev"
    try:
        yield state
    finally:
        subprocess.run(dev("down", "--state-dir", str(state), "--purge"), check=False)


def dev(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed", *args]


def up(state: Path, fleet_file: Path) -> None:
    argv = dev("up", "--state-dir", str(state), "--fleet", str(fleet_file), "--sample", "")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def agents(state: Path) -> dict[str, int]:
    return {
        p.name.removeprefix(mesh.AGENT_PREFIX): p.pid
        for p in mesh.load_record(state)
        if p.name.startswith(mesh.AGENT_PREFIX) and p.alive()
    }


def gpunodes(api: client.ApiClient) -> set[str]:
    listed: Any = client.CustomObjectsApi(api).list_cluster_custom_object(
        "gpumesh.io", "v1alpha1", "gpunodes"
    )
    return {item["metadata"]["name"] for item in listed["items"]}


def nodes(api: client.ApiClient) -> set[str]:
    listed: Any = client.CoreV1Api(api).list_node()
    return {n.metadata.name for n in listed.items}


def test_a_changed_fleet_converges_on_a_running_mesh(state_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(fleet(("stays", ["keep-0"]), ("leaves", ["gone-0"]))))
    up(state_dir, first)
    api = new_client_from_config(config_file=str(state_dir.resolve() / "kubeconfig"))  # type: ignore[no-untyped-call]
    try:
        wait_for("both agents' GPUNodes", lambda: gpunodes(api) == {"keep-0", "gone-0"})
        before = agents(state_dir)
        assert set(before) == {"keep-0", "gone-0"}

        second = tmp_path / "second.yaml"  # another file: the same node keeps its agent
        second.write_text(yaml.safe_dump(fleet(("stays", ["keep-0"]), ("arrives", ["new-0"]))))
        up(state_dir, second)

        after = agents(state_dir)
        assert set(after) == {"keep-0", "new-0"}
        assert after["keep-0"] == before["keep-0"], "an unchanged node's agent was restarted"
        assert nodes(api) == {"keep-0", "new-0"}
        wait_for("the fleet's GPUNodes, and only those", lambda: gpunodes(api) == set(after))
        gone = mesh.MeshProcess("agent-gone-0", before["gone-0"], "")
        assert not gone.alive(), "the removed node's agent still runs"  # (a zombie is gone)
    finally:
        api.close()
