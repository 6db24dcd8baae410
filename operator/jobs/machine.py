"""The Job state machine (pure): previous status plus what was observed -> next status.

One attempt is one KubeRay RayJob (``<job>``, then ``<job>-a2``...). With a cluster
template the attempt's RayJob exists from the start, suspended while the job waits in the
queue; admission writes its placed cluster and resumes it; preemption or a lost node
suspends it again and a later admission resumes it elsewhere. With a cluster reference
the RayJob is made once the GPUCluster is Ready and deleted to stop it (KubeRay cannot
suspend a RayJob that selects an existing cluster).

Phases: Queued (waiting for admission, a retry's backoff, or the referenced cluster),
Admitted (GPUs granted, KubeRay not started yet), Starting (cluster coming up, Ray job
pending), Running, Succeeded, Failed, Suspended (``spec.suspend`` or preempted) and
Migrating (the job's nodes failed: waiting to be placed elsewhere; or, on a referenced
GPUCluster, that cluster is migrating).

``status.activeSince`` is set exactly while an attempt holds its cluster; the machine
reads "active" from it. Every function returns a new status and never mutates one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

from gpumesh.api.conditions import READY, RECONCILING, STALLED, set_condition
from gpumesh.api.gpucluster import WorkerPlacement
from gpumesh.api.job import JobPhase, JobSpec, JobStatus
from gpumesh.operator.jobs.metering import all_ready
from gpumesh.operator.jobs.naming import rayjob_name
from gpumesh.operator.jobs.observe import (
    COMPLETE,
    DEPLOYMENT_NEW,
    JOB_FAILED,
    JOB_RUNNING,
    JOB_STOPPED,
    RUNNING,
    SUSPENDED,
    SUSPENDING,
    ClusterView,
    RayJobView,
)
from gpumesh.operator.jobs.retry import Failure, backoff_seconds, classify

TERMINAL: Final[frozenset[str]] = frozenset({"Succeeded", "Failed"})
#: Infrastructure retries allowed to a Job on a referenced GPUCluster (a Job with a
#: template uses its template's ``failover.maxMigrations``).
MAX_INFRASTRUCTURE_RETRIES_ON_CLUSTER: Final = 10
MESSAGE_LIMIT: Final = 4096

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class JobRef:
    """The Job object's identity and age."""

    namespace: str
    name: str
    uid: str
    generation: int
    created: datetime

    @property
    def key(self) -> str:
        return f"Job/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Event:
    """A Kubernetes event to post on the Job."""

    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class World:
    """What one step observed besides the Job itself."""

    now: datetime
    attempt: RayJobView | None = None
    """The current attempt's RayJob as indexed; None before it shows up."""
    cluster: ClusterView | None = None
    """clusterRef: the referenced GPUCluster; None when it does not exist."""
    trouble: str | None = None
    """clusterTemplate: why the current placement cannot go on (lost nodes), or None."""
    trouble_wake: datetime | None = None
    """When ``trouble`` may appear without any event (a node's grace period ends)."""


@dataclass(frozen=True)
class Step:
    """The next status, and what the reconcile must do besides writing it."""

    status: JobStatus
    events: tuple[Event, ...] = ()
    wants_admission: bool = False
    """Waiting and eligible: run an admission pass for it now."""
    stop_rayjob: str | None = None
    """clusterRef: delete this RayJob (the only way to stop one)."""
    delete_job: bool = False
    """ttlSecondsAfterFinished has run out."""
    wake_at: datetime | None = None
    """Reconcile again at this time even if nothing else happens."""
    released: bool = False
    """GPUs were given back: other jobs may be admitted now."""


