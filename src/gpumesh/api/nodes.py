"""Who writes what about a supplier node outside GPUNode specs: the keys gpumesh puts on
Kubernetes Nodes, the agent's heartbeat Lease, and the agent's identity.

Shared by the node agent (which writes its own node's keys), the operator (which reads
them) and the admission policy (which lets each agent write only its own, and only these):
one place, so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

# --- the mesh operator's word on a node (set when it admits the node; no agent may) ---------

LABEL_SUPPLIER: Final = "gpumesh.io/supplier"
"""Which supplier the node belongs to. Its agents' pods run only where it says theirs."""
LABEL_REGION: Final = "gpumesh.io/region"
LABEL_VERIFIED: Final = "gpumesh.io/verified"
LABEL_HEAD_CAPABLE: Final = "gpumesh.io/head-capable"
"""May host Ray heads (renters' drivers run there: trusted data-centre nodes only)."""
LABEL_MESH_RELAY: Final = "gpumesh.io/mesh-relay"
"""May relay other nodes' WireGuard traffic."""
LABEL_DEV_FLEET: Final = "gpumesh.io/dev-fleet"
"""Marks nodes the local dev cluster made from a fleet file."""
MESH_OPERATOR_LABELS: Final = (
    LABEL_SUPPLIER,
    LABEL_REGION,
    LABEL_VERIFIED,
    LABEL_HEAD_CAPABLE,
    LABEL_MESH_RELAY,
    LABEL_DEV_FLEET,
)
SUPPLIER_TAINT: Final = "gpumesh.io/supplier"
"""A supplier's node reserved for the mesh (set at join, like the labels above)."""


@dataclass(frozen=True)
class Admission:
    """The mesh operator's word on a node, from its Node's labels (no agent may write
    them): whose it is, where it is, and whether it may relay others' traffic."""

    supplier: str | None
    region: str | None
    relay: bool

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> Admission:
        labels = (node.get("metadata") or {}).get("labels") or {}
        supplier, region = labels.get(LABEL_SUPPLIER), labels.get(LABEL_REGION)
        return cls(
            supplier=supplier if isinstance(supplier, str) and supplier else None,
            region=region if isinstance(region, str) and region else None,
            relay=labels.get(LABEL_MESH_RELAY) == "true",
        )

    def admits(self, claimed_supplier: object) -> bool:
        """Was the node admitted for the supplier its GPUNode claims? Only then does the
        operator place work on it or mesh it."""
        return self.supplier is not None and self.supplier == claimed_supplier


# --- what an agent writes on its own node ---------------------------------------------------

LABEL_PRODUCT: Final = "nvidia.com/gpu.product"
LABEL_MEMORY: Final = "nvidia.com/gpu.memory"
LABEL_COUNT: Final = "nvidia.com/gpu.count"
LABEL_COMPUTE_MAJOR: Final = "nvidia.com/gpu.compute.major"
LABEL_COMPUTE_MINOR: Final = "nvidia.com/gpu.compute.minor"
AGENT_KEY_PREFIXES: Final = ("gpumesh.io/", "nvidia.com/")
"""Label and taint keys an agent may set on its own node, the mesh operator's excepted."""
TAINT_KEY: Final = "gpumesh.io/gpu-unhealthy"
CONDITION_TYPE: Final = "GPUHealthy"
"""The one Node condition an agent writes."""
LEASE_PREFIX: Final = "gpumesh-agent-"
LABEL_NODE: Final = "gpumesh.io/node"
"""The node an object is about: an agent's heartbeat Lease, a worker pod's node."""


def lease_name(node: str) -> str:
    """The heartbeat Lease of ``node``'s agent, in the operator's namespace."""
    return f"{LEASE_PREFIX}{node}"


def node_of_lease(name: object) -> str | None:
    """The node whose agent's heartbeat Lease is called ``name``, or None for another Lease."""
    if isinstance(name, str) and name.startswith(LEASE_PREFIX) and len(name) > len(LEASE_PREFIX):
        return name[len(LEASE_PREFIX) :]
    return None


def agent_may_set(key: str) -> bool:
    """May an agent set or remove this label or taint key on its own node?"""
    return key.startswith(AGENT_KEY_PREFIXES) and key not in (*MESH_OPERATOR_LABELS, SUPPLIER_TAINT)


# --- who an agent is ------------------------------------------------------------------------

AGENT_ACCOUNT_PREFIX: Final = "gpumesh-supplier-"
"""One ServiceAccount per supplier release: ``gpumesh-supplier-<supplier>``. Its tokens,
bound to a pod, say both whose agent speaks (the account) and for which node (the pod's)."""
NODE_NAME_EXTRA: Final = "authentication.kubernetes.io/node-name"
"""Where the API server puts the node of the pod a token is bound to."""


def agent_account(supplier: str) -> str:
    """The ServiceAccount the agents of ``supplier`` run under."""
    return f"{AGENT_ACCOUNT_PREFIX}{supplier}"


OPERATOR_STATUS_FIELDS: Final = ("challenge", "verification", "reputation", "track", "conditions")
"""GPUNode status fields that are the operator's (its challenge and its verdicts): no agent
may write them."""
OPERATOR_MESH_FIELDS: Final = ("overlayIp", "podCidr", "relay", "observedEndpoint")
"""GPUNode ``status.mesh`` fields the operator assigns."""
FIXED_SPEC_FIELDS: Final = ("supplier", "region", "headCapable", "meshRelay")
"""GPUNode spec fields set when the GPUNode is created; only the mesh operator changes them."""
