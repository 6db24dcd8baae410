"""One idempotent reconcile for a Job: observe, step, admit, apply if changed, report.

Called by kopf for create, update and resume, by a timer, by alarms the Job asked for
(backoff, deadline, TTL, grace periods), when its RayJob changes, and in queue passes
when GPUs are freed. The pure parts decide (:mod:`gpumesh.operator.jobs`); this module
only reads the snapshot and writes: the RayJob (server-side apply, only when its
rendering changed), RayJob deletions, the status (only when changed) and events.

A reconcile has two halves. ``_decide`` runs under the placement lock it shares with
GPUCluster placement and makes no API call: it steps the Job, runs admission, books what it
was given, and says what to write (a :class:`JobPlan`), so an admission pass sees every GPU
promised so far. ``_execute`` writes the plan after the lock is released, so a slow API call
stalls only this Job. A per-Job lock spans both halves: two reconciles of one Job never
interleave their writes. Preemption is the exception: a victim's writes are made under the
placement lock, all victims or none (rare, and it keeps a victim from being booked as empty
before it is). The process also keeps the last status it decided per Job: the watch may not
have delivered it yet, and a retry counter or a meter must never step back; a status write
that fails forgets it, so the next reconcile starts from the API's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from gpumesh.api.base import GROUP, VERSION
from gpumesh.api.job import JobSpec, JobStatus
from gpumesh.api.manifests import spec_problems
from gpumesh.api.patch import merge_patch
from gpumesh.operator.jobs.admission import (
    STALLED_REASONS,
    JobEntry,
    admission_pass,
    placement_trouble,
    placements,
    unhealthy_nodes,
    unhealthy_since,
)
from gpumesh.operator.jobs.admission import workloads as job_workloads
from gpumesh.operator.jobs.machine import (
    TERMINAL,
    Event,
    JobRef,
    Step,
    World,
    admitted,
    advance,
    invalid,
    preempted,
    queued,
    stalled,
)
from gpumesh.operator.jobs.metering import Flush, meter
from gpumesh.operator.jobs.metrics import COUNTERS, UsageCounters
from gpumesh.operator.jobs.observe import ClusterView, RayJobView
from gpumesh.operator.jobs.settings import JobSettings
from gpumesh.operator.placement import (
    NodeOffer,
    Preemption,
    Request,
    Running,
    Verdict,
    quota_limits,
)
from gpumesh.operator.placement.workload import workload_key
from gpumesh.operator.rejection import Refusals, Rejected
from gpumesh.operator.render import digest as manifest_digest
from gpumesh.operator.render.raycluster import Owner, WorkerSlot
from gpumesh.operator.render.rayjob import rayjob
from gpumesh.operator.world import (
    APPLIED_HASH,
    ClusterKey,
    DeletingWriter,
    EventFn,
    Holdings,
    Obj,
    QueueSide,
    SpecCache,
    StatusMemory,
    created_at,
    parse_gpuquotas,
    unaccounted,
)

log = logging.getLogger(__name__)

PLURAL = "jobs"
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
RAYJOB_REJECTED = "RayJobRejected"
#: How soon a Job whose victim could not be preempted right away looks again.
PREEMPTION_RETRY = timedelta(seconds=1)


@dataclass(frozen=True)
class JobSnapshot:
    """The indexed world one Job reconcile reads; taken fresh for each call."""

    jobs: Mapping[ClusterKey, Obj]
    rayjobs: Mapping[ClusterKey, Sequence[Obj]] = field(default_factory=dict)
    gpuclusters: Mapping[ClusterKey, Obj] = field(default_factory=dict)
    gpuquotas: Sequence[Obj] = ()
    offers: Sequence[NodeOffer] = ()
    """The placement inventory (an InventoryIndex shared with GPUCluster reconciles)."""
    node_names: frozenset[str] = frozenset()
    """Every Kubernetes Node there is: a placement on any other node has lost it."""


@dataclass(frozen=True)
class JobPlan:
    """What one reconcile decided under the placement lock, for ``_execute`` to write."""

    key: ClusterKey
    body: Obj
    ref: JobRef
    spec: JobSpec | None
    previous: JobStatus
    status: JobStatus
    """The whole status, metered (written when it differs from ``previous``)."""
    flush: Flush | None
    now: datetime
    """When it was decided (the time every later step of it uses)."""
    rayjob: Obj | None = None
    """The RayJob to apply (its rendering changed), hash annotation included."""
    stop_rayjob: str | None = None
    delete_job: bool = False
    events: Sequence[Event] = ()
    wake_at: datetime | None = None
    queue_moved: bool = False


@dataclass(frozen=True)
class Outcome:
    """What the caller should arrange after a reconcile."""

    wake_at: datetime | None = None
    """Reconcile this Job again at this time."""
    queue_moved: bool = False
    """GPUs were freed or taken: give the other waiting Jobs a pass."""


def job_key(namespace: str, name: str) -> ClusterKey:
    return ClusterKey(namespace, name, "Job")


class JobReconciler:
    """Holds what outlives one call: caches of what was written, and the shared locks."""

    def __init__(
        self,
        writer: DeletingWriter,
        post_event: EventFn,
        *,
        holdings: Holdings | None = None,
        placement_lock: threading.RLock | None = None,
        clusters: QueueSide | None = None,
        counters: UsageCounters = COUNTERS,
        settings: JobSettings | None = None,
    ) -> None:
        self.writer = writer
        self.post_event = post_event
        self.holdings = holdings if holdings is not None else Holdings()
        self.lock = placement_lock if placement_lock is not None else threading.RLock()
        self.clusters = clusters
        """The GPUClusters in the same queue (None: Jobs alone, as in some tests)."""
        self.counters = counters
        self.settings = settings or JobSettings()
        self._written = StatusMemory(JobStatus)
        self._applied: dict[ClusterKey, dict[str, str]] = {}
        """Per Job, the hash last applied per RayJob (the index may lag behind)."""
        self._specs = SpecCache(JobSpec, limit=10_000)
        self._unhealthy_since: dict[ClusterKey, dict[str, datetime]] = {}
        self.refusals = Refusals()
        self._key_locks: dict[ClusterKey, threading.Lock] = {}
        self._key_locks_guard = threading.Lock()
        """RayJob writes the API server refused for good, per Job and generation."""

    # -- entry points --------------------------------------------------------------------

    def reconcile(self, body: Obj, snap: JobSnapshot, now: datetime | None = None) -> Outcome:
        meta = body["metadata"]
        key = job_key(meta["namespace"], meta["name"])
        with self._key_lock(key):
            with self.lock:
                decided = self._decide(key, body, snap, now or datetime.now(UTC))
            return self._execute(decided)

    def reconcile_queue(
        self, snap: JobSnapshot, now: datetime | None = None
    ) -> list[tuple[ClusterKey, Outcome]]:
        """Reconcile every Job waiting for admission, in queue order.

        What a pass admits counts for the rest of the pass (each decision is booked and
        remembered before the next is made), so one pass can fill the free GPUs. A Job
        whose own reconcile is under way is left to it.
        """
        decided: list[tuple[ClusterKey, JobPlan | Outcome]] = []
        held: list[threading.Lock] = []
        try:
            with self.lock:
                when = now or datetime.now(UTC)
                for key, body in self._waiting(snap, when):
                    lock = self._key_lock(key)
                    if not lock.acquire(blocking=False):
                        continue
                    held.append(lock)
                    try:
                        decided.append((key, self._decide(key, body, snap, when)))
                    except Exception:  # one Job's failure must not stall the queue behind it
                        log.exception(
                            "queue pass: reconciling Job %s/%s failed", key.namespace, key.name
                        )
            outcomes = []
            for key, plan in decided:
                try:
                    outcome = self._execute(plan)
                except Exception:
                    log.exception("queue pass: writing Job %s/%s failed", key.namespace, key.name)
                    continue
                outcomes.append((key, replace(outcome, queue_moved=False)))
            return outcomes
        finally:
            for lock in held:
                lock.release()

    def forget(self, key: ClusterKey) -> None:
        """The Job is gone: drop what this process kept for it."""
        with self.lock:
            self.holdings.forget(key)
            self._written.forget(key)
            self._unhealthy_since.pop(key, None)
            self._applied.pop(key, None)
            self.refusals.forget(key)
        with self._key_locks_guard:
            self._key_locks.pop(key, None)
        self.counters.forget(key.namespace, "Job", key.name)

    def _key_lock(self, key: ClusterKey) -> threading.Lock:
        with self._key_locks_guard:
            return self._key_locks.setdefault(key, threading.Lock())

    def workloads(self, snap: JobSnapshot, now: datetime) -> tuple[list[Request], list[Running]]:
        """Jobs as a GPUCluster admission pass sees them (called with the lock held)."""
        return job_workloads(self._entries(snap, now), now)

    def take_back(
        self, preemptions: Sequence[Preemption], snap: JobSnapshot, now: datetime
    ) -> bool:
        """A GPUCluster's admission takes these Jobs' clusters (called with the lock held):
        all of them, or none when a victim's own reconcile is under way (the caller
        retries shortly; waiting for its lock here could deadlock)."""
        victims = [job_key(p.victim.namespace, p.victim.name) for p in preemptions]
        held: list[threading.Lock] = []
        for key in victims:
            lock = self._key_lock(key)
            if not lock.acquire(blocking=False):
                for taken in held:
                    taken.release()
                return False
            held.append(lock)
        try:
            with self.lock:
                for preemption in preemptions:
                    self._preempt(preemption, snap, now)
        finally:
            for lock in held:
                lock.release()
        return True

    # -- the reconcile ---------------------------------------------------------------------

    def _decide(
        self, key: ClusterKey, body: Obj, snap: JobSnapshot, now: datetime
    ) -> JobPlan | Outcome:
        """Step the Job, admit it if it asks, book what it holds: no API call (the lock is
        held). Returns what to write, or only when to look again."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return Outcome()
        ref = _ref(body)
        previous = self._previous(key, body)
        try:
            spec = self._spec(body)
        except ValidationError as err:
            return self._report_invalid(key, body, ref, previous, err, now)
        refusal = self.refusals.standing(key, ref.generation, now)
        if refusal is not None:
            return Outcome(refusal.retry_at)

        view = _attempt(snap, key, previous.ray_job_name)
        world = self._world(key, spec, previous, view, snap, now)
        step = advance(ref, spec, previous, world)
        admitted_now = False
        if step.wants_admission:
            step, admitted_now = self._admit(key, ref, spec, step, snap, now)

        if spec.cluster_template is not None:
            self.holdings.promise(key, _gpus_per_node(step.status))
        status, flush = self._decide_status(
            key, ref, previous, self._with_trouble(key, step.status), now
        )
        return JobPlan(
            key,
            body,
            ref,
            spec,
            previous,
            status,
            flush,
            now,
            rayjob=self._changed_rayjob(ref, spec, step.status, view, snap),
            stop_rayjob=step.stop_rayjob,
            delete_job=step.delete_job,
            events=step.events,
            wake_at=step.wake_at,
            queue_moved=step.released or admitted_now,
        )

    def _execute(self, decided: JobPlan | Outcome) -> Outcome:
        """Write what was decided, in order: RayJob, RayJob deletion, status, events, Job
        deletion. The placement lock is not held."""
        if isinstance(decided, Outcome):
            return decided
        plan = decided
        if plan.rayjob is not None:
            assert plan.spec is not None
            try:
                self.writer.apply_custom(RAY_GROUP, RAY_VERSION, RAY_PLURAL, plan.rayjob)
            except Rejected as err:
                with self.lock:
                    refused = self._refused(plan, err)
                return self._execute(refused)
            name = plan.rayjob["metadata"]["name"]
            self._applied.setdefault(plan.key, {})[name] = plan.rayjob["metadata"]["annotations"][
                APPLIED_HASH
            ]
        if plan.stop_rayjob:
            self.writer.delete_custom(
                RAY_GROUP, RAY_VERSION, RAY_PLURAL, plan.ref.namespace, plan.stop_rayjob
            )
        self._write_status(plan)
        self._post(plan.body, plan.events)
        if plan.delete_job:
            self.writer.delete_custom(GROUP, VERSION, PLURAL, plan.ref.namespace, plan.ref.name)
        return Outcome(plan.wake_at, plan.queue_moved)

    def _world(
        self,
        key: ClusterKey,
        spec: JobSpec,
        status: JobStatus,
        view: RayJobView | None,
        snap: JobSnapshot,
        now: datetime,
    ) -> World:
        if spec.cluster_ref is not None:
            found = snap.gpuclusters.get(ClusterKey(key.namespace, spec.cluster_ref.name))
            cluster = ClusterView.from_object(found) if found is not None else None
            return World(now, view, cluster=cluster)
        template = spec.cluster_template
        if template is None or status.active_since is None or status.phase in TERMINAL:
            self._unhealthy_since.pop(key, None)
            return World(now, view)
        nodes = [p.node for p in status.placements]
        if status.head_node:
            nodes.append(status.head_node)
        trouble = placement_trouble(
            nodes,
            _by_name(snap.offers),
            snap.node_names,
            template.failover,
            unhealthy_since(self._unhealthy_since.get(key), status.unhealthy_nodes),
            now,
        )
        self._unhealthy_since[key] = trouble.unhealthy_since
        return World(now, view, trouble=trouble.reason, trouble_wake=trouble.wake_at)

    def _with_trouble(self, key: ClusterKey, status: JobStatus) -> JobStatus:
        """``status`` listing the nodes under its attempt that are unhealthy, and since when."""
        on = {p.node for p in status.placements} | {status.head_node or ""}
        since = self._unhealthy_since.get(key, {}) if status.placements else {}
        return status.model_copy(update={"unhealthy_nodes": unhealthy_nodes(since, on)})

    def _admit(
        self,
        key: ClusterKey,
        ref: JobRef,
        spec: JobSpec,
        step: Step,
        snap: JobSnapshot,
        now: datetime,
    ) -> tuple[Step, bool]:
        """Run an admission pass; apply this Job's verdict and any preemption it needs."""
        entries = self._entries(snap, now, override=(key, JobEntry(ref, spec, step.status)))
        others = self.clusters.workloads(now) if self.clusters else ([], [])
        _, running = job_workloads(entries, now)
        result = admission_pass(
            entries,
            snap.offers,
            now=now,
            reserved=unaccounted(self.holdings, [*running, *others[1]]),
            quotas=quota_limits(parse_gpuquotas(snap.gpuquotas)),
            others=others,
        )
        verdict = result.outcome_of(workload_key("Job", ref.namespace, ref.name))
        if verdict is None:
            return step, False
        decision = verdict.decision
        stalled = verdict.reason in STALLED_REASONS
        if verdict.outcome in ("Admitted", "Preempting") and decision is not None:
            if self._take_back(verdict.preemptions, snap, now):
                return self._admitted(ref, spec, step, verdict, now), True
            stalled = False  # a victim cluster is mid-reconcile: stay queued, look again soon
        after = queued(
            ref,
            spec,
            step.status,
            verdict.reason,
            verdict.explanation,
            verdict.position,
            stalled,
            now,
        )
        if verdict.outcome in ("Admitted", "Preempting"):
            return replace(_merge(step, after), wake_at=now + PREEMPTION_RETRY), False
        return _merge(step, after), False

    def _take_back(
        self, preemptions: Sequence[Preemption], snap: JobSnapshot, now: datetime
    ) -> bool:
        """Every victim's GPUs, all or none; the GPUClusters' side locks its victims first."""
        if not preemptions:
            return True
        if self.clusters is not None:
            return self.clusters.take_back(preemptions, now)
        for preemption in preemptions:
            if preemption.victim.kind == "Job":
                self._preempt(preemption, snap, now)
        return True

    def _admitted(
        self, ref: JobRef, spec: JobSpec, step: Step, verdict: Verdict, now: datetime
    ) -> Step:
        decision = verdict.decision
        assert decision is not None
        chosen = placements(decision.assignments)
        after = admitted(
            ref, spec, step.status, chosen, decision.head_node, verdict.explanation, now
        )
        extra: tuple[Event, ...] = ()
        if verdict.preemptions:
            extra = (Event("Normal", "Preempting", verdict.explanation),)
        return _merge(step, after, extra)

    def _preempt(self, preemption: Preemption, snap: JobSnapshot, now: datetime) -> None:
        """Suspend a running Job for a higher-priority one (we hold the lock: no race)."""
        victim = preemption.victim
        key = job_key(victim.namespace, victim.name)
        body = snap.jobs.get(key)
        if body is None or victim.kind != "Job":
            return
        ref = _ref(body)
        spec = self._spec(body)
        previous = self._previous(key, body)
        by = preemption.preemptor
        step = preempted(ref, spec, previous, by, preemption.victim_message, now)
        self.holdings.promise(key, {})
        view = _attempt(snap, key, previous.ray_job_name)
        status, flush = self._decide_status(
            key, ref, previous, self._with_trouble(key, step.status), now
        )
        rayjob = self._changed_rayjob(ref, spec, step.status, view, snap)
        plan = JobPlan(
            key, body, ref, spec, previous, status, flush, now, rayjob, events=step.events
        )
        self._execute(plan)

    # -- writes ----------------------------------------------------------------------------

    def _changed_rayjob(
        self,
        ref: JobRef,
        spec: JobSpec,
        status: JobStatus,
        view: RayJobView | None,
        snap: JobSnapshot,
    ) -> Obj | None:
        """The attempt's RayJob to apply, if its rendering changed since it was applied."""
        manifest = self._desired_rayjob(ref, spec, status, view)
        if manifest is None:
            return None
        name = manifest["metadata"]["name"]
        digest = manifest_digest(manifest)
        key = job_key(ref.namespace, ref.name)
        indexed = _rayjob_object(snap, key, name)
        seen = (indexed or {}).get("metadata", {}).get("annotations", {}).get(APPLIED_HASH)
        if digest in (seen, self._applied.get(key, {}).get(name)):
            return None
        manifest["metadata"]["annotations"] = {APPLIED_HASH: digest}
        return manifest

    def _desired_rayjob(
        self, ref: JobRef, spec: JobSpec, status: JobStatus, view: RayJobView | None
    ) -> dict[str, Any] | None:
        name = status.ray_job_name
        if name is None or status.attempts == 0:
            return None
        finished = status.phase in TERMINAL
        owner = Owner(f"{GROUP}/{VERSION}", "Job", ref.name, ref.uid)
        common: dict[str, Any] = {
            "name": name,
            "namespace": ref.namespace,
            "owner": owner,
            "attempt": status.attempts,
            "submission_mode": self.settings.submission_mode,
        }
        if spec.cluster_template is None:
            active = status.active_since is not None
            if finished or not active or status.ray_cluster_name is None:
                return None
            return rayjob(spec, ray_cluster=status.ray_cluster_name, **common)
        if finished and (view is None or view.finished):
            return None  # KubeRay is done with it; nothing left to stop
        active = status.active_since is not None
        slots = [WorkerSlot(p.group, p.node, p.workers) for p in status.placements]
        return rayjob(
            spec,
            suspend=not active,
            slots=slots if active else (),
            head_node=status.head_node if active else None,
            **common,
        )

    def _decide_status(
        self, key: ClusterKey, ref: JobRef, previous: JobStatus, status: JobStatus, now: datetime
    ) -> tuple[JobStatus, Flush | None]:
        """Meter ``status`` and remember it as this Job's, before it is written: the next
        decision (in this pass too) starts from it."""
        status, flush = meter(previous, status, now, self.settings.meter_flush_seconds)
        self._written.remember(key, ref.uid, status)
        return status, flush

    def _write_status(self, plan: JobPlan) -> None:
        """Patch the status if it changed; count what the meter flushed. A failed write
        forgets the remembered status and gives back what it booked: the next reconcile
        starts from the API's."""
        old, new = plan.previous.to_api(), plan.status.to_api()
        if old != new:
            patch = merge_patch(old, new)
            try:
                self.writer.patch_status(
                    GROUP, VERSION, PLURAL, plan.ref.namespace, plan.ref.name, patch
                )
            except BaseException:
                with self.lock:  # back to what the API holds: its status, its GPUs
                    self._written.forget(plan.key)
                    if plan.spec is not None and plan.spec.cluster_template is not None:
                        self.holdings.promise(plan.key, _gpus_per_node(plan.previous))
                raise
        self.counters.record(plan.ref.namespace, "Job", plan.ref.name, plan.flush)

    def _refused(self, plan: JobPlan, err: Rejected) -> JobPlan:
        """The RayJob write was refused for good: this step is dropped, the Job says why
        (Stalled, an event), and what it had just been promised goes back to the queue."""
        key, ref, previous, now = plan.key, plan.ref, plan.previous, plan.now
        what = f"RayJob {previous.ray_job_name or ref.name}"
        refusal = self.refusals.record(key, ref.generation, what, err, now)
        log.warning("Job %s/%s: %s", ref.namespace, ref.name, refusal.message)
        if plan.spec is not None and plan.spec.cluster_template is not None:
            self.holdings.promise(key, _gpus_per_node(previous))
        status = stalled(ref, previous, RAYJOB_REJECTED, refusal.message, now)
        events: tuple[Event, ...] = ()
        if status.to_api() != previous.to_api():
            events = (Event("Warning", RAYJOB_REJECTED, refusal.message),)
        status, flush = self._decide_status(key, ref, previous, status, now)
        return JobPlan(
            key,
            plan.body,
            ref,
            plan.spec,
            previous,
            status,
            flush,
            now,
            events=events,
            wake_at=refusal.retry_at,
            queue_moved=True,
        )

    def _report_invalid(
        self,
        key: ClusterKey,
        body: Obj,
        ref: JobRef,
        previous: JobStatus,
        err: ValidationError,
        now: datetime,
    ) -> JobPlan:
        problems = spec_problems(err)
        status = invalid(ref, previous, problems, now)
        events: tuple[Event, ...] = ()
        if status.to_api() != previous.to_api():
            events = (Event("Warning", "InvalidSpec", problems),)
        status, flush = self._decide_status(key, ref, previous, status, now)
        return JobPlan(key, body, ref, None, previous, status, flush, now, events=events)

    def _post(self, body: Obj, events: Sequence[Event]) -> None:
        for event in events:
            try:
                self.post_event(body, event.type, event.reason, event.message)
            except Exception:  # the writes are done; a lost event must not undo them
                log.exception("event %s on Job %s not posted", event.reason, body["metadata"])

    # -- reading the snapshot ----------------------------------------------------------------

    def _previous(self, key: ClusterKey, body: Obj) -> JobStatus:
        """The last status written: ours if the watch has not caught up with it yet."""
        return self._written.previous(key, body)

    def _spec(self, body: Obj) -> JobSpec:
        return self._specs.parse(body)

    def _entries(
        self,
        snap: JobSnapshot,
        now: datetime,
        override: tuple[ClusterKey, JobEntry] | None = None,
    ) -> list[JobEntry]:
        """Jobs as admission sees them; one whose RayJob stands refused asks for nothing
        (it still counts what it holds)."""
        entries = []
        for key, body in snap.jobs.items():
            if override is not None and key == override[0]:
                entries.append(override[1])
                continue
            if body["metadata"].get("deletionTimestamp"):
                continue
            try:
                spec = self._spec(body)
            except ValidationError:
                continue
            ref, previous = _ref(body), self._previous(key, body)
            refused = self.refusals.standing(key, ref.generation, now)
            if refused is not None and not previous.placements:
                continue
            entries.append(JobEntry(ref, spec, previous))
        if override is not None and override[0] not in snap.jobs:
            entries.append(override[1])
        return entries

    def _waiting(self, snap: JobSnapshot, now: datetime) -> list[tuple[ClusterKey, Obj]]:
        """Jobs whose template waits for GPUs, highest priority then oldest first."""
        found = []
        for entry in self._entries(snap, now):
            if entry.waiting(now):
                key = job_key(entry.ref.namespace, entry.ref.name)
                order = (-entry.spec.priority, entry.ref.created, key)
                found.append((order, key))
        return [(key, snap.jobs[key]) for _, key in sorted(found)]


