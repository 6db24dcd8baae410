"""kopf glue for Job: every trigger ends in the same idempotent reconcile.

Triggers: create, spec change, operator restart, a resync timer, the Job's RayJobs
changing, the referenced GPUCluster changing, and alarms the reconcile asks for (retry
backoff, deadline, TTL, failover grace). When GPUs are freed or taken (a Job finished, was
suspended or deleted, a GPUCluster went away, supply or a GPUQuota changed) a queue pass
reconciles the waiting Jobs in queue order, coalesced so a burst of events costs one pass.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from gpumesh.api.base import GROUP, VERSION
from gpumesh.operator import kube
from gpumesh.operator.handlers import gpucluster
from gpumesh.operator.handlers.runtime import RUNTIME, entries, frozen
from gpumesh.operator.jobs.naming import JOB
from gpumesh.operator.jobs.settings import JOB_SETTINGS
from gpumesh.operator.placement import Preemption, Request, Running
from gpumesh.operator.reconcile_job import (
    PLURAL,
    JobReconciler,
    JobSnapshot,
    Outcome,
    job_key,
)
from gpumesh.operator.render import labels as names
from gpumesh.operator.settings import SETTINGS
from gpumesh.operator.world import ClusterKey

log = logging.getLogger(__name__)

#: Delay that lets a burst of freeing events share one queue pass.
QUEUE_PASS_DELAY = 0.2


def _post_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, obj), type=type_, reason=reason, message=message[:1024])


_reconciler: JobReconciler | None = None
_reconciler_lock = threading.Lock()


class _JobSide:
    """Jobs as the GPUCluster admission pass sees them (the other half of the queue)."""

    def workloads(self, now: datetime) -> tuple[list[Request], list[Running]]:
        indexes = RUNTIME.indexes
        if indexes is None:
            return [], []
        return reconciler().workloads(snapshot(indexes), now)

    def take_back(self, preemptions: Sequence[Preemption], now: datetime) -> bool:
        indexes = RUNTIME.indexes
        if indexes is None:
            return False
        return reconciler().take_back(preemptions, snapshot(indexes), now)

    def kick(self) -> None:
        ALARMS.queue_pass()


def reconciler() -> JobReconciler:
    """The process's Job reconciler, sharing holdings, lock and queue with GPUClusters."""
    global _reconciler
    with _reconciler_lock:
        if _reconciler is None:
            clusters = gpucluster.reconciler()
            _reconciler = JobReconciler(
                kube.shared(),
                _post_event,
                holdings=clusters.holdings,
                placement_lock=clusters.lock,
                clusters=clusters,
                settings=JOB_SETTINGS,
            )
            clusters.jobs = _JobSide()
        return _reconciler


# --- the indexed world ----------------------------------------------------------------------


def _remember(indexes: Mapping[str, Any]) -> Mapping[str, Any]:
    """The live kopf indexes (kept for alarms and queue passes, which have none)."""
    return RUNTIME.remember(indexes)


def _first(index: Any) -> dict[Any, Any]:
    return {key: store[0] for key, store in frozen(index).items() if store}


def snapshot(indexes: Mapping[str, Any]) -> JobSnapshot:
    """Freeze the kopf indexes into reconcile input (consistent copies: they change while
    we read)."""
    return JobSnapshot(
        jobs=_first(indexes["job_index"]),
        rayjobs=frozen(indexes["rayjob_index"]),
        gpuclusters=_first(indexes["gpucluster_index"]),
        gpuquotas=[q for s in frozen(indexes["gpuquota_index"]).values() for q in s],
        offers=gpucluster.inventory(indexes),
        node_names=frozenset(frozen(indexes["node_index"])),
    )


# --- alarms and queue passes ------------------------------------------------------------------


class Alarms:
    """Calls ``fire(key)`` at the times asked for; ``key`` None means a queue pass.

    One daemon thread and a heap: cheap for thousands of Jobs. Duplicate alarms are
    harmless (reconciles are idempotent) and equal ones are merged.
    """

    def __init__(self, fire: Callable[[ClusterKey | None], None]) -> None:
        self._fire = fire
        self._heap: list[tuple[float, int, ClusterKey | None]] = []
        self._pending: set[tuple[float, ClusterKey | None]] = set()
        self._queue_pass_due = False
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="job-alarms", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)

    def at(self, key: ClusterKey, when: datetime) -> None:
        self._push(key, when.timestamp())

    def queue_pass(self) -> None:
        with self._cond:
            if self._queue_pass_due:
                return
            self._queue_pass_due = True
        self._push(None, time.time() + QUEUE_PASS_DELAY)

    def _push(self, key: ClusterKey | None, at: float) -> None:
        with self._cond:
            if (at, key) in self._pending:
                return
            self._pending.add((at, key))
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, key))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._heap or self._heap[0][0] > time.time()):
                    timeout = self._heap[0][0] - time.time() if self._heap else None
                    self._cond.wait(timeout)
                if self._stop:
                    return
                at, _, key = heapq.heappop(self._heap)
                self._pending.discard((at, key))
                if key is None:
                    self._queue_pass_due = False
            try:
                self._fire(key)
            except Exception:  # an alarm must never kill the thread
                log.exception("job alarm for %s failed", key or "the queue")


