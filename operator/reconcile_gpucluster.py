"""GPUCluster reconcile and its admission queue: decide, render, apply if changed, report.

Two entry points, both idempotent and run from the operator's work queue:

- :meth:`Reconciler.reconcile` (one cluster): reads the cluster, its RayCluster and pods
  from the indexes, keeps what it holds where it is (moving workers only off nodes that
  can no longer have them, shrinking when asked), applies the RayCluster when its
  rendering changed and writes the status when it changed. A cluster that wants more GPUs
  than it holds (new, scaled up, unsuspended, preempted) does not take them here: it
  waits for the queue.
- :meth:`Reconciler.admission_pass` (every waiting cluster at once): one pass of the
  admission engine over the waiting GPUClusters and Jobs in priority order, with
  GPUQuota limits and preemption of lower-priority work. It only decides and books the
  GPUs (:class:`~gpumesh.operator.world.Holdings`); the reconciles it wakes do the
  applying. Batching is what keeps a burst of a thousand creations cheap.

What this process decided (``_placed``) wins over the RayCluster index, which lags an
apply by a watch round trip; after a restart the RayClusters themselves say what each
cluster holds, so nothing is booked twice and no RayCluster is created twice (it has the
GPUCluster's name). The placement lock is shared with the Job reconciler, so both kinds
see every promise the other made.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from pydantic import ValidationError

from gpumesh.api.base import GROUP, VERSION
from gpumesh.api.conditions import STALLED, set_condition
from gpumesh.api.gpucluster import PRIMARY_GROUP, GPUClusterSpec, GPUClusterStatus
from gpumesh.api.gpunode import ACCEPTING_HEALTH
from gpumesh.api.gpuquota import GPUQuota, GPUQuotaStatus
from gpumesh.api.manifests import spec_problems
from gpumesh.api.patch import merge_patch
from gpumesh.operator.jobs.admission import (
    STALLED_REASONS,
    assignments,
    placement_trouble,
    placements,
    unhealthy_nodes,
    unhealthy_since,
)
from gpumesh.operator.jobs.metering import meter
from gpumesh.operator.jobs.metrics import COUNTERS, UsageCounters
from gpumesh.operator.jobs.settings import JOB_SETTINGS
from gpumesh.operator.placement import (
    AdmissionResult,
    Assignment,
    InventoryIndex,
    NodeOffer,
    Preemption,
    Request,
    Running,
    Verdict,
    admit,
    place_cluster,
    quota_limits,
    with_terms_of,
)
from gpumesh.operator.placement.explain import REASON_NO_CAPACITY
from gpumesh.operator.placement.queue import REASON_BEHIND, REASON_QUOTA
from gpumesh.operator.placement.quota import Usage
from gpumesh.operator.progress import ProgressLine
from gpumesh.operator.rejection import Refusals, Rejected
from gpumesh.operator.render import digest as manifest_digest
from gpumesh.operator.render import labels as names
from gpumesh.operator.render.raycluster import Owner, WorkerSlot, raycluster
from gpumesh.operator.status import (
    Observation,
    RayClusterView,
    Waiting,
    compute_status,
    quota_status,
)
from gpumesh.operator.world import (
    APPLIED_HASH,
    ClusterKey,
    EventFn,
    GroupOnNode,
    Holdings,
    Obj,
    QueueSide,
    SpecCache,
    StatusMemory,
    Writer,
    created_at,
    groups_on_nodes,
    parse_gpuquotas,
    unaccounted,
)

log = logging.getLogger(__name__)
_ZERO = Decimal(0)

PLURAL = "gpuclusters"
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"

QUEUED = "Queued"
RAYCLUSTER_REJECTED = "RayClusterRejected"


class ClusterWorld(Protocol):
    """What the reconciles read: the live kopf indexes in production, dicts in tests."""

    def gpucluster(self, key: ClusterKey) -> Obj | None: ...

    def gpuclusters(self) -> Sequence[Obj]: ...

    def raycluster(self, key: ClusterKey) -> Obj | None:
        """The trimmed RayCluster (see :func:`~gpumesh.operator.world.trim_raycluster`)."""
        ...

    def foreign_raycluster(self, key: ClusterKey) -> bool:
        """Is there a RayCluster of this name that gpumesh does not manage?"""
        ...

    def pods(self, key: ClusterKey) -> Sequence[Obj]: ...

    def offers(self) -> InventoryIndex: ...

    def gpuquotas(self) -> Sequence[Obj]: ...


@dataclass(frozen=True)
class Placed:
    """What a cluster holds: its workers' assignments and the node of its head."""

    assignments: tuple[Assignment, ...] = ()
    head_node: str | None = None

    def gpus_per_node(self) -> dict[str, int]:
        per_node: dict[str, int] = {}
        for a in self.assignments:
            per_node[a.node] = per_node.get(a.node, 0) + a.gpus
        return per_node

    def workers(self, group: str) -> int:
        return sum(a.workers for a in self.assignments if a.group == group)

    @property
    def holds_anything(self) -> bool:
        return bool(self.assignments) or self.head_node is not None