@dataclass
class _Draft:
    """A status being edited by one step, with the step's other outputs."""

    job: JobRef
    spec: JobSpec
    now: datetime
    status: JobStatus
    events: list[Event] = field(default_factory=list)
    stop_rayjob: str | None = None
    released: bool = False
    wake_at: datetime | None = None

    def set(self, **changes: Any) -> None:
        self.status = self.status.model_copy(update=changes)

    def say(self, type_: EventType, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def wake(self, at: datetime | None) -> None:
        if at is not None and (self.wake_at is None or at < self.wake_at):
            self.wake_at = at

    @property
    def template(self) -> bool:
        return self.spec.cluster_template is not None

    @property
    def active(self) -> bool:
        return self.status.active_since is not None

    def step(self, *, wants_admission: bool = False, delete_job: bool = False) -> Step:
        return Step(
            status=self.status,
            events=tuple(self.events),
            wants_admission=wants_admission,
            stop_rayjob=self.stop_rayjob,
            delete_job=delete_job,
            wake_at=self.wake_at,
            released=self.released,
        )


# --- the step ---------------------------------------------------------------------------


def advance(job: JobRef, spec: JobSpec, previous: JobStatus, world: World) -> Step:
    """One step of the Job: read the current attempt's outcome, enforce limits, move on."""
    d = _Draft(job, spec, world.now, previous)
    if d.status.phase in TERMINAL:
        return _finished(d)
    if d.status.attempts == 0:
        d.set(attempts=1, ray_job_name=rayjob_name(job.name, 1), phase="Queued")
        d.say("Normal", "Queued" if d.template else "Waiting", _first_words(d))
    view = world.attempt if _is_current(world.attempt, d.status) else None
    if view is not None and d.active:
        _observe_ray_info(d, view)
    if view is not None and view.finished:
        _attempt_ended(d, view, world)
        if d.status.phase in TERMINAL:
            return _conclude(d)
    if d.active and _deadline_passed(d):
        return _conclude(d)
    if spec.suspend:
        _suspend_by_user(d)
        return _conclude(d)
    if d.active:
        _run(d, view, world)
        if d.active:
            return _conclude(d)
    return _wait(d, world)


def admitted(
    job: JobRef,
    spec: JobSpec,
    status: JobStatus,
    placements: Sequence[WorkerPlacement],
    head_node: str | None,
    explanation: str,
    now: datetime,
) -> Step:
    """The queue admitted the waiting job: it holds ``placements`` from now on."""
    d = _Draft(job, spec, now, status)
    resumed = status.phase in ("Suspended", "Migrating")
    gpus = sum(p.gpus for p in placements)
    price = sum((p.price_per_gpu_hour * p.gpus for p in placements), Decimal(0))
    where = ", ".join(f"{p.node}({p.workers})" for p in placements) or "no workers"
    d.set(
        phase="Admitted",
        active_since=now,
        start_time=status.start_time or now,
        placements=list(placements),
        head_node=head_node,
        gpus=gpus,
        price_per_hour=price.quantize(Decimal("0.0001")) if placements else None,
        queue_position=None,
        preempted_by=None,
        next_attempt_time=None,
        message=_clip(f"attempt {status.attempts} admitted: {explanation}"),
    )
    verb = "Resumed" if resumed else "Admitted"
    d.say("Normal", verb, f"attempt {status.attempts}: {gpus} GPUs on {where}")
    _deadline_passed(d)  # schedules the deadline; ends the job if it was used up before
    return _conclude(d)


def queued(
    job: JobRef,
    spec: JobSpec,
    status: JobStatus,
    reason: str,
    explanation: str,
    position: int | None,
    stalled: bool,
    now: datetime,
) -> Step:
    """The queue did not admit the job this time; say why and where it stands."""
    d = _Draft(job, spec, now, status)
    d.set(queue_position=position, message=_clip(explanation))
    if status.message != d.status.message and stalled:
        d.say("Warning", reason, explanation)
    return _conclude(d, stalled=(reason, explanation) if stalled else None)


def preempted(
    job: JobRef, spec: JobSpec, status: JobStatus, by: str, message: str, now: datetime
) -> Step:
    """A higher-priority workload takes this job's GPUs: suspend it until admitted again.

    Preemption is an infrastructure event: it costs no retry and no migration budget.
    """
    d = _Draft(job, spec, now, status)
    _release(d)
    _forget_cluster(d)
    d.set(
        phase="Suspended",
        preempted_by=by,
        infrastructure_retries=status.infrastructure_retries + 1,
        message=_clip(message),
    )
    d.say("Warning", "Preempted", message)
    return _conclude(d)


def invalid(job: JobRef, previous: JobStatus, problems: str, now: datetime) -> JobStatus:
    """A spec the operator cannot act on (the API server let it through): Stalled."""
    return stalled(job, previous, "InvalidSpec", problems, now)


def stalled(
    job: JobRef, previous: JobStatus, reason: str, message: str, now: datetime
) -> JobStatus:
    """Nothing moves until the Job changes: Stalled, the rest of the status as it was."""
    conditions = set_condition(
        previous.conditions,
        STALLED,
        True,
        reason,
        message,
        generation=job.generation,
        now=now,
    )
    return previous.model_copy(
        update={"conditions": conditions, "observed_generation": job.generation}
    )


# --- pieces of a step -----------------------------------------------------------------------


def _is_current(view: RayJobView | None, status: JobStatus) -> bool:
    return view is not None and view.name == status.ray_job_name


def _first_words(d: _Draft) -> str:
    if d.spec.cluster_ref is not None:
        return f"waiting for GPUCluster {d.spec.cluster_ref.name} to run attempt 1"
    return f"RayJob {d.status.ray_job_name} created suspended; waiting for admission"


def _observe_ray_info(d: _Draft, view: RayJobView) -> None:
    url = view.dashboard_url
    if url and "://" not in url:
        url = f"http://{url}"
    d.set(
        ray_job_id=view.job_id or d.status.ray_job_id,
        ray_cluster_name=view.cluster_name or d.status.ray_cluster_name,
        dashboard_url=url or d.status.dashboard_url,
    )


def _attempt_ended(d: _Draft, view: RayJobView, world: World) -> None:
    """The current attempt's RayJob finished: success, a retry, or the end."""
    attempt = d.status.attempts
    if view.deployment_status == COMPLETE and view.job_status not in (JOB_STOPPED, JOB_FAILED):
        _end(d, "Succeeded", "Succeeded", f"attempt {attempt} succeeded")
        d.say("Normal", "Succeeded", f"attempt {attempt} ({view.name}) succeeded")
        return
    failure = classify(view, _trouble_for(d, world))
    if failure.kind == "Permanent":
        _end(d, "Failed", failure.reason, f"attempt {attempt}: {failure.message}")
        d.say("Warning", failure.reason, d.status.message or "")
        return
    if failure.kind == "Infrastructure":
        _infrastructure_retry(d, failure)
        return
    failed = d.status.failed_attempts + 1
    d.set(failed_attempts=failed)
    if failed > d.spec.max_retries:
        text = f"attempt {attempt} failed and no retries are left ({d.spec.max_retries}): "
        _end(d, "Failed", "RetriesExhausted", text + failure.message)
        d.say("Warning", "RetriesExhausted", d.status.message or "")
        return
    wait = backoff_seconds(d.spec.retry_backoff_seconds, failed)
    after = d.now + timedelta(seconds=wait)
    _new_attempt(d, phase="Queued", not_before=after)
    d.set(
        message=_clip(
            f"attempt {attempt} failed ({failure.reason}); retry {failed} of "
            f"{d.spec.max_retries} as attempt {d.status.attempts} after {wait}s backoff: "
            f"{failure.message}"
        )
    )
    d.say("Warning", "AttemptFailed", d.status.message or "")


def _trouble_for(d: _Draft, world: World) -> str | None:
    if d.template:
        return world.trouble
    name = d.spec.cluster_ref.name if d.spec.cluster_ref else ""
    if world.cluster is None:
        return f"GPUCluster {name} is gone"
    if world.cluster.phase != "Ready":
        return f"GPUCluster {name} is {world.cluster.phase}"
    return None


def _infrastructure_retry(d: _Draft, failure: Failure) -> None:
    """Not the program's fault: a new attempt at once, outside the retry budget."""
    attempt = d.status.attempts
    used = d.status.infrastructure_retries + 1
    d.set(infrastructure_retries=used)
    budget = _infrastructure_budget(d.spec)
    if used > budget:
        _end(
            d,
            "Failed",
            "InfrastructureRetriesExhausted",
            f"attempt {attempt} lost to infrastructure ({failure.message}) "
            f"{used} times, more than the {budget} allowed",
        )
        d.say("Warning", "InfrastructureRetriesExhausted", d.status.message or "")
        return
    _new_attempt(d, phase="Migrating" if d.template else "Queued", not_before=None)
    d.set(
        message=_clip(
            f"attempt {attempt} lost to infrastructure: {failure.message}; "
            f"attempt {d.status.attempts} starts as soon as it can (retries are not used up)"
        )
    )
    d.say("Warning", "InfrastructureFailure", d.status.message or "")


def _infrastructure_budget(spec: JobSpec) -> int:
    if spec.cluster_template is not None:
        return spec.cluster_template.failover.max_migrations
    return MAX_INFRASTRUCTURE_RETRIES_ON_CLUSTER


def _new_attempt(d: _Draft, phase: JobPhase, not_before: datetime | None) -> None:
    _release(d)
    attempt = d.status.attempts + 1
    d.set(
        attempts=attempt,
        ray_job_name=rayjob_name(d.job.name, attempt),
        ray_job_id=None,
        ray_cluster_name=None,
        dashboard_url=None,
        phase=phase,
        next_attempt_time=not_before,
        queue_position=None,
    )


def _release(d: _Draft) -> None:
    """The attempt stops holding its cluster; its active time is banked for the deadline."""
    since = d.status.active_since
    if since is None:
        return
    ran = max(0.0, (d.now - since).total_seconds())
    d.set(
        active_since=None,
        active_seconds=d.status.active_seconds + ran,
        placements=[],
        head_node=None,
        gpus=0,
        price_per_hour=None,
    )
    d.released = True


def _stop_attempt(d: _Draft) -> None:
    """Stop the running attempt: a template's RayJob is suspended (it renders so once the
    job no longer holds GPUs); one on a referenced cluster must be deleted."""
    if d.active and not d.template:
        d.stop_rayjob = d.status.ray_job_name


def _forget_cluster(d: _Draft) -> None:
    """KubeRay drops the cluster and Ray job of a suspended RayJob; so does the status."""
    d.set(ray_job_id=None, ray_cluster_name=None, dashboard_url=None)


def _end(d: _Draft, phase: Literal["Succeeded", "Failed"], reason: str, message: str) -> None:
    _release(d)
    d.set(
        phase=phase,
        completion_time=d.now,
        queue_position=None,
        next_attempt_time=None,
        message=_clip(message),
    )
    generation = d.job.generation
    conditions = set_condition(
        d.status.conditions,
        READY,
        phase == "Succeeded",
        reason,
        d.status.message or "",
        generation=generation,
        now=d.now,
    )
    conditions = set_condition(
        conditions, RECONCILING, False, phase, "finished", generation=generation, now=d.now
    )
    conditions = set_condition(
        conditions,
        STALLED,
        phase == "Failed",
        reason if phase == "Failed" else "Succeeded",
        d.status.message or "" if phase == "Failed" else "finished",
        generation=generation,
        now=d.now,
    )
    d.set(conditions=conditions)


def _deadline_passed(d: _Draft) -> bool:
    limit = d.spec.active_deadline_seconds
    since = d.status.active_since
    if limit is None or since is None:
        return False
    left = limit - d.status.active_seconds
    at = since + timedelta(seconds=left)
    if d.now < at:
        d.wake(at)
        return False
    _stop_attempt(d)
    _end(
        d,
        "Failed",
        "DeadlineExceeded",
        f"active for {limit}s, the activeDeadlineSeconds; attempt {d.status.attempts} stopped",
    )
    d.say("Warning", "DeadlineExceeded", d.status.message or "")
    return True


def _suspend_by_user(d: _Draft) -> None:
    if d.active:
        attempt = d.status.attempts
        _stop_attempt(d)
        if d.template:
            _release(d)
            _forget_cluster(d)
        else:
            # A RayJob on an existing cluster cannot be suspended: it is deleted, and a
            # fresh attempt (a new RayJob name) runs once the job is resumed.
            _new_attempt(d, phase="Suspended", not_before=None)
        d.say("Normal", "Suspended", f"attempt {attempt} stopped: spec.suspend is true")
    elif d.status.phase != "Suspended":
        d.say("Normal", "Suspended", "spec.suspend is true")
    d.set(
        phase="Suspended",
        queue_position=None,
        preempted_by=None,
        message="suspended: spec.suspend is true",
    )


def _run(d: _Draft, view: RayJobView | None, world: World) -> None:
    """The attempt holds its cluster: follow KubeRay, or move off failed nodes."""
    if d.template:
        d.wake(world.trouble_wake)
        if world.trouble is not None:
            _migrate(d, world.trouble)
            return
        phase = _running_phase(view)
        d.set(phase=phase, placements=all_ready(d.status.placements, phase == "Running"))
        return
    cluster = world.cluster
    name = d.spec.cluster_ref.name if d.spec.cluster_ref else ""
    if cluster is None:
        _stop_attempt(d)
        gone = Failure("Infrastructure", "ClusterGone", f"GPUCluster {name} is gone")
        _infrastructure_retry(d, gone)
        return
    phase = _running_phase(view)
    if cluster.phase == "Migrating" and phase in ("Starting", "Running"):
        phase = "Migrating"
    d.set(phase=phase, ray_cluster_name=cluster.ray_cluster_name or d.status.ray_cluster_name)


def _running_phase(view: RayJobView | None) -> JobPhase:
    """Admitted until KubeRay picks the attempt up, Starting until the Ray job runs."""
    if view is None or view.suspend:
        return "Admitted"
    if view.deployment_status in (DEPLOYMENT_NEW, SUSPENDING, SUSPENDED):
        return "Admitted"
    if view.deployment_status == RUNNING and view.job_status == JOB_RUNNING:
        return "Running"
    return "Starting"


def _migrate(d: _Draft, trouble: str) -> None:
    """Nodes under the attempt failed: suspend it and place it again elsewhere."""
    attempt = d.status.attempts
    used = d.status.infrastructure_retries + 1
    budget = _infrastructure_budget(d.spec)
    d.set(infrastructure_retries=used)
    if used > budget:
        _end(
            d,
            "Failed",
            "InfrastructureRetriesExhausted",
            f"{trouble}; {used} moves is more than failover.maxMigrations ({budget})",
        )
        d.say("Warning", "InfrastructureRetriesExhausted", d.status.message or "")
        return
    _release(d)
    _forget_cluster(d)
    d.set(
        phase="Migrating",
        message=_clip(f"attempt {attempt} suspended to move off failed nodes: {trouble}"),
    )
    d.say("Warning", "Migrating", d.status.message or "")


def _wait(d: _Draft, world: World) -> Step:
    """Not holding a cluster: wait for the backoff, the queue, or the referenced cluster."""
    not_before = d.status.next_attempt_time
    if not_before is not None and d.now < not_before:
        d.wake(not_before)
        if d.status.phase == "Suspended" and d.status.preempted_by is None:
            d.set(phase="Queued")
        d.set(queue_position=None)
        return _conclude(d)
    if d.template:
        if d.status.phase == "Suspended" and d.status.preempted_by is None:
            d.set(phase="Queued")  # spec.suspend was lifted
        return _conclude(d, wants_admission=True)
    name = d.spec.cluster_ref.name if d.spec.cluster_ref else ""
    cluster = world.cluster
    if cluster is None or not cluster.ready:
        why = "not found" if cluster is None else f"phase {cluster.phase}"
        d.set(phase="Queued", message=f"waiting for GPUCluster {name} to be Ready ({why})")
        return _conclude(d)
    d.set(
        phase="Admitted",
        active_since=d.now,
        start_time=d.status.start_time or d.now,
        ray_cluster_name=cluster.ray_cluster_name,
        next_attempt_time=None,
        queue_position=None,
        message=f"attempt {d.status.attempts} submitted to GPUCluster {name}",
    )
    d.say("Normal", "Started", f"RayJob {d.status.ray_job_name} on GPUCluster {name}")
    return _conclude(d)


def _finished(d: _Draft) -> Step:
    ttl = d.spec.ttl_seconds_after_finished
    done = d.status.completion_time
    d.set(observed_generation=d.job.generation)
    if ttl is None or done is None:
        return d.step()
    expiry = done + timedelta(seconds=ttl)
    if d.now >= expiry:
        d.say("Normal", "Expired", f"deleted {ttl}s after it finished (ttlSecondsAfterFinished)")
        return d.step(delete_job=True)
    d.wake(expiry)
    return d.step()


def _conclude(
    d: _Draft, *, wants_admission: bool = False, stalled: tuple[str, str] | None = None
) -> Step:
    """Stamp the generation and the kstatus conditions that follow from the phase."""
    d.set(observed_generation=d.job.generation)
    phase = d.status.phase
    if phase in TERMINAL:
        ttl = d.spec.ttl_seconds_after_finished
        if ttl is not None and d.status.completion_time is not None:
            d.wake(d.status.completion_time + timedelta(seconds=ttl))
        return d.step()
    generation = d.job.generation
    message = d.status.message or phase
    user_suspended = phase == "Suspended" and d.spec.suspend
    conditions = set_condition(
        d.status.conditions, READY, False, phase, message, generation=generation, now=d.now
    )
    conditions = set_condition(
        conditions,
        RECONCILING,
        not user_suspended,
        phase,
        message,
        generation=generation,
        now=d.now,
    )
    if stalled is not None:
        conditions = set_condition(
            conditions, STALLED, True, stalled[0], stalled[1], generation=generation, now=d.now
        )
    elif not wants_admission:
        # A job about to go through admission keeps its Stalled: the pass decides it.
        conditions = set_condition(
            conditions,
            STALLED,
            False,
            "Progressing",
            "nothing blocks the job",
            generation=generation,
            now=d.now,
        )
    d.set(conditions=conditions)
    return d.step(wants_admission=wants_admission)


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."