def _fire(key: ClusterKey | None) -> None:
    RUNTIME.run(_fire_in_context, key)


def _fire_in_context(key: ClusterKey | None) -> None:
    indexes = RUNTIME.indexes
    if indexes is None:
        return
    if key is None:
        outcomes = reconciler().reconcile_queue(snapshot(indexes))
        for job, outcome in outcomes:
            _follow_up(outcome, job)
        if outcomes:
            gpucluster.reconciler().kick()  # GPUQuota status counts what Jobs now hold
        return
    body = _job_body(indexes, key)
    if body is not None:
        _follow_up(reconciler().reconcile(body, snapshot(indexes)), key)


ALARMS = Alarms(_fire)


def _follow_up(outcome: Outcome, key: ClusterKey) -> None:
    if outcome.wake_at is not None:
        ALARMS.at(key, outcome.wake_at)
    if outcome.queue_moved:
        ALARMS.queue_pass()
        gpucluster.reconciler().kick()


def _reconcile(body: Mapping[str, Any], indexes: Mapping[str, Any]) -> None:
    live = _remember(indexes)
    meta = body["metadata"]
    key = job_key(meta["namespace"], meta["name"])
    _follow_up(reconciler().reconcile(body, snapshot(live)), key)


def _job_body(indexes: Mapping[str, Any], key: ClusterKey) -> Mapping[str, Any] | None:
    found = entries(indexes["job_index"], key)
    return found[0] if found else None


# --- handlers ----------------------------------------------------------------------------


@kopf.on.startup()
def start_jobs(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Watch only gpumesh's RayJobs; start the alarm clock."""
    settings.watching.label_selectors["ray.io", "rayjobs"] = f"{names.MANAGED_BY}={names.MANAGER}"
    reconciler()  # both reconcilers exist, and share the queue, before any event arrives
    ALARMS.start()


@kopf.on.cleanup()
def stop_jobs(**_: Any) -> None:
    ALARMS.stop()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile_job(body: kopf.Body, **indexes: Any) -> None:
    """Create, spec change, operator restart."""
    _reconcile(body, indexes)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds, idle=SETTINGS.resync_seconds)
def resync_job(body: kopf.Body, **indexes: Any) -> None:
    """Periodic resync: repairs drift and catches anything an alarm missed."""
    _reconcile(body, indexes)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def job_deleted(namespace: str | None, name: str, **indexes: Any) -> None:
    """Release what the Job held; the garbage collector removes its RayJobs."""
    _remember(indexes)
    reconciler().forget(job_key(namespace or "", name))
    ALARMS.queue_pass()


@kopf.on.event("ray.io", "v1", "rayjobs", labels={names.MANAGED_BY: names.MANAGER})
def rayjob_changed(namespace: str | None, labels: kopf.Labels, **indexes: Any) -> None:
    """KubeRay moved an attempt on: follow it in the Job's status at once."""
    job = labels.get(JOB)
    body = _job_body(indexes, job_key(namespace or "", job)) if job else None
    if body is not None:
        _reconcile(body, indexes)


_cluster_gpus: dict[ClusterKey, int] = {}


def gpucluster_changed(
    type: str | None, namespace: str | None, name: str, body: kopf.Body, live: Mapping[str, Any]
) -> None:
    """A referenced cluster got Ready or went away; or a cluster gave GPUs back.

    Called by the one GPUCluster event handler (:mod:`.clusters`), on kopf's event loop
    (it only looks things up): the Jobs it concerns are reconciled by the alarm clock.
    ``live`` is the runtime's live indexes, which that handler has already remembered.
    """
    key = ClusterKey(namespace or "", name)
    deleted = type == "DELETED"
    gpus = 0 if deleted else int(body.get("status", {}).get("gpus") or 0)
    before = _cluster_gpus.get(key, 0)
    if deleted:
        _cluster_gpus.pop(key, None)
    else:
        _cluster_gpus[key] = gpus
    now = datetime.now(UTC)
    for job in entries(live["jobs_by_cluster_index"], (key.namespace, name)):
        ALARMS.at(job_key(key.namespace, job), now)
    if gpus < before:
        ALARMS.queue_pass()


@kopf.on.event(GROUP, VERSION, "gpuquotas")
async def gpuquota_changed(**indexes: Any) -> None:
    """Quota limits moved: waiting Jobs and GPUClusters may fit now."""
    _remember(indexes)
    ALARMS.queue_pass()
    gpucluster.reconciler().kick()


def supply_moved(node: str, indexes: Mapping[str, Any]) -> None:
    """Supply changed on ``node``: running Jobs there may have to move; waiting ones may fit.

    Called on kopf's event loop: the Jobs are reconciled by the alarm clock.
    """
    live = _remember(indexes)
    now = datetime.now(UTC)
    for store in list(live["job_index"].values()):
        for job in list(store):
            status = job.get("status") or {}
            nodes = {p.get("node") for p in status.get("placements") or []}
            if node in nodes or status.get("headNode") == node:
                meta = job["metadata"]
                ALARMS.at(job_key(meta["namespace"], meta["name"]), now)
    ALARMS.queue_pass()
