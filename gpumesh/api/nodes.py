"""Who writes what about a supplier node outside GPUNode specs: the keys gpumesh puts on
Kubernetes Nodes, the agent's heartbeat Lease, and the agent's identity.

Shared by the node agent (which writes its own node's keys), the operator (which reads
them) and the admission policy (which lets each agent write only its own, and only these):
one place, so the three cannot drift apart.
"""

from __future__ import annotations

from typing import Final

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


def lease_name(node: str) -> str:
    """The heartbeat Lease of ``node``'s agent, in the operator's namespace."""
    return f"{LEASE_PREFIX}{node}"


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


OPERATOR_STATUS_FIELDS: Final = ("verification", "reputation", "track", "conditions")
"""GPUNode status fields that are the operator's verdicts: no agent may write them."""
OPERATOR_MESH_FIELDS: Final = ("overlayIp", "podCidr", "relay", "observedEndpoint")
"""GPUNode ``status.mesh`` fields the operator assigns."""
OPERATOR_SPEC_FIELDS: Final = ("verificationNonce",)
"""GPUNode spec fields only the operator writes (its challenge)."""
FIXED_SPEC_FIELDS: Final = ("supplier", "region", "headCapable", "meshRelay")
"""GPUNode spec fields set when the GPUNode is created; only the mesh operator changes them."""
