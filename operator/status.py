"""GPUCluster status from what was observed (pure).

Health comes from ready versus desired workers and the head pod's readiness, never from
the RayCluster's ``state``: KubeRay sets ``ready`` once and never takes it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from gpumesh.api.conditions import DEGRADED, READY, RECONCILING, STALLED, set_condition
from gpumesh.api.gpucluster import (
    PRIMARY_GROUP,
    GPUClusterPhase,
    GPUClusterSpec,
    GPUClusterStatus,
    HeadStatus,
    WorkerPlacement,
)
from gpumesh.api.gpuquota import GPUQuotaStatus, GPUQuotaUsage
from gpumesh.operator.placement.quota import Usage
from gpumesh.operator.render import labels as names


@dataclass(frozen=True)
class RayClusterView:
    """What the status needs from a RayCluster and its pods."""

    name: str
    ready_workers: int
    head_ready: bool
    head_node: str | None
    head_service: str | None
    ready_by_group: Mapping[str, int]
    ready_on: Mapping[tuple[str, str], int] | None = None
    """Ready workers by (group, node), when the pods were read."""

    @classmethod
    def from_objects(
        cls, raycluster: Mapping[str, Any], pods: Sequence[Mapping[str, Any]] | None = None
    ) -> RayClusterView:
        """From the trimmed RayCluster and, for a cluster with several worker groups, its pods.

        The head's node is where gpumesh pinned it. KubeRay counts ready workers over
        all groups; only pods tell them apart, so ``pods`` is needed when the cluster
        has more than one group. Without them every ready worker is the main group's.
        """
        status = raycluster.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        ready = int(status.get("readyWorkerReplicas") or 0)
        ready_by_group: dict[str, int] = {PRIMARY_GROUP: ready}
        ready_on: dict[tuple[str, str], int] | None = None
        if pods is not None:
            ready_by_group, ready_on = {}, {}
            for pod in pods:
                group = pod.get("metadata", {}).get("labels", {}).get(names.GROUP)
                if group and group != "head" and _pod_ready(pod):
                    ready_by_group[group] = ready_by_group.get(group, 0) + 1
                    where = (group, str((pod.get("spec") or {}).get("nodeName") or ""))
                    ready_on[where] = ready_on.get(where, 0) + 1
        head = status.get("head") or {}
        return cls(
            name=raycluster["metadata"]["name"],
            ready_workers=ready,
            head_ready=conditions.get("HeadPodReady") == "True",
            head_node=(raycluster.get("spec") or {}).get("headNode"),
            head_service=head.get("serviceName"),
            ready_by_group=ready_by_group,
            ready_on=ready_on,
        )


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


@dataclass(frozen=True)
class Waiting:
    """Why (some) workers of the cluster wait for GPUs, as the admission queue said."""

    reason: str
    """The Stalled condition's reason: Unschedulable, QuotaExceeded, Preempted, Queued..."""
    message: str
    position: int | None = None
    """Place in the queue after the last admission pass; 0 is next."""


@dataclass(frozen=True)
class Observation:
    """Everything one reconcile learned, as input to the status."""

    generation: int
    spec: GPUClusterSpec
    previous: GPUClusterStatus
    placements: Sequence[WorkerPlacement]
    waiting: Waiting | None
    raycluster: RayClusterView | None
    now: datetime
    selector: str
    raycluster_name: str | None = None
    """The RayCluster's name once applied, before the index shows it."""


