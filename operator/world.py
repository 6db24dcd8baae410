"""The operator's view of the cluster, kept small (pure).

kopf indexes hold trimmed copies of Nodes, GPUNodes, pods and RayClusters; this module
trims them and derives what placement needs: which GPUs other work already holds.
GPUs promised to a workload count from the moment they are promised (:class:`Holdings`),
so two clusters placed back to back never get the same GPU while pods are still
starting, and the promise survives an operator restart because it lives in the
RayCluster itself.

A Job with a cluster template holds GPUs through the RayCluster KubeRay makes for its
RayJob. That RayCluster inherits the RayJob's labels, ``gpumesh.io/job`` among them, so
it is indexed under the Job's key (kind ``Job``) and counts like any other gpumesh
cluster; the Job's promise covers the time before KubeRay creates it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from gpumesh.api.gpuquota import GPUQuota
from gpumesh.operator.placement import Preemption, Request, Running
from gpumesh.operator.render import labels as names

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]
EventFn = Callable[[Obj, str, str, str], None]
"""(object, type Normal|Warning, reason, message) -> posts a Kubernetes event."""

#: Annotation on what a reconcile applied: the digest of what it was rendered from, so an
#: unchanged rendering is not applied again.
APPLIED_HASH = "gpumesh.io/applied-hash"


class Writer(Protocol):
    """The API writes a reconcile makes (kube.Kube in production, dicts in tests)."""

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
    ) -> str | None:
        """Returns the new resourceVersion (None if unknown)."""
        ...


class DeletingWriter(Writer, Protocol):
    """A writer that also deletes (a Job stops an attempt's RayJob, or ends itself)."""

    def delete_custom(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> None: ...


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


SpecT = TypeVar("SpecT", bound=BaseModel)
StatusT = TypeVar("StatusT", bound=BaseModel)


class SpecCache(Generic[SpecT]):
    """Specs parsed once per object version (uid, generation): most reconciles see a spec
    they have parsed before, and parsing is the costly part of one that changes nothing."""

    def __init__(self, model: type[SpecT], limit: int) -> None:
        self._model = model
        self._limit = limit
        self._parsed: dict[tuple[str, int], SpecT] = {}

    def parse(self, body: Obj) -> SpecT:
        """The body's spec; raises pydantic's ValidationError if it does not parse."""
        meta = body["metadata"]
        version = (str(meta.get("uid") or ""), int(meta.get("generation") or 0))
        spec = self._parsed.get(version)
        if spec is None:
            spec = self._model.model_validate(body.get("spec") or {})
            if len(self._parsed) > self._limit:
                self._parsed.clear()
            self._parsed[version] = spec
        return spec


class StatusMemory(Generic[StatusT]):
    """The status this process last wrote per object.

    The watch may not have delivered it yet; a reconcile that starts from an older one
    would write again, and a meter or a retry counter must never step back.
    """

    def __init__(self, model: type[StatusT]) -> None:
        self._model = model
        self._written: dict[ClusterKey, tuple[str, StatusT]] = {}

    def previous(self, key: ClusterKey, body: Obj) -> StatusT:
        """The last status written: ours if it was for this very object, else the body's."""
        uid = str(body["metadata"].get("uid") or "")
        cached = self._written.get(key)
        if cached is not None and cached[0] == uid:
            return cached[1]
        try:
            return self._model.model_validate(body.get("status") or {})
        except ValidationError:
            return self._model()

    def remember(self, key: ClusterKey, uid: str, status: StatusT) -> None:
        """``status`` is now the one written for the object with this uid."""
        self._written[key] = (uid, status)

    def forget(self, key: ClusterKey) -> None:
        self._written.pop(key, None)


def created_at(body: Obj) -> datetime:
    """When the object was created (its age orders the admission queue)."""
    stamp = (body.get("metadata") or {}).get("creationTimestamp")
    if isinstance(stamp, str):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if isinstance(stamp, datetime):
        return stamp
    return datetime.now(UTC)


def parse_gpuquotas(bodies: Iterable[Obj]) -> list[GPUQuota]:
    """The GPUQuotas that parse; one that does not is skipped with a warning, not fatal."""
    found = []
    for body in bodies:
        try:
            found.append(GPUQuota.model_validate(dict(body)))
        except ValidationError:
            log.warning("ignoring a GPUQuota that does not parse: %s", body.get("metadata"))
    return found


def trim_node(body: Obj) -> dict[str, Any]:
    """The parts of a Node that placement reads."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    # Only the Ready condition's status: kubelet heartbeats move its times every few
    # seconds, and placement treats a NotReady node as Lost.
    ready = [
        {"type": "Ready", "status": c.get("status")}
        for c in status.get("conditions") or []
        if c.get("type") == "Ready"
    ]
    return {
        "metadata": _meta(body, "name", "labels", "annotations"),
        "spec": {k: spec[k] for k in ("unschedulable", "taints") if k in spec},
        "status": {"allocatable": status.get("allocatable") or {}, "conditions": ready},
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


def pod_selector(key: ClusterKey) -> str:
    """The label selector of a workload's pods (see :func:`workload_key`)."""
    if key.kind == "Job":
        return f"{JOB_LABEL}={key.name}"
    return f"{names.CLUSTER}={key.name},!{JOB_LABEL}"


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
    references = (body.get("metadata") or {}).get("ownerReferences") or []
    owner: Mapping[str, Any] = next((o for o in references if o.get("controller")), {})
    return {
        "metadata": {
            **_meta(body, "name", "namespace", "labels", "annotations", "deletionTimestamp"),
            "ownerUid": owner.get("uid"),
        },
        "spec": {
            "suspend": bool(spec.get("suspend")),
            "headNode": _head_node(spec),
            "workerGroups": [
                _group_on_node(g).__dict__ for g in spec.get("workerGroupSpecs") or []
            ],
        },
        "status": body.get("status") or {},
    }


def _head_node(raycluster_spec: Obj) -> str | None:
    """The node gpumesh pinned the head to, if any."""
    template = (raycluster_spec.get("headGroupSpec") or {}).get("template") or {}
    selector = (template.get("spec") or {}).get("nodeSelector") or {}
    node = selector.get(names.HOSTNAME)
    return str(node) if node else None


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


class Holdings:
    """GPUs per node each gpumesh workload holds, with per-node totals kept current.

    Two sources per workload: what this process promised (an admission, a re-placement:
    newest, it wins) and what the RayCluster index shows (it covers the time after a
    restart, before anything was promised again). Totals are updated on each change, so
    "what do all the others hold" costs the size of one workload, not of the mesh.
    Thread-safe: kopf event handlers and reconcile workers both write it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._promised: dict[ClusterKey, dict[str, int]] = {}
        self._observed: dict[ClusterKey, dict[str, int]] = {}
        self._totals: dict[str, int] = {}

    def promise(self, key: ClusterKey, per_node: Mapping[str, int]) -> None:
        """This process gave ``key`` these GPUs (an empty map: it holds none now)."""
        with self._lock:
            before = self._effective(key)
            self._promised[key] = {n: g for n, g in per_node.items() if g}
            self._shift(key, before)

    def observe(self, key: ClusterKey, per_node: Mapping[str, int] | None) -> bool:
        """The index shows ``key`` holding these GPUs (None: its RayCluster is gone).

        True when this gave GPUs back on some node: waiting work may fit now. (A deleted
        workload is forgotten at once, but its terminating RayCluster is still observed
        until it goes; only then are its GPUs free.)
        """
        with self._lock:
            before = self._effective(key)
            if per_node is None:
                self._observed.pop(key, None)
            else:
                self._observed[key] = {n: g for n, g in per_node.items() if g}
            after = self._shift(key, before)
            return any(after.get(node, 0) < gpus for node, gpus in before.items())

    def forget(self, key: ClusterKey) -> None:
        """The workload is gone: it holds nothing, from either source."""
        with self._lock:
            before = self._effective(key)
            self._promised.pop(key, None)
            self._observed.pop(key, None)
            self._shift(key, before)

    def reserved(self, exclude: Iterable[ClusterKey] = ()) -> dict[str, int]:
        """GPUs per node held by every workload but those in ``exclude``."""
        with self._lock:
            total = dict(self._totals)
            for key in set(exclude):
                _add(total, self._effective(key), -1)
            return total

    def _effective(self, key: ClusterKey) -> dict[str, int]:
        found = self._promised.get(key)
        if found is None:
            found = self._observed.get(key, {})
        return found

    def _shift(self, key: ClusterKey, before: Mapping[str, int]) -> dict[str, int]:
        """Move the totals from ``before`` to what ``key`` holds now, and return that."""
        after = self._effective(key)
        if after != before:
            _add(self._totals, before, -1)
            _add(self._totals, after, 1)
        return after


def _add(total: dict[str, int], per_node: Mapping[str, int], sign: int) -> None:
    """Add (or with ``sign`` -1, take away) GPUs per node; nodes at zero are dropped."""
    for node, gpus in per_node.items():
        left = total.get(node, 0) + sign * gpus
        if left:
            total[node] = left
        else:
            total.pop(node, None)


class QueueSide(Protocol):
    """One kind of workload in the shared admission queue, as the other kind's pass sees it.

    GPUClusters and Jobs queue together (priority, age, GPUQuota, preemption); each
    reconciler acts on its own kind and asks the other through this.
    """

    def workloads(self, now: datetime) -> tuple[list[Request], list[Running]]:
        """Who waits for GPUs and who holds them (called with the placement lock held)."""
        ...

    def take_back(self, preemptions: Sequence[Preemption], now: datetime) -> bool:
        """Take back what the victims hold, all or none, before the preemptor is booked.

        False when that cannot be done right now (the preemptor should try again soon).
        """
        ...

    def kick(self) -> None:
        """Run this kind's queue pass soon: GPUs were freed or taken."""
        ...


def unaccounted(holdings: Holdings, running: Iterable[Running]) -> dict[str, int]:
    """GPUs per node held by gpumesh workloads an admission pass does not list as running.

    A pass accounts for the workloads it lists itself; one it leaves out (being deleted,
    or a spec that no longer parses) still holds what its RayCluster holds.
    """
    return holdings.reserved(exclude=[ClusterKey(w.namespace, w.name, w.kind) for w in running])
