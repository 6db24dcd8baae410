"""The operator's view of the cluster, kept small (pure).

kopf indexes hold trimmed copies of Nodes, GPUNodes, pods and RayClusters; this module
trims them and derives what placement needs: which GPUs other work already holds.
GPUs promised to a RayCluster count from the moment it is applied, so two clusters
placed back to back never get the same GPU while pods are still starting, and the
promise survives an operator restart because it lives in the RayCluster itself.

A Job with a cluster template holds GPUs through the RayCluster KubeRay makes for its
RayJob. That RayCluster inherits the RayJob's labels, ``gpumesh.io/job`` among them, so
it is indexed under the Job's key (kind ``Job``) and counts like any other gpumesh
cluster; the ledger covers the time before KubeRay creates it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpumesh.operator.render import labels as names

Obj = Mapping[str, Any]


#: Label on a Job's RayJobs, their RayClusters and pods: the Job's name.
JOB_LABEL = "gpumesh.io/job"


@dataclass(frozen=True, order=True)
class ClusterKey:
    """A gpumesh workload that holds GPUs: a GPUCluster, or a Job's own cluster."""

    namespace: str
    name: str
    kind: str = "GPUCluster"


def _meta(body: Obj, *keys: str) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {k: meta[k] for k in keys if k in meta}


def trim_node(body: Obj) -> dict[str, Any]:
    """The parts of a Node that placement reads."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return {
        "metadata": _meta(body, "name", "labels", "annotations"),
        "spec": {k: spec[k] for k in ("unschedulable", "taints") if k in spec},
        "status": {"allocatable": status.get("allocatable") or {}},
    }


def trim_pod(body: Obj) -> dict[str, Any]:
    """The parts of a pod that placement and status read."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return {
        "metadata": _meta(body, "name", "namespace", "labels", "deletionTimestamp"),
        "spec": {
            "nodeName": spec.get("nodeName"),
            "containers": [
                {"resources": c.get("resources") or {}} for c in spec.get("containers") or []
            ],
        },
        "status": {
            "phase": status.get("phase"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or []
            ],
        },
    }


def pod_gpus(pod: Obj) -> int:
    """GPUs a pod holds (limits win, as the device plugin counts them)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(names.GPU_RESOURCE) or (
            resources.get("requests") or {}
        ).get(names.GPU_RESOURCE)
        total += int(value or 0)
    return total


def workload_key(namespace: str, name: str, labels: Mapping[str, str]) -> ClusterKey:
    """The workload an object labelled ``labels`` belongs to: its Job if it names one."""
    job = labels.get(JOB_LABEL)
    return ClusterKey(namespace, job, "Job") if job else ClusterKey(namespace, name)


def is_gpumesh_pod(pod: Obj) -> bool:
    return names.CLUSTER in ((pod.get("metadata") or {}).get("labels") or {})


def pod_is_active(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


@dataclass(frozen=True)
class GroupOnNode:
    """One per-node KubeRay worker group as found in a RayCluster."""

    group: str
    node: str
    workers: int
    gpus_per_worker: int
    ray_group_name: str


def trim_raycluster(body: Obj) -> dict[str, Any]:
    """The parts of a gpumesh-managed RayCluster the operator reads."""
    spec = body.get("spec") or {}
    return {
        "metadata": _meta(body, "name", "namespace", "labels", "annotations"),
        "spec": {
            "suspend": bool(spec.get("suspend")),
            "workerGroups": [
                _group_on_node(g).__dict__ for g in spec.get("workerGroupSpecs") or []
            ],
        },
        "status": body.get("status") or {},
    }


def _group_on_node(group_spec: Obj) -> GroupOnNode:
    template = group_spec.get("template") or {}
    pod_labels = (template.get("metadata") or {}).get("labels") or {}
    gpus = pod_gpus({"spec": template.get("spec") or {}})
    return GroupOnNode(
        group=pod_labels.get(names.GROUP, ""),
        node=pod_labels.get(names.NODE, ""),
        workers=int(group_spec.get("replicas") or 0),
        gpus_per_worker=gpus,
        ray_group_name=str(group_spec.get("groupName", "")),
    )


def trim_rayjob(body: Obj) -> dict[str, Any]:
    """The parts of a gpumesh-managed RayJob the Job reconcile reads."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    kept = (
        "jobStatus",
        "jobDeploymentStatus",
        "reason",
        "message",
        "jobId",
        "rayClusterName",
        "dashboardURL",
        "startTime",
        "endTime",
    )
    return {
        "metadata": _meta(body, "name", "namespace", "labels", "annotations", "deletionTimestamp"),
        "spec": {"suspend": bool(spec.get("suspend"))},
        "status": {k: status[k] for k in kept if k in status},
    }


def groups_on_nodes(trimmed_raycluster: Obj) -> list[GroupOnNode]:
    return [GroupOnNode(**g) for g in trimmed_raycluster["spec"]["workerGroups"]]


def committed_gpus(trimmed_raycluster: Obj) -> dict[str, int]:
    """GPUs per node a RayCluster holds or is about to hold; none while suspended."""
    if trimmed_raycluster["spec"]["suspend"]:
        return {}
    per_node: dict[str, int] = {}
    for g in groups_on_nodes(trimmed_raycluster):
        if g.node:
            per_node[g.node] = per_node.get(g.node, 0) + g.workers * g.gpus_per_worker
    return per_node


class Ledger:
    """GPUs per node each cluster was given by this process, until the index catches up.

    The index of RayClusters lags an apply by a watch round trip; the ledger covers that
    gap. Thread-safe because kopf runs sync handlers in a pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[ClusterKey, dict[str, int]] = {}

    def record(self, key: ClusterKey, per_node: Mapping[str, int]) -> None:
        with self._lock:
            self._entries[key] = dict(per_node)

    def forget(self, key: ClusterKey) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def snapshot(self) -> dict[ClusterKey, dict[str, int]]:
        with self._lock:
            return {k: dict(v) for k, v in self._entries.items()}


def reserved_gpus(
    exclude: ClusterKey,
    rayclusters: Mapping[ClusterKey, Obj],
    ledger: Mapping[ClusterKey, Mapping[str, int]],
) -> dict[str, int]:
    """GPUs per node promised to gpumesh clusters other than the one being placed.

    Per cluster the ledger wins over the index (it is newer). Pods gpumesh did not
    create are counted by the inventory itself.
    """
    return held_gpus(rayclusters, ledger, lambda key: key != exclude)


def held_gpus(
    rayclusters: Mapping[ClusterKey, Obj],
    ledger: Mapping[ClusterKey, Mapping[str, int]],
    counted: Callable[[ClusterKey], bool],
) -> dict[str, int]:
    """GPUs per node held by the gpumesh workloads ``counted`` accepts; the ledger wins."""
    per_cluster: dict[ClusterKey, Mapping[str, int]] = {
        key: committed_gpus(rc) for key, rc in rayclusters.items()
    }
    per_cluster.update(ledger)
    reserved: dict[str, int] = {}
    for key, per_node in per_cluster.items():
        if not counted(key):
            continue
        for node, gpus in per_node.items():
            reserved[node] = reserved.get(node, 0) + gpus
    return reserved
