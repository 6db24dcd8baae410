"""One idempotent reconcile for a GPUCluster: place, render, apply if changed, report.

Called by kopf for create, update and resume, by a timer, and whenever the RayCluster or
the inventory changes. Every step is safe to repeat: the RayCluster has the GPUCluster's
name (no duplicates after a restart), current workers are kept where they are, and
nothing is written when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from pydantic import ValidationError

from gpumesh.api.conditions import STALLED, set_condition
from gpumesh.api.gpucluster import GPUClusterSpec, GPUClusterStatus, WorkerPlacement
from gpumesh.api.manifests import field_path
from gpumesh.operator.jobs.metering import meter
from gpumesh.operator.jobs.metrics import COUNTERS, UsageCounters
from gpumesh.operator.jobs.settings import JOB_SETTINGS
from gpumesh.operator.placement import (
    Assignment,
    Decision,
    InventoryIndex,
    NodeOffer,
    place_cluster,
)
from gpumesh.operator.render import labels as names
from gpumesh.operator.render.raycluster import Owner, WorkerSlot, raycluster
from gpumesh.operator.status import Observation, RayClusterView, compute_status
from gpumesh.operator.world import ClusterKey, GroupOnNode, Ledger, groups_on_nodes, reserved_gpus

log = logging.getLogger(__name__)
_ZERO = Decimal(0)

GROUP, VERSION, PLURAL = "gpumesh.io", "v1alpha1", "gpuclusters"
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"
APPLIED_HASH = "gpumesh.io/applied-hash"

Obj = Mapping[str, Any]


class Writer(Protocol):
    """The API writes a reconcile makes (kube.Kube in production)."""

    def apply_custom(
        self, group: str, version: str, plural: str, manifest: Mapping[str, Any]
    ) -> dict[str, Any]: ...

    def patch_status(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
    ) -> None: ...

    def get_custom(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None: ...


EventFn = Callable[[Obj, str, str, str], None]
"""(object, type Normal|Warning, reason, message) -> posts a Kubernetes event."""


@dataclass(frozen=True)
class Snapshot:
    """The indexed world one reconcile reads; taken fresh for each call."""

    offers: InventoryIndex
    rayclusters: Mapping[ClusterKey, Obj]
    cluster_pods: Mapping[ClusterKey, Sequence[Obj]]


class Reconciler:
    """Holds what outlives one call: the ledger and the locks.

    The ledger and the placement lock are shared with the Job reconcile, so GPUs given to
    a Job's own cluster are never given to a GPUCluster too, and the other way round.
    """

    def __init__(
        self,
        writer: Writer,
        post_event: EventFn,
        *,
        counters: UsageCounters = COUNTERS,
        meter_flush_seconds: float = JOB_SETTINGS.meter_flush_seconds,
    ) -> None:
        self.writer = writer
        self.post_event = post_event
        self.ledger = Ledger()
        self.placement_lock = threading.Lock()
        self.counters = counters
        self.meter_flush_seconds = meter_flush_seconds
        self._cluster_locks: defaultdict[ClusterKey, threading.Lock] = defaultdict(threading.Lock)

    def forget(self, key: ClusterKey) -> None:
        """The cluster is gone: release what the ledger held for it."""
        self.ledger.forget(key)
        self._cluster_locks.pop(key, None)
        self.counters.forget(key.namespace, "GPUCluster", key.name)

    def reconcile(self, body: Obj, snapshot: Snapshot, now: datetime | None = None) -> None:
        meta = body["metadata"]
        key = ClusterKey(meta["namespace"], meta["name"])
        with self._cluster_locks[key]:
            self._reconcile(key, body, snapshot, now or datetime.now(UTC))

    # -- steps ---------------------------------------------------------------------------

    def _reconcile(self, key: ClusterKey, body: Obj, snap: Snapshot, now: datetime) -> None:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        generation = int(meta.get("generation") or 0)
        previous = GPUClusterStatus.model_validate(body.get("status") or {})
        try:
            spec = GPUClusterSpec.model_validate(body.get("spec") or {})
        except ValidationError as err:
            self._report_invalid(key, body, previous, generation, err, now)
            return

        existing = snap.rayclusters.get(key)
        current_groups = groups_on_nodes(existing) if existing else []
        offers = snap.offers
        current = _current_assignments(current_groups, offers.by_name)

        with self.placement_lock:
            reserved = reserved_gpus(key, snap.rayclusters, self.ledger.snapshot())
            current_head = _current_head(snap, key)
            decision = place_cluster(
                spec, offers, current=current, reserved=reserved, current_head=current_head
            )
            if spec.suspend:
                chosen: Sequence[Assignment] = current
            elif decision.ok:
                chosen = decision.assignments
            else:
                chosen = current
            slots = _slots(chosen, current_groups, snap.cluster_pods.get(key, ()))
            head_node = decision.head_node if decision.ok else current_head
            applied = self._apply(key, body, spec, slots, head_node, existing)
            if applied is not None:
                self.ledger.record(key, applied)

        if decision.ok and not spec.suspend:
            self._announce_changes(body, current, chosen)
        elif not decision.ok and not spec.suspend:
            self._announce_unplaceable(body, previous, decision)

        ray_view = (
            RayClusterView.from_objects(existing, snap.cluster_pods.get(key, ()))
            if existing
            else None
        )
        status = compute_status(
            Observation(
                generation=generation,
                spec=spec,
                previous=previous,
                placements=[_placement(a) for a in chosen if a.workers > 0],
                unplaced_reason=None if decision.ok or spec.suspend else decision.explanation,
                raycluster=ray_view,
                now=now,
                selector=f"{names.CLUSTER}={key.name},{names.GROUP}=workers",
            )
        )
        status, flush = meter(previous, status, now, self.meter_flush_seconds)
        self._write_status(key, previous, status)
        self.counters.record(key.namespace, "GPUCluster", key.name, flush)

    def _apply(
        self,
        key: ClusterKey,
        body: Obj,
        spec: GPUClusterSpec,
        slots: Sequence[WorkerSlot],
        head_node: str | None,
        existing: Obj | None,
    ) -> dict[str, int] | None:
        """Server-side apply the RayCluster when its rendering changed; GPUs per node."""
        if not slots and existing is None:
            return None
        meta = body["metadata"]
        owner = Owner(f"{GROUP}/{VERSION}", "GPUCluster", meta["name"], meta["uid"])
        manifest = raycluster(
            spec, slots, name=key.name, namespace=key.namespace, owner=owner, head_node=head_node
        )
        digest = _digest(manifest)
        if (
            existing is not None
            and existing["metadata"].get("annotations", {}).get(APPLIED_HASH) == digest
        ):
            return None
        if existing is None:
            if not self._still_exists(key, meta["uid"]):
                # An event about a cluster deleted meanwhile: creating now would leave an
                # orphan for the garbage collector and hold GPUs for nobody.
                self.ledger.forget(key)
                return None
            self._refuse_foreign_raycluster(key)
        manifest["metadata"]["annotations"] = {APPLIED_HASH: digest}
        self.writer.apply_custom(RAY_GROUP, RAY_VERSION, RAY_PLURAL, manifest)
        gpus_per_worker = {name: g.gpus_per_worker for name, g in spec.worker_groups()}
        per_node: dict[str, int] = {}
        if not spec.suspend:
            for slot in slots:
                per_node[slot.node] = (
                    per_node.get(slot.node, 0) + slot.workers * gpus_per_worker[slot.group]
                )
        return per_node

    def _still_exists(self, key: ClusterKey, uid: str) -> bool:
        found = self.writer.get_custom(GROUP, VERSION, PLURAL, key.namespace, key.name)
        return found is not None and found["metadata"].get("uid") == uid

    def _refuse_foreign_raycluster(self, key: ClusterKey) -> None:
        found = self.writer.get_custom(RAY_GROUP, RAY_VERSION, RAY_PLURAL, key.namespace, key.name)
        if found is None:
            return
        labels = found.get("metadata", {}).get("labels") or {}
        if labels.get(names.MANAGED_BY) != names.MANAGER:
            raise ForeignRayClusterError(
                f"RayCluster {key.namespace}/{key.name} exists and is not managed by gpumesh; "
                "rename the GPUCluster or delete that RayCluster"
            )

    def _write_status(
        self, key: ClusterKey, previous: GPUClusterStatus, status: GPUClusterStatus
    ) -> None:
        old, new = previous.to_api(), status.to_api()
        if old == new:
            return
        patch: dict[str, Any] = dict(new)
        for gone in old.keys() - new.keys():
            patch[gone] = None
        self.writer.patch_status(GROUP, VERSION, PLURAL, key.namespace, key.name, patch)

    def _report_invalid(
        self,
        key: ClusterKey,
        body: Obj,
        previous: GPUClusterStatus,
        generation: int,
        err: ValidationError,
        now: datetime,
    ) -> None:
        problems = "; ".join(
            f"spec.{field_path(e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        conditions = set_condition(
            previous.conditions,
            STALLED,
            True,
            "InvalidSpec",
            problems,
            generation=generation,
            now=now,
        )
        status = previous.model_copy(
            update={"conditions": conditions, "observed_generation": generation}
        )
        if status.to_api() != previous.to_api():
            self.post_event(body, "Warning", "InvalidSpec", problems)
        self._write_status(key, previous, status)

    def _announce_changes(
        self, body: Obj, before: Sequence[Assignment], after: Sequence[Assignment]
    ) -> None:
        was = {(a.group, a.node): a.workers for a in before if a.workers}
        now = {(a.group, a.node): a.workers for a in after if a.workers}
        if was == now:
            return
        workers_before, workers_after = sum(was.values()), sum(now.values())
        where = ", ".join(f"{node}({n})" for (_, node), n in sorted(now.items()))
        if not was:
            self.post_event(body, "Normal", "Placed", f"{workers_after} workers on {where}")
        elif workers_after != workers_before:
            self.post_event(
                body, "Normal", "Scaled", f"workers {workers_before} -> {workers_after}: {where}"
            )
        else:
            self.post_event(body, "Normal", "Moved", f"workers now on {where}")

    def _announce_unplaceable(
        self, body: Obj, previous: GPUClusterStatus, decision: Decision
    ) -> None:
        stalled = next((c for c in previous.conditions if c.type == STALLED), None)
        if stalled is None or stalled.message != decision.explanation:
            self.post_event(body, "Warning", "Unschedulable", decision.explanation)


class ForeignRayClusterError(RuntimeError):
    """A RayCluster with the GPUCluster's name belongs to someone else."""


