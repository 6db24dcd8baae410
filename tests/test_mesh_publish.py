"""From GPUNodes and Leases to MeshNodes, and from a plan to the ConfigMap and patches."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from gpumesh.api.gpunode import GPUNode, GPUNodeSpec, GPUNodeStatus, MeshStatus
from gpumesh.api.mesh import Catalogue, catalogue_from_configmap
from gpumesh.operator.mesh import (
    MeshConfig,
    MeshNode,
    MeshPlanner,
    catalogue_configmap,
    leases_by_node,
    ledger_from_configmap,
    mesh_node,
    plan,
    status_patch,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
KEY = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="
CONFIG = MeshConfig(overlay_cidr="198.19.0.0/24", pod_cidr="198.19.128.0/17")


def gpunode(name: str, key: str | None, endpoint: str | None) -> dict[str, Any]:
    node = GPUNode(
        metadata={"name": name},  # type: ignore[arg-type]
        spec=GPUNodeSpec(
            supplier="s", region="eu", price_per_gpu_hour=Decimal("1.00"), public_endpoint=endpoint
        ),
        status=GPUNodeStatus(mesh=MeshStatus(public_key=key)),
    )
    return node.to_api()


def lease(node: str, renewed: datetime, seconds: int = 40) -> dict[str, Any]:
    return {
        "metadata": {"name": f"gpumesh-agent-{node}"},
        "spec": {
            "renewTime": renewed.isoformat().replace("+00:00", "Z"),
            "leaseDurationSeconds": seconds,
        },
    }


def test_mesh_node_reads_key_endpoint_and_liveness() -> None:
    leases = leases_by_node(
        [lease("a", NOW - timedelta(seconds=10)), lease("b", NOW - timedelta(minutes=5))]
    )
    a = mesh_node(gpunode("a", KEY, "198.51.100.1:51820"), leases.get("a"), NOW)
    assert a == MeshNode("a", KEY, "198.51.100.1:51820", alive=True, region="eu")
    b = mesh_node(gpunode("b", KEY, None), leases.get("b"), NOW)
    assert not b.alive and b.public_endpoint is None
    assert not mesh_node(gpunode("c", KEY, None), None, NOW).alive
    assert mesh_node(gpunode("c", KEY, None), None, NOW, require_lease=False).alive


def test_malformed_key_or_endpoint_counts_as_absent() -> None:
    obj = gpunode("a", KEY, "198.51.100.1:51820")
    obj["status"]["mesh"]["publicKey"] = "x\nreplace_peers=true"
    obj["spec"]["publicEndpoint"] = "198.51.100.1:99999"
    node = mesh_node(obj, lease("a", NOW), NOW)
    assert node.public_key is None and node.public_endpoint is None


def test_configmap_round_trips_catalogue_and_ledger() -> None:
    planner = plan(
        [MeshNode("a", KEY, "198.51.100.1:51820"), MeshNode("b", None, None)], CONFIG, now=1
    )
    cm = catalogue_configmap(planner.catalogue(), planner.ledger(), namespace="gpumesh-system")
    assert cm["metadata"]["annotations"]["gpumesh.io/mesh-generation"] == "1"
    assert catalogue_from_configmap(cm) == planner.catalogue()
    ledger = ledger_from_configmap(cm)
    assert ledger is not None and set(ledger.allocations) == {"a", "b"}
    restored = MeshPlanner(CONFIG, ledger)
    assert restored.generation == planner.generation
    assert catalogue_from_configmap({"data": {}}) is None
    assert ledger_from_configmap({"data": {"ledger.json": "{not json"}}) is None


def test_status_patch_names_only_operator_fields() -> None:
    planner = plan(
        [MeshNode("a", KEY, None), MeshNode("r", KEY.replace("Y", "Z", 1), "h:1")], CONFIG
    )
    assignment = planner.assignment("a")
    assert assignment is not None
    patch = status_patch(assignment)
    assert patch == {
        "status": {"mesh": {"overlayIp": "198.19.0.2", "podCidr": "198.19.129.0/24", "relay": "r"}}
    }
    # The API model accepts what the operator writes.
    MeshStatus.model_validate(patch["status"]["mesh"])


def test_catalogue_stays_small_enough_for_a_configmap_at_5000_nodes() -> None:
    big = MeshConfig(overlay_cidr="198.19.0.0/17", pod_cidr="198.19.128.0/17", pod_prefix=30)
    nodes = [
        MeshNode(f"supplier-{i:05d}.gpu.example", KEY, f"203.0.113.{i % 250}:51820")
        for i in range(5000)
    ]
    text = plan(nodes, big).catalogue().encode()
    assert len(text) < 1_000_000  # ConfigMaps hold at most 1 MiB
    assert len(Catalogue.decode(text).entries) == 5000
    assert json.loads(text)["version"] == 1
