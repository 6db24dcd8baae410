"""Labels and names that tie KubeRay objects and pods back to gpumesh objects."""

from __future__ import annotations

import hashlib

CLUSTER = "gpumesh.io/cluster"
GROUP = "gpumesh.io/group"
NODE = "gpumesh.io/node"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "gpumesh-operator"
FIELD_MANAGER = "gpumesh-operator"

HOSTNAME = "kubernetes.io/hostname"
HEAD_CAPABLE = "gpumesh.io/head-capable"
GPU_RESOURCE = "nvidia.com/gpu"

#: Taints gpumesh workers tolerate: suppliers reserve their nodes for the mesh with these.
TOLERATED_TAINTS = ("nvidia.com/gpu", "gpumesh.io/supplier")


def worker_group_name(group: str, node: str) -> str:
    """One KubeRay worker group per (gpumesh group, node): exact placement, clean moves.

    A short hash keeps pod names within limits whatever the node is called.
    """
    return f"{group}-{hashlib.sha256(node.encode()).hexdigest()[:8]}"
