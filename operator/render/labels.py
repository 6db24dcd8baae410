"""Labels and names that tie KubeRay objects and pods back to gpumesh objects."""

from __future__ import annotations

import hashlib

from gpumesh.api.nodes import LABEL_HEAD_CAPABLE, LABEL_NODE, SUPPLIER_TAINT

CLUSTER = "gpumesh.io/cluster"
GROUP = "gpumesh.io/group"
NODE = LABEL_NODE
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "gpumesh-operator"
FIELD_MANAGER = "gpumesh-operator"

HOSTNAME = "kubernetes.io/hostname"
HEAD_CAPABLE = LABEL_HEAD_CAPABLE
GPU_RESOURCE = "nvidia.com/gpu"

#: Taints gpumesh workers tolerate: suppliers reserve their nodes for the mesh with these.
TOLERATED_TAINTS = (GPU_RESOURCE, SUPPLIER_TAINT)


def worker_group_name(group: str, node: str) -> str:
    """One KubeRay worker group per (gpumesh group, node): exact placement, clean moves.

    A short hash keeps pod names within limits whatever the node is called.
    """
    return f"{group}-{hashlib.sha256(node.encode()).hexdigest()[:8]}"
