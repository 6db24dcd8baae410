"""GPUCluster + placement -> KubeRay RayCluster manifest (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpumesh.api.gpucluster import GPUClusterSpec, WorkerGroup
from gpumesh.operator.render import labels as names

Manifest = dict[str, Any]


@dataclass(frozen=True)
class WorkerSlot:
    """``workers`` workers of gpumesh group ``group`` pinned to node ``node``.

    A slot with zero workers keeps a KubeRay group alive while its pods drain.
    """

    group: str
    node: str
    workers: int


@dataclass(frozen=True)
class Owner:
    """The GPUCluster (or Job) that owns what is rendered; the garbage collector's anchor."""

    api_version: str
    kind: str
    name: str
    uid: str

    def reference(self) -> Manifest:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class RenderSettings:
    """Operator-wide choices about what is rendered."""

    head_capable_label: str = names.HEAD_CAPABLE
    dashboard_port: int = 8265
    default_cpu_per_gpu: int = 4
    default_memory_gib_per_gpu: int = 16


def raycluster_spec(
    spec: GPUClusterSpec,
    slots: Sequence[WorkerSlot],
    *,
    cluster_name: str,
    head_node: str | None,
    settings: RenderSettings = RenderSettings(),
) -> Manifest:
    """The RayCluster ``spec`` for a GPUCluster spec and its worker slots.

    Also used inside a RayJob's ``rayClusterSpec``; that is why the name is a parameter.
    """
    groups = dict(spec.worker_groups())
    worker_specs = [
        _worker_group(cluster_name, slot, groups[slot.group], spec, settings)
        for slot in sorted(slots, key=lambda s: (s.group, s.node))
    ]
    return {
        "rayVersion": spec.ray_version,
        "enableInTreeAutoscaling": False,
        "suspend": spec.suspend,
        "headGroupSpec": _head_group(cluster_name, spec, head_node, settings),
        "workerGroupSpecs": worker_specs,
    }


def raycluster(
    spec: GPUClusterSpec,
    slots: Sequence[WorkerSlot],
    *,
    name: str,
    namespace: str,
    owner: Owner,
    head_node: str | None,
    settings: RenderSettings = RenderSettings(),
) -> Manifest:
    """The whole RayCluster object, ready for server-side apply."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {names.CLUSTER: owner.name, names.MANAGED_BY: names.MANAGER},
            "ownerReferences": [owner.reference()],
        },
        "spec": raycluster_spec(
            spec, slots, cluster_name=owner.name, head_node=head_node, settings=settings
        ),
    }


def _head_group(
    cluster_name: str, spec: GPUClusterSpec, head_node: str | None, settings: RenderSettings
) -> Manifest:
    selector: dict[str, str] = {settings.head_capable_label: "true", **spec.head.node_selector}
    if head_node is not None:
        selector[names.HOSTNAME] = head_node
    resources = {"cpu": spec.head.cpu, "memory": spec.head.memory}
    return {
        "serviceType": "ClusterIP",
        "rayStartParams": {"dashboard-host": "0.0.0.0", **spec.head.ray_start_params},
        "template": {
            "metadata": {"labels": {names.CLUSTER: cluster_name, names.GROUP: "head"}},
            "spec": {
                "nodeSelector": selector,
                "tolerations": _tolerations(),
                "containers": [
                    {
                        "name": "ray-head",
                        "image": spec.container_image(),
                        "resources": {"requests": resources, "limits": resources},
                        "ports": [
                            {"name": "gcs", "containerPort": 6379},
                            {"name": "dashboard", "containerPort": settings.dashboard_port},
                            {"name": "client", "containerPort": 10001},
                        ],
                    }
                ],
            },
        },
    }


def _worker_group(
    cluster_name: str,
    slot: WorkerSlot,
    group: WorkerGroup,
    spec: GPUClusterSpec,
    settings: RenderSettings,
) -> Manifest:
    gpus = group.gpus_per_worker
    resources = {
        "cpu": group.cpu_per_worker or str(settings.default_cpu_per_gpu * gpus),
        "memory": group.memory_per_worker or f"{settings.default_memory_gib_per_gpu * gpus}Gi",
    }
    pod_labels = {names.CLUSTER: cluster_name, names.GROUP: slot.group, names.NODE: slot.node}
    return {
        "groupName": names.worker_group_name(slot.group, slot.node),
        "replicas": slot.workers,
        "minReplicas": 0,
        "maxReplicas": max(slot.workers, 1),
        "rayStartParams": dict(group.ray_start_params),
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": {
                "nodeSelector": {names.HOSTNAME: slot.node},
                "tolerations": _tolerations(),
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": spec.container_image(),
                        "resources": {
                            "requests": {**resources, names.GPU_RESOURCE: str(gpus)},
                            "limits": {**resources, names.GPU_RESOURCE: str(gpus)},
                        },
                    }
                ],
            },
        },
    }


def _tolerations() -> list[Manifest]:
    return [
        {"key": key, "operator": "Exists", "effect": "NoSchedule"} for key in names.TOLERATED_TAINTS
    ]


def slots_by_node(slots: Sequence[WorkerSlot], groups: Mapping[str, WorkerGroup]) -> dict[str, int]:
    """GPUs each node is asked for by these slots."""
    per_node: dict[str, int] = {}
    for slot in slots:
        gpus = slot.workers * groups[slot.group].gpus_per_worker
        per_node[slot.node] = per_node.get(slot.node, 0) + gpus
    return per_node
