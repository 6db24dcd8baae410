"""kopf indexes: trimmed, always-current copies of what placement and status read.

The index functions are ``async`` only so kopf calls them on its event loop: they do no
I/O, and a trip through the thread pool for each of thousands of pod events cost more
than the functions themselves.

Reading these costs no API call, so a reconcile of one GPUCluster stays O(its inputs)
however many other objects exist.
"""

from __future__ import annotations

import threading
from typing import Any

import kopf

from gpumesh.api.base import GROUP, VERSION
from gpumesh.operator.placement.inventory import placement_view
from gpumesh.operator.render import labels as names
from gpumesh.operator.world import (
    JOB_LABEL,
    ClusterKey,
    is_gpumesh_pod,
    pod_gpus,
    trim_node,
    trim_pod,
    trim_raycluster,
    trim_rayjob,
    workload_key,
)


class InventoryVersion:
    """Bumps whenever an indexed input of placement really changes.

    kopf calls index functions on every event, heartbeats included; comparing the
    trimmed copy with the last one seen keeps the version (and the inventory built from
    it) stable while nothing placement reads has changed.
    """

    def __init__(self) -> None:
        self.value = 0
        self._seen: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def observe(self, kind: str, key: str, trimmed: Any) -> None:
        with self._lock:
            if self._seen.get((kind, key)) != trimmed:
                self._seen[(kind, key)] = trimmed
                self.value += 1


INVENTORY_VERSION = InventoryVersion()


def _is_foreign_gpu_pod(body: kopf.Body, **_: Any) -> bool:
    return pod_gpus(body) > 0 and not is_gpumesh_pod(body)


@kopf.index("", "v1", "nodes")
async def node_index(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    trimmed = trim_node(body)
    INVENTORY_VERSION.observe("node", name, trimmed)
    return {name: trimmed}


@kopf.index(GROUP, VERSION, "gpunodes")
async def gpunode_index(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    status = dict(body.status)
    meta = {"name": name, "uid": body.metadata.uid}  # the uid: events about the node
    trimmed = {"metadata": meta, "spec": dict(body.spec), "status": status}
    # Only what placement reads: heartbeats, temperatures and the operator's own records
    # (reputation's track, challenges) arrive all the time and change no offer.
    relevant = {**trimmed, "status": placement_view(status)}
    INVENTORY_VERSION.observe("gpunode", name, relevant)
    return {name: trimmed}


@kopf.index("", "v1", "pods", when=_is_foreign_gpu_pod)
async def foreign_gpu_pod_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    node = body.spec.get("nodeName") or ""
    trimmed = trim_pod(body)
    INVENTORY_VERSION.observe("pod", f"{body.metadata.namespace}/{body.metadata.name}", trimmed)
    return {node: trimmed}


@kopf.index("ray.io", "v1", "rayclusters", labels={names.MANAGED_BY: names.MANAGER})
async def raycluster_index(
    namespace: str | None, name: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[ClusterKey, Any]:
    # A Job's RayCluster inherits its RayJob's labels: keyed by the Job (kind "Job").
    return {workload_key(namespace or "", name, labels): trim_raycluster(body)}


def _is_foreign_raycluster(labels: kopf.Labels, **_: Any) -> bool:
    return labels.get(names.MANAGED_BY) != names.MANAGER


@kopf.index("ray.io", "v1", "rayclusters", when=_is_foreign_raycluster)
async def foreign_raycluster_index(
    namespace: str | None, name: str, **_: Any
) -> dict[tuple[str, str], bool]:
    """RayClusters someone else manages, by namespace and name (a GPUCluster of the same
    name must not take one over)."""
    return {(namespace or "", name): True}


@kopf.index(GROUP, VERSION, "gpuclusters")
async def gpucluster_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[ClusterKey, Any]:
    return {ClusterKey(namespace or "", name): dict(body)}


@kopf.index(GROUP, VERSION, "jobs")
async def job_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[ClusterKey, Any]:
    meta = body.metadata
    kept = ("name", "namespace", "uid", "generation", "creationTimestamp", "deletionTimestamp")
    trimmed = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in kept if k in meta},
        "spec": dict(body.spec),
        "status": dict(body.status),
    }
    return {ClusterKey(namespace or "", name, "Job"): trimmed}


@kopf.index(GROUP, VERSION, "jobs")
async def jobs_by_cluster_index(
    namespace: str | None, name: str, spec: kopf.Spec, **_: Any
) -> dict[tuple[str, str], str]:
    """Jobs that run on an existing GPUCluster, by that cluster: its changes concern them."""
    ref = spec.get("clusterRef") or {}
    cluster = ref.get("name")
    return {(namespace or "", str(cluster)): name} if cluster else {}


@kopf.index(
    "ray.io",
    "v1",
    "rayjobs",
    labels={names.MANAGED_BY: names.MANAGER, JOB_LABEL: kopf.PRESENT},
)
async def rayjob_index(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[ClusterKey, Any]:
    return {ClusterKey(namespace or "", labels[JOB_LABEL], "Job"): trim_rayjob(body)}


@kopf.index(GROUP, VERSION, "gpuquotas")
async def gpuquota_index(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {namespace or "": dict(body)}