def _merge(before: Step, after: Step, extra: tuple[Event, ...] = ()) -> Step:
    wakes = [w for w in (before.wake_at, after.wake_at) if w is not None]
    return Step(
        status=after.status,
        events=before.events + extra + after.events,
        wants_admission=False,
        stop_rayjob=before.stop_rayjob or after.stop_rayjob,
        delete_job=before.delete_job or after.delete_job,
        wake_at=min(wakes, default=None),
        released=before.released or after.released,
    )


def _ref(body: Obj) -> JobRef:
    meta = body["metadata"]
    return JobRef(
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 0),
        created=created_at(body),
    )


def _rayjob_object(snap: JobSnapshot, key: ClusterKey, name: str | None) -> Obj | None:
    if name is None:
        return None
    return next((r for r in snap.rayjobs.get(key, ()) if r["metadata"]["name"] == name), None)


def _attempt(snap: JobSnapshot, key: ClusterKey, name: str | None) -> RayJobView | None:
    found = _rayjob_object(snap, key, name)
    return RayJobView.from_object(found) if found is not None else None


def _gpus_per_node(status: JobStatus) -> dict[str, int]:
    """What the ledger should hold for a Job: its placements while it holds them."""
    if status.active_since is None:
        return {}
    per_node: dict[str, int] = {}
    for p in status.placements:
        per_node[p.node] = per_node.get(p.node, 0) + p.gpus
    return per_node


def _by_name(offers: Sequence[NodeOffer]) -> Mapping[str, NodeOffer]:
    found: Mapping[str, NodeOffer] | None = getattr(offers, "by_name", None)
    return found if found is not None else {o.name: o for o in offers}
