"""kopf indexes: trimmed, always-current copies of what placement and status read.

Reading these costs no API call, so a reconcile of one GPUCluster stays O(its inputs)
however many other objects exist.
"""

from __future__ import annotations

from typing import Any

import kopf

from gpumesh.operator.render import labels as names
from gpumesh.operator.world import (
    ClusterKey,
    is_gpumesh_pod,
    pod_gpus,
    trim_node,
    trim_pod,
    trim_raycluster,
)


def _is_foreign_gpu_pod(body: kopf.Body, **_: Any) -> bool:
    return pod_gpus(body) > 0 and not is_gpumesh_pod(body)


@kopf.index("", "v1", "nodes")
def node_index(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {name: trim_node(body)}


@kopf.index("gpumesh.io", "v1alpha1", "gpunodes")
def gpunode_index(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {
        name: {"metadata": {"name": name}, "spec": dict(body.spec), "status": dict(body.status)}
    }


@kopf.index("", "v1", "pods", when=_is_foreign_gpu_pod)
def foreign_gpu_pod_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    node = body.spec.get("nodeName") or ""
    return {node: trim_pod(body)}


@kopf.index("", "v1", "pods", labels={names.CLUSTER: kopf.PRESENT})
def cluster_pod_index(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[ClusterKey, Any]:
    return {ClusterKey(namespace or "", labels[names.CLUSTER]): trim_pod(body)}


@kopf.index("ray.io", "v1", "rayclusters", labels={names.MANAGED_BY: names.MANAGER})
def raycluster_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[ClusterKey, Any]:
    return {ClusterKey(namespace or "", name): trim_raycluster(body)}


@kopf.index("gpumesh.io", "v1alpha1", "gpuclusters")
def gpucluster_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[ClusterKey, Any]:
    return {ClusterKey(namespace or "", name): dict(body)}