@dataclass(frozen=True)
class QueueNote:
    """The queue's last word on a waiting cluster, until it is admitted."""

    reason: str
    message: str
    position: int | None = None
    preempted: str | None = None
    """Set once preempted: why, kept (and shown first) until the cluster is admitted again."""


class Reconciler:
    """Holds what outlives one call: what was decided, applied and written, and the locks."""

    def __init__(
        self,
        writer: Writer,
        post_event: EventFn,
        world: ClusterWorld,
        *,
        holdings: Holdings | None = None,
        placement_lock: threading.RLock | None = None,
        wake: Callable[[ClusterKey, float], None] = lambda _key, _after: None,
        request_pass: Callable[[float], None] = lambda _: None,
        retry_after: float = 30.0,
        counters: UsageCounters = COUNTERS,
        meter_flush_seconds: float = JOB_SETTINGS.meter_flush_seconds,
        status_interval: float = 1.0,
        progress: ProgressLine[ClusterKey] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.post_event = post_event
        self.world = world
        self.holdings = holdings if holdings is not None else Holdings()
        self.lock = placement_lock if placement_lock is not None else threading.RLock()
        self.wake = wake
        """Ask for a reconcile of one cluster in so many seconds (the work queue)."""
        self.request_pass = request_pass
        """Ask for an admission pass in so many seconds (coalesced by the work queue)."""
        self.retry_after = retry_after
        """While clusters wait, the queue is looked at again this often whatever happens."""
        self.jobs: QueueSide | None = None
        """The Jobs in the same queue; set by the operator once both reconcilers exist."""
        self.counters = counters
        self.meter_flush_seconds = meter_flush_seconds
        self.status_interval = status_interval
        """Least seconds between two status writes of one cluster within one phase."""
        self.progress = progress if progress is not None else ProgressLine(rate=0, burst=1)
        """Turns for writes that only report progress (phase Provisioning)."""
        self.clock = clock
        self._last_write: dict[ClusterKey, float] = {}
        self._status_versions: dict[ClusterKey, str | None] = {}
        self._apply_versions: dict[ClusterKey, str | None] = {}
        """Per cluster, the resourceVersion our last status write, and our last RayCluster
        apply, left: their echoes through the watch need no reconcile."""
        self._placed: dict[ClusterKey, Placed] = {}
        self._notes: dict[ClusterKey, QueueNote] = {}
        self._seen_by_pass: dict[ClusterKey, tuple[int, Placed]] = {}
        self._applied: dict[ClusterKey, str] = {}
        self._written = StatusMemory(GPUClusterStatus)
        self._specs = SpecCache(GPUClusterSpec, limit=20_000)
        self._quota_written: dict[tuple[str, str], GPUQuotaStatus] = {}
        self._kept: dict[ClusterKey, tuple[int, int, Placed, bool]] = {}
        """(generation, inventory epoch, placement, failover due) when placement last kept a
        cluster as is."""
        self._rendered: dict[ClusterKey, tuple[tuple[Any, ...], str]] = {}
        """What a cluster's RayCluster was last rendered from, and the rendering's hash."""
        self._key_locks: dict[ClusterKey, threading.Lock] = {}
        self._uids: dict[ClusterKey, str] = {}
        """The uid each cluster's state here belongs to (a re-created cluster starts over)."""
        self._key_locks_guard = threading.Lock()
        self._offers: InventoryIndex | None = None
        self._offers_epoch = 0
        self._unhealthy_since: dict[ClusterKey, dict[str, datetime]] = {}
        """Per cluster, since when each of its nodes has been unhealthy (failover grace)."""
        self._migrations: dict[ClusterKey, int] = {}
        """Per cluster, the migrations this process counted (a status write may lag it)."""
        self.refusals = Refusals()
        """RayCluster writes the API server refused for good, per cluster and generation."""

    # -- one cluster ---------------------------------------------------------------------

    def reconcile(self, key: ClusterKey, now: datetime | None = None) -> bool:
        """Bring one cluster's RayCluster and status in line with its spec and the queue.

        False when the cluster is gone (what it held is released): no resync needed.
        """
        with self._key_lock(key):
            return self._reconcile(key, now or datetime.now(UTC))

    def _reconcile(self, key: ClusterKey, when: datetime) -> bool:
        body = self.world.gpucluster(key)
        if body is None:
            self.forget(key)
            with self._key_locks_guard:
                self._key_locks.pop(key, None)  # a pass holding the old one finds it gone
            return False
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return True
        self._same_incarnation(key, body)
        previous = self._previous(key, body)
        generation = int(meta.get("generation") or 0)
        try:
            spec = self._spec(body)
        except ValidationError as err:
            self._report_invalid(key, body, previous, generation, err, when)
            return True

        existing = self.world.raycluster(key)
        offers = self.world.offers()
        refusal = self.refusals.standing(key, generation, when)
        # Decide under the placement lock (it is short and never waits for the API);
        # apply after it, under this cluster's own lock only.
        with self.lock:
            held = self._holding(key, body, spec, existing, offers)
            waiting: Waiting | None = None
            if refusal is not None:
                # Refused for good: what runs stays as it is, nothing new is tried until
                # the spec changes or the pause is over.
                chosen = held
                waiting = Waiting(RAYCLUSTER_REJECTED, refusal.message)
                self.wake(key, (refusal.retry_at - when).total_seconds())
            elif spec.suspend:
                chosen = Placed()
                self._settle(key, chosen)
            elif self.world.foreign_raycluster(key):
                # Never take over someone else's RayCluster; give back what was booked.
                chosen = Placed()
                self._settle(key, chosen)
                waiting = Waiting("ForeignRayCluster", _foreign_message(key))
            elif _wants_more(spec, held):
                # The growth waits for the queue; what it holds already may still have to
                # leave a failed node meanwhile.
                chosen = held
                if held.assignments:
                    chosen, _ = self._in_place(
                        key, _clamped(spec, held), held, offers, generation, when, previous
                    )
                waiting = self._waiting(key)
                if self._seen_by_pass.get(key) != (generation, chosen):
                    self.request_pass(0)
            else:
                chosen, waiting = self._in_place(
                    key, spec, held, offers, generation, when, previous
                )
            if waiting is None:
                self._notes.pop(key, None)  # not waiting (any more): no stale queue word
        before = _assignments_of(existing, offers) if existing else ()
        try:
            if refusal is None and self._apply(key, body, spec, chosen, existing):
                self._announce_changes(body, before, chosen.assignments)
        except Rejected as err:
            chosen, waiting = self._refused(key, body, generation, err, existing, when)
        if waiting is not None:
            self._announce_waiting(body, previous, waiting)
        if waiting is not None and waiting.reason == QUEUED and not previous.conditions:
            return True  # a new cluster: the pass asked for speaks within moments, say it then

        ray_view = None
        if existing is not None:
            # Only pods tell KubeRay's ready workers apart by group and node: read them
            # for several groups, and while some but not all workers are ready (metering
            # counts ready workers' GPUs, node by node).
            ray_ready = int((existing.get("status") or {}).get("readyWorkerReplicas") or 0)
            desired = sum(g.replicas for _, g in spec.worker_groups())
            partly = 0 < ray_ready < desired
            pods = self.world.pods(key) if len(spec.worker_groups()) > 1 or partly else None
            ray_view = RayClusterView.from_objects(existing, pods)
        status = compute_status(
            Observation(
                generation=generation,
                spec=spec,
                previous=previous,
                placements=placements(chosen.assignments),
                waiting=waiting,
                raycluster=ray_view,
                now=when,
                selector=f"{names.CLUSTER}={key.name},{names.GROUP}=workers",
                raycluster_name=key.name if key in self._applied else None,
            )
        )
        migrations = self._migrations.get(key, 0)
        if migrations > status.migrations:
            status = status.model_copy(update={"migrations": migrations})
        on = {a.node for a in chosen.assignments}
        if not on:
            self._unhealthy_since.pop(key, None)
        since = unhealthy_since(self._unhealthy_since.get(key), previous.unhealthy_nodes)
        status = status.model_copy(update={"unhealthy_nodes": unhealthy_nodes(since, on)})
        status, flush = meter(previous, status, when, self.meter_flush_seconds)
        if self._write_status(key, body, previous, status):
            self.counters.record(key.namespace, "GPUCluster", key.name, flush)
        return True

    def _in_place(
        self,
        key: ClusterKey,
        shape: GPUClusterSpec,
        held: Placed,
        offers: InventoryIndex,
        generation: int,
        now: datetime,
        previous: GPUClusterStatus,
    ) -> tuple[Placed, Waiting | None]:
        """Re-place a cluster that needs no new GPUs: what it holds stays where it still
        fits, shrinks to ``shape``, and leaves nodes that can no longer have it.

        Failover follows ``spec.failover``: a Lost or vanished node is left at once; an
        Unhealthy or NeedsReset one once it stayed so for ``unhealthyGraceSeconds``
        (never with mode Never); and no more once ``maxMigrations`` moves were made.
        Returns the placement, and why it could not be kept when it could not (then what
        runs stays). Called with the placement lock held; placement runs only when the
        spec, the supply or the failover verdict changed since the cluster was last kept.
        """
        failover = shape.failover
        trouble = placement_trouble(
            [a.node for a in held.assignments],
            offers.by_name,
            frozenset(offers.by_name),
            failover,
            unhealthy_since(self._unhealthy_since.get(key), previous.unhealthy_nodes),
            now,
        )
        self._unhealthy_since[key] = trouble.unhealthy_since
        if trouble.wake_at is not None:
            self.wake(key, max(0.0, (trouble.wake_at - now).total_seconds()))
        overdue = bool(trouble.overdue)
        migrations = max(previous.migrations, self._migrations.get(key, 0))
        if trouble.reason is not None and migrations >= failover.max_migrations:
            return held, Waiting(
                "MigrationLimit",
                f"{trouble.reason}; failover.maxMigrations ({failover.max_migrations}) "
                "reached: the workers stay",
            )
        memo = (generation, self._epoch_of(offers), held, overdue)
        if self._kept.get(key) == memo:
            return held, None
        decision = place_cluster(
            shape,
            offers,
            current=held.assignments,
            reserved=self.holdings.reserved(exclude=[key]),
            current_head=held.head_node,
            keep_unhealthy=not overdue,
        )
        if not decision.ok:
            return held, Waiting("Unschedulable", decision.explanation)  # keep what runs
        placed = Placed(with_terms_of(decision.assignments, held.assignments), decision.head_node)
        left = {a.node for a in held.assignments} - {a.node for a in placed.assignments}
        if any(_failing(offers.by_name.get(node)) for node in left):
            self._migrations[key] = migrations + 1
        self._settle(key, placed)
        self._kept[key] = (generation, self._epoch_of(offers), placed, overdue)
        return placed, None

    def _same_incarnation(self, key: ClusterKey, body: Obj) -> None:
        """A cluster deleted and created again under its name starts from nothing: what
        the old one held, or was promised, is not the new one's to keep."""
        uid = str(body["metadata"].get("uid") or "")
        known = self._uids.get(key)
        if known is not None and known != uid:
            self.forget(key)
        self._uids[key] = uid

    def _key_lock(self, key: ClusterKey) -> threading.Lock:
        with self._key_locks_guard:
            return self._key_locks.setdefault(key, threading.Lock())

    def forget(self, key: ClusterKey) -> None:
        """The cluster is gone: release its GPUs and let waiting work have them."""
        with self.lock:
            held = self._placed.pop(key, None)
            self._uids.pop(key, None)
            self.holdings.forget(key)
            self._notes.pop(key, None)
            self._seen_by_pass.pop(key, None)
            self._applied.pop(key, None)
            self._written.forget(key)
            self._kept.pop(key, None)
            self._unhealthy_since.pop(key, None)
            self._migrations.pop(key, None)
            self.refusals.forget(key)
            self._rendered.pop(key, None)
            self._status_versions.pop(key, None)
            self._apply_versions.pop(key, None)
            self._last_write.pop(key, None)
        self.progress.leave(key)
        self.counters.forget(key.namespace, "GPUCluster", key.name)
        if held is not None and held.holds_anything:
            self.request_pass(0)

    def raycluster_gone(self, key: ClusterKey) -> None:
        """Its RayCluster was deleted (by hand, or with the cluster): apply it afresh.

        Called on kopf's event loop: it must not wait for the placement lock.
        """
        self._applied.pop(key, None)
        self._rendered.pop(key, None)

    def clusters_on(self, node: str) -> list[ClusterKey]:
        """Clusters holding workers or the head on ``node`` (a failover candidate).

        Called on kopf's event loop: reads a copy (atomic under the GIL) rather than
        waiting for the placement lock.
        """
        return [
            key
            for key, placed in list(self._placed.items())
            if placed.head_node == node or any(a.node == node for a in placed.assignments)
        ]

    # -- the queue -----------------------------------------------------------------------

    def admission_pass(self, now: datetime | None = None) -> None:
        """Admit what fits, in queue order, for both kinds; book it; wake who must act."""
        when = now or datetime.now(UTC)
        with self.lock:
            offers = self.world.offers()
            requests, running = self._workloads(when, seen_by_pass=True)
            job_requests, job_running = self.jobs.workloads(when) if self.jobs else ([], [])
            everyone = [*running, *job_running]
            quotas = parse_gpuquotas(self.world.gpuquotas())
            result = admit(
                [*requests, *job_requests],
                offers,
                now=when,
                running=everyone,
                quotas=quota_limits(quotas),
                reserved=unaccounted(self.holdings, everyone),
            )
            moved = False
            still_waiting = False
            retry_soon = False
            acted: list[Verdict] = []
            for verdict in result.verdicts:
                if verdict.request.kind != "GPUCluster":
                    continue
                key = ClusterKey(verdict.request.namespace, verdict.request.name)
                decision = verdict.decision
                if verdict.outcome in ("Admitted", "Preempting") and decision is not None:
                    if self.world.foreign_raycluster(key):
                        self._note(key, QueueNote("ForeignRayCluster", _foreign_message(key)))
                        continue
                    try:
                        taken = self.take_back(verdict.preemptions, when)
                    except Exception:  # one verdict's failure must not stall the queue
                        log.exception("queue pass: preempting for %s failed", key)
                        taken = False
                    if not taken:
                        retry_soon = True  # a victim is mid-reconcile: try again in a moment
                        continue
                    held_now = self._placed.get(key, Placed()).assignments
                    terms = with_terms_of(decision.assignments, held_now)
                    self._settle(key, Placed(terms, decision.head_node))
                    self._notes.pop(key, None)
                    if verdict.preemptions:
                        self._event(key, "Normal", "Preempting", verdict.explanation)
                    acted.append(verdict)
                    moved = True
                    self.wake(key, 0.0)
                else:
                    still_waiting = True
                    before = self._notes.get(key)
                    preempted = before.preempted if before else None
                    self._note(
                        key,
                        QueueNote(
                            "Preempted"
                            if preempted
                            else _condition_reason(verdict.reason, verdict.request),
                            f"{preempted}; now {verdict.explanation}"
                            if preempted
                            else verdict.explanation,
                            verdict.position,
                            preempted,
                        ),
                    )
            quota_writes = self._quota_statuses(quotas, result, everyone, acted, when)
        # After the lock: a slow API server stalls this pass's quota report, not placement.
        for ns, name, status in quota_writes:
            self.writer.patch_status(GROUP, VERSION, "gpuquotas", ns, name, status.to_api())
            self._quota_written[(ns, name)] = status
        if retry_soon:
            self.request_pass(0)
        elif still_waiting:
            self.request_pass(self.retry_after)
        if moved and job_requests and self.jobs is not None:
            self.jobs.kick()

    def _note(self, key: ClusterKey, note: QueueNote) -> None:
        if self._notes.get(key) != note:
            self._notes[key] = note
            self.wake(key, 0.0)

    def workloads(self, now: datetime) -> tuple[list[Request], list[Running]]:
        """Every GPUCluster as a Job's admission sees it (called with the lock held)."""
        return self._workloads(now, seen_by_pass=False)

    def _workloads(
        self, now: datetime, *, seen_by_pass: bool
    ) -> tuple[list[Request], list[Running]]:
        """Every GPUCluster as the queue sees it: waiting for GPUs, holding them, or both.

        Only this kind's own pass marks the waiting ones as seen (a Job's pass does not
        act on their verdicts, so it must not stop them from asking for a pass).
        A cluster left out (being deleted, or a spec that no longer parses) still holds
        what its RayCluster holds: the pass counts that through :func:`unaccounted`.
        """
        offers = self.world.offers()
        requests: list[Request] = []
        running: list[Running] = []
        for body in self.world.gpuclusters():
            meta = body["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            key = ClusterKey(meta["namespace"], meta["name"])
            try:
                spec = self._spec(body)
            except ValidationError:
                continue
            self._same_incarnation(key, body)
            created = created_at(body)
            held = self._holding(key, body, spec, self.world.raycluster(key), offers)
            if held.holds_anything and not spec.suspend:
                running.append(
                    Running(
                        "GPUCluster",
                        key.namespace,
                        key.name,
                        spec,
                        created,
                        held.assignments,
                        held.head_node,
                        spec.priority,
                    )
                )
            generation = int(meta.get("generation") or 0)
            refused = self.refusals.standing(key, generation, now)
            if not spec.suspend and refused is None and _wants_more(spec, held):
                if seen_by_pass:
                    self._seen_by_pass[key] = (generation, held)
                request = Request.for_cluster(
                    key.namespace, key.name, spec, created, held.assignments, held.head_node
                )
                requests.append(replace(request, keep_unhealthy=spec.failover.mode == "Never"))
        return requests, running

    def take_back(self, preemptions: Sequence[Preemption], now: datetime) -> bool:
        """Take back what every victim holds, all of them or none (the lock is held).

        Victim clusters are locked first: a victim's reconcile may be applying what it
        decided before this pass, and waiting for its lock here could deadlock (it waits
        for the placement lock next), so on a busy victim nothing is taken and the caller
        retries shortly. Then the clusters' workers go, then the Jobs.
        """
        with self.lock:
            clusters = [p for p in preemptions if p.victim.kind == "GPUCluster"]
            taken: list[threading.Lock] = []
            for preemption in clusters:
                victim = preemption.victim
                lock = self._key_lock(ClusterKey(victim.namespace, victim.name))
                if not lock.acquire(blocking=False):
                    for held in taken:
                        held.release()
                    return False
                taken.append(lock)
            try:
                for preemption in clusters:
                    self._preempt_cluster(preemption)
            finally:
                for held in taken:
                    held.release()
            jobs = [p for p in preemptions if p.victim.kind == "Job"]
            if jobs and self.jobs is not None:
                return self.jobs.take_back(jobs, now)
            return True

    def kick(self) -> None:
        self.request_pass(0)

    def gpus_given_back(self) -> None:
        """A RayCluster let GPUs go: waiting clusters and jobs get a pass now.

        Called on kopf's event loop; both only ask for a pass, neither waits for a lock.
        """
        self.kick()
        if self.jobs is not None:
            self.jobs.kick()

    def _preempt_cluster(self, preemption: Preemption) -> None:
        """Scale the victim's workers to zero now; only then is it booked as holding none.

        The head stays (it holds no GPUs, and the Ray cluster survives). Applying before
        booking means neither a failed apply nor a crash in between overbooks anything.
        """
        victim = preemption.victim
        key = ClusterKey(victim.namespace, victim.name)
        body = self.world.gpucluster(key)
        if body is None:
            return
        spec = self._spec(body)
        existing = self.world.raycluster(key)
        held = self._holding(key, body, spec, existing, self.world.offers())
        emptied = Placed((), held.head_node)
        self._apply(key, body, spec, emptied, existing)
        self._settle(key, emptied)
        message = preemption.victim_message
        self._notes[key] = QueueNote("Preempted", message, preempted=message)
        self._event(key, "Warning", "Preempted", message)
        self.wake(key, 0.0)

    # -- steps ---------------------------------------------------------------------------

    def _holding(
        self,
        key: ClusterKey,
        body: Obj,
        spec: GPUClusterSpec,
        existing: Obj | None,
        offers: InventoryIndex,
    ) -> Placed:
        """What the cluster holds: as this process decided, else as its RayCluster shows."""
        found = self._placed.get(key)
        if found is not None:
            return found
        if existing is None or not _ours(existing, body):
            return Placed()
        if existing["spec"].get("suspend"):
            return Placed()
        # After a restart: the workers are where the RayCluster says, on the terms the
        # status recorded when they were placed (not the GPUNode's terms of today).
        placed_on = assignments(self._previous(key, body).placements)
        held = Placed(
            with_terms_of(_assignments_of(existing, offers), placed_on),
            existing["spec"].get("headNode") or None,
        )
        self._settle(key, held)  # adopted: from now on this process keeps it current
        return held

    def _epoch_of(self, offers: InventoryIndex) -> int:
        """A number that changes whenever the inventory object does (it is rebuilt, never
        changed, when supply changes)."""
        if offers is not self._offers:
            self._offers = offers
            self._offers_epoch += 1
        return self._offers_epoch

    def _settle(self, key: ClusterKey, placed: Placed) -> None:
        if self._placed.get(key) != placed:
            self._placed[key] = placed
            self.holdings.promise(key, placed.gpus_per_node())

    def _waiting(self, key: ClusterKey) -> Waiting:
        note = self._notes.get(key)
        if note is None:
            return Waiting(QUEUED, "waiting for the next admission pass")
        return Waiting(note.reason, note.message, note.position)

    def _apply(
        self,
        key: ClusterKey,
        body: Obj,
        spec: GPUClusterSpec,
        chosen: Placed,
        existing: Obj | None,
    ) -> bool:
        """Server-side apply the RayCluster when its rendering changed; True if applied."""
        if existing is not None and not _ours(existing, body):
            return False  # a predecessor's, on its way out: its DELETED event wakes us
        current_groups = groups_on_nodes(existing) if existing else []
        slots = _slots(chosen.assignments, current_groups, lambda: self.world.pods(key))
        if existing is None and not chosen.holds_anything:
            return False  # nothing admitted yet: no RayCluster to hold nothing
        meta = body["metadata"]
        inputs = (meta["uid"], meta.get("generation"), chosen, tuple(slots))
        rendered = self._rendered.get(key)
        if rendered is not None and rendered[0] == inputs:
            manifest, digest = None, rendered[1]  # the same inputs render the same object
        else:
            manifest = self._render(key, body, spec, chosen, slots)
            digest = manifest_digest(manifest)
            self._rendered[key] = (inputs, digest)
        seen = (existing or {}).get("metadata", {}).get("annotations", {}).get(APPLIED_HASH)
        if digest in (seen, self._applied.get(key)):
            return False  # in place already (or applied, and the index has not caught up)
        if manifest is None:
            manifest = self._render(key, body, spec, chosen, slots)
        manifest["metadata"]["annotations"] = {APPLIED_HASH: digest}
        result = self.writer.apply_custom(RAY_GROUP, RAY_VERSION, RAY_PLURAL, manifest)
        self._applied[key] = digest
        version = (result.get("metadata") or {}).get("resourceVersion")
        self._apply_versions[key] = str(version) if version is not None else None
        return True

    def _refused(
        self,
        key: ClusterKey,
        body: Obj,
        generation: int,
        err: Rejected,
        existing: Obj | None,
        when: datetime,
    ) -> tuple[Placed, Waiting]:
        """The RayCluster write was refused for good: hold only what runs (the Stalled
        condition and its event come with the status).

        A cluster whose RayCluster was never made gives its booking back (nothing runs on
        it and nobody should pay for it) and leaves the queue until it changes.
        """
        refusal = self.refusals.record(key, generation, f"RayCluster {key.name}", err, when)
        log.warning("GPUCluster %s/%s: %s", key.namespace, key.name, refusal.message)
        self._rendered.pop(key, None)
        with self.lock:
            held = self._placed.get(key, Placed())
            if existing is None or not _ours(existing, body):
                held = Placed()
                self._settle(key, held)
                self.request_pass(0)  # the GPUs it was promised are free for others
        self.wake(key, (refusal.retry_at - when).total_seconds())
        return held, Waiting(RAYCLUSTER_REJECTED, refusal.message)

    def _render(
        self,
        key: ClusterKey,
        body: Obj,
        spec: GPUClusterSpec,
        chosen: Placed,
        slots: Sequence[WorkerSlot],
    ) -> dict[str, Any]:
        meta = body["metadata"]
        owner = Owner(f"{GROUP}/{VERSION}", "GPUCluster", meta["name"], meta["uid"])
        return raycluster(
            spec,
            slots,
            name=key.name,
            namespace=key.namespace,
            owner=owner,
            head_node=chosen.head_node,
        )

    def _write_status(
        self, key: ClusterKey, body: Obj, previous: GPUClusterStatus, status: GPUClusterStatus
    ) -> bool:
        """Write ``status`` if it differs; False if the write was put off.

        Progress within one phase (the head got an address, one more worker ready) is
        written at most once per ``status_interval``: KubeRay's updates come in bursts,
        and each of our writes is an API write and an event for every watcher. A phase
        change is written at once, except to Provisioning: that only reports progress,
        and takes its turn (:mod:`~gpumesh.operator.progress`).
        """
        old, new = previous.to_api(), status.to_api()
        uid = str(body["metadata"].get("uid") or "")
        if old == new:
            self._written.remember(key, uid, status)
            return True
        now = self.clock()
        since = now - self._last_write.get(key, -math.inf)
        if status.phase == previous.phase and since < self.status_interval:
            self.wake(key, self.status_interval - since)
            return False
        if status.phase != "Provisioning":
            self.progress.leave(key)
        elif not self.progress.may_write(key):
            return False  # the line wakes it when its turn comes
        patch = merge_patch(old, new)
        version = self.writer.patch_status(GROUP, VERSION, PLURAL, key.namespace, key.name, patch)
        self._last_write[key] = now
        self._written.remember(key, uid, status)
        self._status_versions[key] = version
        return True

    def is_own_write(self, key: ClusterKey, resource_version: str | None, raycluster: bool) -> bool:
        """Is this event only the echo of our own last write (nothing new to look at)?

        Called on kopf's event loop; reads one dict entry, takes no lock.
        """
        if resource_version is None:
            return False
        ours = (self._apply_versions if raycluster else self._status_versions).get(key)
        return ours == resource_version

    def _previous(self, key: ClusterKey, body: Obj) -> GPUClusterStatus:
        return self._written.previous(key, body)

    def _spec(self, body: Obj) -> GPUClusterSpec:
        return self._specs.parse(body)

    def _report_invalid(
        self,
        key: ClusterKey,
        body: Obj,
        previous: GPUClusterStatus,
        generation: int,
        err: ValidationError,
        now: datetime,
    ) -> None:
        problems = spec_problems(err)
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
        self._write_status(key, body, previous, status)

    def _quota_statuses(
        self,
        quotas: Sequence[GPUQuota],
        result: AdmissionResult,
        running: Sequence[Running],
        acted: Sequence[Verdict],
        now: datetime,
    ) -> list[tuple[str, str, GPUQuotaStatus]]:
        """Each GPUQuota's usage and the workloads holding or awaiting it, after this pass:
        the statuses that changed since last written, to write once the lock is released.

        Counts what holds GPUs now plus what this pass itself admitted (a Job's admission
        is counted once its own reconcile has acted on it, at the next pass).
        """
        if not quotas:
            return []
        holders: dict[str, tuple[str, int, Decimal]] = {
            w.key: (w.namespace, w.gpus, w.price_per_hour) for w in running
        }
        for verdict in acted:
            for preemption in verdict.preemptions:
                holders.pop(preemption.victim.key, None)
            decision = verdict.decision
            assert decision is not None
            request = verdict.request
            holders[request.key] = (request.namespace, decision.gpus, decision.price_per_hour)
        used: dict[str, Usage] = {}
        admitted: dict[str, int] = {}
        for namespace, gpus, price in holders.values():
            if gpus > 0:
                used[namespace] = used.get(namespace, Usage()).plus(gpus, price)
                admitted[namespace] = admitted.get(namespace, 0) + 1
        waiting: dict[str, int] = {}
        for verdict in result.verdicts:
            if verdict.outcome == "Queued" and verdict.reason == REASON_QUOTA:
                ns = verdict.request.namespace
                waiting[ns] = waiting.get(ns, 0) + 1
        writes: list[tuple[str, str, GPUQuotaStatus]] = []
        for quota in quotas:
            ns, name = quota.metadata.namespace or "", quota.metadata.name or ""
            previous = self._quota_written.get((ns, name), quota.status or GPUQuotaStatus())
            status = quota_status(
                previous,
                quota.metadata.generation,
                used.get(ns, Usage()),
                admitted.get(ns, 0),
                waiting.get(ns, 0),
                now,
            )
            if status.to_api() != previous.to_api():
                writes.append((ns, name, status))
        return writes

    # -- events --------------------------------------------------------------------------

    def _event(self, key: ClusterKey, type_: str, reason: str, message: str) -> None:
        body = self.world.gpucluster(key)
        if body is not None:
            self.post_event(body, type_, reason, message)

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
                body,
                "Normal",
                "Scaled",
                f"workers {workers_before} -> {workers_after}: {where or 'none'}",
            )
        else:
            self.post_event(body, "Normal", "Moved", f"workers now on {where}")

    def _announce_waiting(self, body: Obj, previous: GPUClusterStatus, waiting: Waiting) -> None:
        if waiting.reason in ("Queued", "Preempted"):
            return  # nothing new to tell, or told when it happened
        stalled = next((c for c in previous.conditions if c.type == STALLED), None)
        if stalled is None or (stalled.reason, stalled.message) != (
            waiting.reason,
            waiting.message,
        ):
            self.post_event(body, "Warning", waiting.reason, waiting.message)


def _ours(trimmed_raycluster: Obj, body: Obj) -> bool:
    """Is this RayCluster this very GPUCluster's, and staying (not a predecessor's)?"""
    meta = trimmed_raycluster.get("metadata") or {}
    owner = meta.get("ownerUid")
    uid = body["metadata"].get("uid")
    return not meta.get("deletionTimestamp") and (owner is None or uid is None or owner == uid)


def _foreign_message(key: ClusterKey) -> str:
    return (
        f"RayCluster {key.namespace}/{key.name} exists and is not managed by gpumesh; "
        "rename the GPUCluster or delete that RayCluster"
    )


def _wants_more(spec: GPUClusterSpec, held: Placed) -> bool:
    """Does any group want more workers than it holds (so the queue must admit them)?"""
    if spec.suspend:
        return False
    groups = spec.worker_groups()
    if not held.holds_anything:
        return any(g.replicas > 0 for _, g in groups) or held.head_node is None
    return any(g.replicas > held.workers(name) for name, g in groups)


def _clamped(spec: GPUClusterSpec, held: Placed) -> GPUClusterSpec:
    """``spec`` with no group asking for more workers than it holds now."""
    workers = spec.workers.model_copy(
        update={"replicas": min(spec.workers.replicas, held.workers(PRIMARY_GROUP))}
    )
    others = [
        g.model_copy(update={"replicas": min(g.replicas, held.workers(g.name))})
        for g in spec.additional_worker_groups
    ]
    return spec.model_copy(update={"workers": workers, "additional_worker_groups": others})


def _failing(offer: NodeOffer | None) -> bool:
    """A node gone or not fit for work: moving workers off it counts as a migration."""
    return offer is None or offer.health not in ACCEPTING_HEALTH


def _condition_reason(queue_reason: str, request: Request) -> str:
    """The Stalled condition's reason for a queue verdict."""
    if queue_reason == REASON_QUOTA:
        return "QuotaExceeded"
    if queue_reason == REASON_BEHIND:
        return "Queued"
    if queue_reason == REASON_NO_CAPACITY or queue_reason in STALLED_REASONS:
        return "ScaleUpUnschedulable" if request.current else "Unschedulable"
    return queue_reason


def _assignments_of(trimmed_raycluster: Obj, offers: InventoryIndex) -> list[Assignment]:
    """The workers a RayCluster holds, priced from the inventory."""
    return _current_assignments(groups_on_nodes(trimmed_raycluster), offers.by_name)


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
    chosen: Sequence[Assignment],
    current: Sequence[GroupOnNode],
    pods: Callable[[], Sequence[Obj]],
) -> list[WorkerSlot]:
    """Chosen workers, plus empty slots for groups whose pods are still going away.

    KubeRay leaves pods of a group that vanished from the spec; scaling the group to
    zero first and dropping it once its pods are gone removes them cleanly. The pods
    are asked for only when a group leaves (moving off a node, scaling down).
    """
    slots = {(a.group, a.node): WorkerSlot(a.group, a.node, a.workers) for a in chosen}
    leaving = [g for g in current if (g.group, g.node) not in slots]
    if not leaving:
        return list(slots.values())
    alive = {
        (p["metadata"]["labels"].get(names.GROUP), p["metadata"]["labels"].get(names.NODE))
        for p in pods()
    }
    for g in leaving:
        if (g.group, g.node) in alive:
            slots[(g.group, g.node)] = WorkerSlot(g.group, g.node, 0)
    return list(slots.values())