def _digest(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _current_assignments(
    groups: Iterable[GroupOnNode], offers: Mapping[str, NodeOffer]
) -> list[Assignment]:
    current = []
    for g in groups:
        if g.workers == 0 or not g.group:
            continue
        offer = offers.get(g.node)
        current.append(
            Assignment(
                group=g.group,
                node=g.node,
                workers=g.workers,
                gpus_per_worker=g.gpus_per_worker,
                supplier=offer.supplier if offer else "",
                region=offer.region if offer else "",
                gpu_model=offer.gpu_model if offer else "",
                price_per_gpu_hour=offer.price_per_gpu_hour if offer else _ZERO,
            )
        )
    return current


def _slots(
    chosen: Sequence[Assignment], current: Sequence[GroupOnNode], pods: Sequence[Obj]
) -> list[WorkerSlot]:
    """Chosen workers, plus empty slots for groups whose pods are still going away.

    KubeRay leaves pods of a group that vanished from the spec; scaling the group to
    zero first and dropping it once its pods are gone removes them cleanly.
    """
    slots = {(a.group, a.node): WorkerSlot(a.group, a.node, a.workers) for a in chosen}
    alive = {
        (p["metadata"]["labels"].get(names.GROUP), p["metadata"]["labels"].get(names.NODE))
        for p in pods
    }
    for g in current:
        if (g.group, g.node) not in slots and (g.group, g.node) in alive:
            slots[(g.group, g.node)] = WorkerSlot(g.group, g.node, 0)
    return list(slots.values())


def _current_head(snap: Snapshot, key: ClusterKey) -> str | None:
    for pod in snap.cluster_pods.get(key, ()):
        if pod["metadata"]["labels"].get(names.GROUP) == "head":
            node = pod.get("spec", {}).get("nodeName")
            return str(node) if node else None
    return None


def _placement(a: Assignment) -> WorkerPlacement:
    return WorkerPlacement(
        group=a.group,
        node=a.node,
        supplier=a.supplier,
        region=a.region,
        gpu_model=a.gpu_model,
        workers=a.workers,
        gpus=a.workers * a.gpus_per_worker,
        price_per_gpu_hour=a.price_per_gpu_hour,
    )
