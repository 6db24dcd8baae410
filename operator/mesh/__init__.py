"""The WireGuard mesh, planned: overlay addresses, pod ranges, relays, the peer catalogue.

Pure: no Kubernetes client here. The operator turns GPUNodes and heartbeat Leases into
:class:`MeshNode` values (:func:`mesh_node`), feeds them to a :class:`MeshPlanner` one
event at a time, and writes what each :class:`Delta` names: the catalogue ConfigMap
(:func:`catalogue_configmap`) and each changed node's ``status.mesh``
(:func:`status_patch`). Agents derive their own WireGuard peers from the catalogue.
"""

from gpumesh.api.mesh import (
    CATALOGUE_NAME,
    Catalogue,
    CatalogueEntry,
    CatalogueError,
    catalogue_from_configmap,
    valid_endpoint,
    valid_public_key,
)
from gpumesh.operator.mesh.config import MeshConfig, MeshConfigError
from gpumesh.operator.mesh.model import MeshNode
from gpumesh.operator.mesh.planner import Assignment, Delta, Ledger, MeshPlanner, plan
from gpumesh.operator.mesh.publish import (
    catalogue_configmap,
    leases_by_node,
    ledger_from_configmap,
    mesh_node,
    status_patch,
)

__all__ = [
    "CATALOGUE_NAME",
    "Assignment",
    "Catalogue",
    "CatalogueEntry",
    "CatalogueError",
    "Delta",
    "Ledger",
    "MeshConfig",
    "MeshConfigError",
    "MeshNode",
    "MeshPlanner",
    "catalogue_configmap",
    "catalogue_from_configmap",
    "leases_by_node",
    "ledger_from_configmap",
    "mesh_node",
    "plan",
    "status_patch",
    "valid_endpoint",
    "valid_public_key",
]
