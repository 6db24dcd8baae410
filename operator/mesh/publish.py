"""Between API objects and the planner: GPUNodes and Leases in, ConfigMap and patches out.

Pure functions over plain JSON dicts, so the operator's handler is a thin loop (list or
watch, call these, write what they return) and the whole path is tested without a
cluster. The catalogue and the planner's ledger live in one ConfigMap; the operator-owned
``status.mesh`` fields (overlayIp, podCidr, relay) are written to each GPUNode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Final

from gpumesh.api.lease import lease_expiry
from gpumesh.api.mesh import (
    CATALOGUE_KEY,
    CATALOGUE_NAME,
    GENERATION_ANNOTATION,
    Catalogue,
    valid_endpoint,
    valid_public_key,
)
from gpumesh.api.nodes import Admission, node_of_lease
from gpumesh.operator.mesh.model import MeshNode
from gpumesh.operator.mesh.planner import Assignment, Ledger

LEDGER_KEY: Final = "ledger.json"


def lease_node(lease: Mapping[str, Any]) -> str | None:
    """The node an agent heartbeat Lease belongs to, or None for any other Lease."""
    return node_of_lease((lease.get("metadata") or {}).get("name"))


def leases_by_node(leases: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for lease in leases:
        node = lease_node(lease)
        if node is not None:
            out[node] = lease
    return out


def mesh_node(
    gpunode: Mapping[str, Any],
    lease: Mapping[str, Any] | None,
    now: datetime,
    *,
    require_lease: bool = True,
) -> MeshNode:
    """The planner's view of one GPUNode: its published key, public endpoint, liveness.

    A malformed key or endpoint counts as absent (the node stays out of the mesh, or out
    of the relay pool) rather than failing the whole plan. ``now`` must be timezone-aware.
    """
    name = str((gpunode.get("metadata") or {}).get("name", ""))
    spec = gpunode.get("spec") or {}
    mesh = (gpunode.get("status") or {}).get("mesh") or {}
    key = mesh.get("publicKey")
    endpoint = spec.get("publicEndpoint")
    if not (isinstance(key, str) and valid_public_key(key)):
        key = None
    if not (isinstance(endpoint, str) and valid_endpoint(endpoint)):
        endpoint = None
    alive = not require_lease
    if lease is not None:
        expiry = lease_expiry(lease)
        alive = expiry is not None and expiry > now
    return MeshNode(
        name=name,
        public_key=key,
        public_endpoint=endpoint,
        alive=alive,
        relay=spec.get("meshRelay", True) is not False,
        region=region if isinstance(region := spec.get("region"), str) and region else None,
    )


def admitted(node: MeshNode, claimed_supplier: Any, admission: Admission | None) -> MeshNode:
    """``node`` as far as the mesh operator lets it in.

    A GPUNode joins only when its Node exists and was admitted for the supplier the
    GPUNode claims; it relays only where the mesh operator allows relaying; its region is
    the one the mesh operator labelled. Anything else stays out, whatever its agent says.
    """
    if admission is None or not admission.admits(claimed_supplier):
        return replace(node, alive=False, relay=False)
    return replace(
        node, relay=node.relay and admission.relay, region=admission.region or node.region
    )


def status_patch(assignment: Assignment) -> dict[str, Any]:
    """Merge patch for the GPUNode status subresource: only the operator's mesh fields."""
    return {
        "status": {
            "mesh": {
                "overlayIp": assignment.overlay_ip,
                "podCidr": assignment.pod_cidr,
                "relay": assignment.relay,
            }
        }
    }


def catalogue_configmap(
    catalogue: Catalogue,
    ledger: Ledger,
    *,
    namespace: str,
    name: str = CATALOGUE_NAME,
    resource_version: str | None = None,
) -> dict[str, Any]:
    """The ConfigMap every agent watches: the catalogue, plus the planner's ledger."""
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "gpumesh", "app.kubernetes.io/component": "mesh"},
        "annotations": {GENERATION_ANNOTATION: str(catalogue.generation)},
    }
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {CATALOGUE_KEY: catalogue.encode(), LEDGER_KEY: ledger.to_json()},
    }


def ledger_from_configmap(configmap: Mapping[str, Any] | None) -> Ledger | None:
    text = ((configmap or {}).get("data") or {}).get(LEDGER_KEY)
    if not isinstance(text, str):
        return None
    try:
        return Ledger.from_json(text)
    except ValueError:
        return None