def compute_status(obs: Observation) -> GPUClusterStatus:
    """The status a GPUCluster should show for ``obs``; equal inputs give an equal status."""
    desired = sum(g.replicas for _, g in obs.spec.worker_groups()) if not obs.spec.suspend else 0
    ray = obs.raycluster
    ready = min(ray.ready_workers, desired) if ray else 0
    placed = bool(obs.placements) or (desired == 0 and obs.waiting is None)
    all_ready = placed and ray is not None and ray.head_ready and ready >= desired
    phase = _phase(obs, placed, all_ready)

    conditions = list(obs.previous.conditions)

    def mark(type_: str, value: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_, value, reason, message, generation=obs.generation, now=obs.now
        )

    workers_text = f"{ready}/{desired} workers ready"
    if phase == "Ready":
        mark(READY, True, "AllWorkersReady", f"{workers_text}; head ready")
    elif phase == "Suspended":
        mark(READY, False, "Suspended", "spec.suspend is true")
    else:
        head = "head ready" if ray and ray.head_ready else "head not ready"
        mark(READY, False, phase, f"{workers_text}; {head}")
    mark(RECONCILING, phase in ("Provisioning", "Degraded", "Migrating"), phase, workers_text)
    if obs.waiting is not None:
        mark(STALLED, True, obs.waiting.reason, obs.waiting.message)
    else:
        mark(STALLED, False, "Placed", "every worker has a node")
    mark(DEGRADED, phase == "Degraded", phase, workers_text)

    gpus = sum(p.gpus for p in obs.placements)
    price = sum((p.price_per_gpu_hour * p.gpus for p in obs.placements), Decimal(0))
    return obs.previous.model_copy(
        update={
            "phase": phase,
            "observed_generation": obs.generation,
            "conditions": conditions,
            "ray_cluster_name": (
                ray.name if ray else obs.raycluster_name or obs.previous.ray_cluster_name
            ),
            "placements": ready_placements(obs.placements, ray),
            "desired_workers": desired,
            "ready_workers": ready,
            # Ready pods of the main group, never ahead of KubeRay's own count: both
            # sources then move in the same write.
            "worker_replicas": (
                min(ray.ready_by_group.get(PRIMARY_GROUP, 0), ray.ready_workers) if ray else 0
            ),
            "selector": obs.selector,
            "gpus": gpus,
            "price_per_hour": price.quantize(Decimal("0.0001")) if obs.placements else None,
            "head": _head(ray, obs.previous.head),
            "queue_position": obs.waiting.position if obs.waiting else None,
        }
    )


def ready_placements(
    placements: Sequence[WorkerPlacement], ray: RayClusterView | None
) -> list[WorkerPlacement]:
    """``placements`` with how many of their workers are ready, which is what metering
    counts: from the pods when they were read, else all or none of a group (the
    reconciler reads the pods whenever a group is partly ready)."""
    out = []
    for p in placements:
        if ray is None:
            ready = 0
        elif ray.ready_on is not None:
            ready = min(p.workers, ray.ready_on.get((p.group, p.node), 0))
        else:
            placed = sum(q.workers for q in placements if q.group == p.group)
            ready = p.workers if ray.ready_by_group.get(p.group, 0) >= placed else 0
        out.append(p if p.ready == ready else p.model_copy(update={"ready": ready}))
    return out


def _phase(obs: Observation, placed: bool, all_ready: bool) -> GPUClusterPhase:
    if obs.spec.suspend:
        return "Suspended"
    if not placed:
        return "Pending"
    if all_ready:
        return "Ready"
    was_up = obs.previous.phase in ("Ready", "Degraded")
    if was_up and obs.previous.observed_generation == obs.generation:
        return "Degraded"
    return "Provisioning"


def _head(ray: RayClusterView | None, previous: HeadStatus | None) -> HeadStatus | None:
    """Where the head runs, taken when the head is ready; until then the last one seen.

    A head that is not ready has no dashboard to open yet, and its pod's node and
    Service arrive in separate events: taking them only with readiness saves a status
    write per cluster (each is an API write and an event for every watcher). The Ready
    condition's message tells whether the head is ready now.
    """
    if ray is None or not ray.head_ready:
        return previous
    if ray.head_node is None and ray.head_service is None:
        return previous  # nothing known: no empty object to write
    dashboard = f"http://{ray.head_service}:8265" if ray.head_service else None
    return HeadStatus(node=ray.head_node, service_name=ray.head_service, dashboard_url=dashboard)


def quota_status(
    previous: GPUQuotaStatus,
    generation: int | None,
    used: Usage,
    admitted: int,
    waiting: int,
    now: datetime,
) -> GPUQuotaStatus:
    """A GPUQuota's status after an admission pass: usage, and whether work waits on it."""
    conditions = set_condition(
        previous.conditions, READY, True, "Enforced", "admission counts this quota",
        generation=generation, now=now,
    )  # fmt: skip
    exhausted = waiting > 0
    conditions = set_condition(
        conditions,
        "Exhausted",
        exhausted,
        "WorkloadsWaiting" if exhausted else "Room",
        f"{waiting} workloads wait for this quota" if exhausted else "nothing waits on it",
        generation=generation,
        now=now,
    )
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "conditions": conditions,
            "used": GPUQuotaUsage(gpus=used.gpus, price_per_hour=used.price_per_hour),
            "admitted": admitted,
            "waiting": waiting,
        }
    )
