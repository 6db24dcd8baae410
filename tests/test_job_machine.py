"""The Job state machine: every RayJob status mapping, retries versus infrastructure
failures, backoff, deadline, TTL, suspension and preemption, on a template and a
referenced GPUCluster. Pure: no cluster, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from gpumesh.api.gpucluster import WorkerPlacement
from gpumesh.api.job import JobSpec, JobStatus
from gpumesh.operator.jobs import machine
from gpumesh.operator.jobs.machine import JobRef, Step, World
from gpumesh.operator.jobs.naming import rayjob_name
from gpumesh.operator.jobs.observe import ClusterView, RayJobView
from gpumesh.operator.jobs.retry import MAX_BACKOFF_SECONDS, backoff_seconds

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
REF = JobRef("team-a", "train", "uid-1", 1, T0 - timedelta(hours=1))
PLACED = [
    WorkerPlacement(
        group="workers",
        node="node-a",
        supplier="acme",
        region="eu-west",
        gpu_model="NVIDIA A100-SXM4-80GB",
        workers=2,
        gpus=2,
        price_per_gpu_hour=Decimal("1.50"),
    )
]


def template(**fields: Any) -> JobSpec:
    base: dict[str, Any] = {
        "entrypoint": "python train.py",
        "clusterTemplate": {"workers": {"gpusPerWorker": 1, "replicas": 2}},
    }
    return JobSpec.model_validate(base | fields)


def on_cluster(**fields: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"entrypoint": "python eval.py", "clusterRef": {"name": "shared"}} | fields
    )


def view(
    deployment: str = "Running",
    job: str = "RUNNING",
    reason: str = "",
    name: str = "train",
    suspend: bool = False,
    **fields: Any,
) -> RayJobView:
    return RayJobView(
        name=name,
        suspend=suspend,
        deployment_status=deployment,
        job_status=job,
        reason=reason,
        **fields,
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def step(spec: JobSpec, status: JobStatus, now: datetime = T0, **world: Any) -> Step:
    return machine.advance(REF, spec, status, World(now, **world))


def queued_template(spec: JobSpec) -> JobStatus:
    """The status after the first reconcile of a Job with a template."""
    first = step(spec, JobStatus())
    assert first.wants_admission
    return first.status


def admitted(spec: JobSpec, now: datetime = T0) -> JobStatus:
    waiting = queued_template(spec)
    return machine.admitted(REF, spec, waiting, PLACED, "head-0", "fits", now).status


def conditions(status: JobStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


# --- first steps -----------------------------------------------------------------------------


def test_a_new_template_job_queues_its_suspended_first_attempt() -> None:
    first = step(template(), JobStatus())
    assert first.status.phase == "Queued"
    assert first.status.attempts == 1
    assert first.status.ray_job_name == "train"
    assert first.wants_admission
    assert [e.reason for e in first.events] == ["Queued"]
    assert first.status.observed_generation == 1


def test_admission_holds_gpus_and_starts_the_clocks() -> None:
    status = admitted(template())
    assert status.phase == "Admitted"
    assert status.active_since == T0 and status.start_time == T0
    assert status.placements == PLACED and status.head_node == "head-0"
    assert status.gpus == 2 and status.price_per_hour == Decimal("3.00")
    assert status.queue_position is None
    assert conditions(status)["Reconciling"][0] == "True"


def test_a_job_the_queue_cannot_place_waits_with_its_position() -> None:
    spec = template()
    waiting = queued_template(spec)
    after = machine.queued(REF, spec, waiting, "NoCapacity", "no room", 2, False, T0)
    assert after.status.phase == "Queued" and after.status.queue_position == 2
    assert after.status.message == "no room"
    assert conditions(after.status)["Stalled"] == ("False", "Progressing")
    stuck = machine.queued(
        REF, spec, waiting, "Unsatisfiable", "no H100 at that price", 0, True, T0
    )
    assert conditions(stuck.status)["Stalled"] == ("True", "Unsatisfiable")
    assert [e.reason for e in stuck.events] == ["Unsatisfiable"]


# --- RayJob status mapping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deployment", "job_status", "suspend", "phase"),
    [
        ("", "", False, "Admitted"),
        ("Suspended", "", False, "Admitted"),  # KubeRay has not seen the resumption yet
        ("Suspending", "", False, "Admitted"),
        ("Running", "RUNNING", True, "Admitted"),  # our resumption not indexed yet
        ("Initializing", "", False, "Starting"),
        ("Waiting", "", False, "Starting"),
        ("Retrying", "", False, "Starting"),
        ("Running", "", False, "Starting"),
        ("Running", "PENDING", False, "Starting"),
        ("Running", "RUNNING", False, "Running"),
    ],
)
def test_an_active_attempt_follows_its_rayjob(
    deployment: str, job_status: str, suspend: bool, phase: str
) -> None:
    spec = template()
    current = view(deployment, job_status, suspend=suspend, job_id="raysubmit_1")
    after = step(spec, admitted(spec), at(5), attempt=current)
    assert after.status.phase == phase
    assert after.status.active_since == T0
    assert not after.wants_admission


def test_the_status_shows_what_kuberay_reports_of_the_attempt() -> None:
    spec = template()
    current = view(
        job_id="raysubmit_1", cluster_name="train-x7k2p", dashboard_url="train-head:8265"
    )
    after = step(spec, admitted(spec), at(5), attempt=current).status
    assert after.ray_job_id == "raysubmit_1"
    assert after.ray_cluster_name == "train-x7k2p"
    assert after.dashboard_url == "http://train-head:8265"


def test_no_rayjob_in_the_index_yet_reads_as_admitted() -> None:
    spec = template()
    assert step(spec, admitted(spec), at(1)).status.phase == "Admitted"


def test_success_ends_the_job_and_gives_the_gpus_back() -> None:
    spec = template()
    after = step(spec, admitted(spec), at(600), attempt=view("Complete", "SUCCEEDED"))
    status = after.status
    assert status.phase == "Succeeded"
    assert status.completion_time == at(600)
    assert status.placements == [] and status.gpus == 0 and status.active_since is None
    assert status.active_seconds == 600
    assert after.released
    assert conditions(status) == {
        "Ready": ("True", "Succeeded"),
        "Reconciling": ("False", "Succeeded"),
        "Stalled": ("False", "Succeeded"),
    }
    assert [e.reason for e in after.events] == ["Succeeded"]


def test_a_stopped_ray_job_fails_the_job_without_a_retry() -> None:
    spec = template(maxRetries=3)
    status = step(spec, admitted(spec), at(60), attempt=view("Complete", "STOPPED")).status
    assert status.phase == "Failed"
    assert conditions(status)["Stalled"] == ("True", "Stopped")
    assert status.failed_attempts == 0 and status.attempts == 1


def test_a_rayjob_kuberay_rejects_fails_the_job_at_once() -> None:
    spec = template(maxRetries=3)
    rejected = view("ValidationFailed", "", "ValidationFailed", message="name too long")
    status = step(spec, queued_template(spec), at(1), attempt=rejected).status
    assert status.phase == "Failed"
    assert conditions(status)["Ready"] == ("False", "InvalidRayJob")
    assert "name too long" in (status.message or "")


def test_kuberays_own_deadline_is_a_deadline() -> None:
    spec = template(maxRetries=3)
    ended = view("Failed", "RUNNING", "DeadlineExceeded")
    status = step(spec, admitted(spec), at(60), attempt=ended).status
    assert status.phase == "Failed"
    assert conditions(status)["Ready"][1] == "DeadlineExceeded"


# --- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["AppFailed", "SubmissionFailed", ""])
def test_a_program_failure_uses_a_retry_after_backoff(reason: str) -> None:
    spec = template(maxRetries=2, retryBackoffSeconds=30)
    after = step(spec, admitted(spec), at(100), attempt=view("Failed", "FAILED", reason))
    status = after.status
    assert status.phase == "Queued"
    assert status.failed_attempts == 1 and status.infrastructure_retries == 0
    assert status.attempts == 2 and status.ray_job_name == "train-a2"
    assert status.next_attempt_time == at(130)
    assert status.placements == [] and status.ray_job_id is None
    assert not after.wants_admission  # backing off
    assert after.wake_at == at(130)
    assert after.released
    assert [e.reason for e in after.events] == ["AttemptFailed"]


def test_after_the_backoff_the_next_attempt_queues() -> None:
    spec = template(maxRetries=2, retryBackoffSeconds=30)
    failed = step(spec, admitted(spec), at(100), attempt=view("Failed", "FAILED", "AppFailed"))
    early = step(spec, failed.status, at(129))
    assert not early.wants_admission and early.wake_at == at(130)
    ready = step(spec, failed.status, at(130))
    assert ready.wants_admission and ready.status.phase == "Queued"


def test_the_backoff_doubles_with_each_failure_and_is_capped() -> None:
    assert [backoff_seconds(30, n) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff_seconds(3600, 20) == MAX_BACKOFF_SECONDS
    assert backoff_seconds(30, 0) == 0


def test_retries_run_out() -> None:
    spec = template(maxRetries=1, retryBackoffSeconds=10)
    status = admitted(spec)
    after = step(spec, status, at(10), attempt=view("Failed", "FAILED", "AppFailed"))
    status = machine.admitted(REF, spec, after.status, PLACED, "head-0", "fits", at(30)).status
    second = view("Failed", "FAILED", "AppFailed", name="train-a2")
    end = step(spec, status, at(50), attempt=second).status
    assert end.phase == "Failed" and end.failed_attempts == 2 and end.attempts == 2
    assert conditions(end)["Stalled"] == ("True", "RetriesExhausted")
    assert end.completion_time == at(50)


def test_a_failure_while_a_node_is_lost_is_the_infrastructures() -> None:
    spec = template(maxRetries=0)
    failed = view("Failed", "FAILED", "AppFailed")
    after = step(spec, admitted(spec), at(60), attempt=failed, trouble="node node-a lost")
    status = after.status
    assert status.phase == "Migrating"
    assert status.failed_attempts == 0 and status.infrastructure_retries == 1
    assert status.attempts == 2 and status.next_attempt_time is None
    assert after.wants_admission  # re-placed at once, no backoff
    assert "node node-a lost" in (status.message or "")


@pytest.mark.parametrize(
    "reason", ["JobDeploymentStatusTransitionGracePeriodExceeded", "PreRunningDeadlineExceeded"]
)
def test_kuberay_losing_track_of_the_job_is_the_infrastructures(reason: str) -> None:
    spec = template(maxRetries=0)
    status = step(spec, admitted(spec), at(60), attempt=view("Failed", "FAILED", reason)).status
    assert status.phase == "Migrating" and status.infrastructure_retries == 1
    assert status.failed_attempts == 0


def test_infrastructure_retries_have_their_own_budget() -> None:
    spec = template(clusterTemplate={"workers": {"replicas": 1}, "failover": {"maxMigrations": 1}})
    lost = view("Failed", "FAILED", "AppFailed")
    first = step(spec, admitted(spec), at(10), attempt=lost, trouble="node node-a lost").status
    assert first.phase == "Migrating"
    again = machine.admitted(REF, spec, first, PLACED, "head-0", "fits", at(20)).status
    lost2 = view("Failed", "FAILED", "AppFailed", name="train-a2")
    end = step(spec, again, at(30), attempt=lost2, trouble="node node-a lost").status
    assert end.phase == "Failed"
    assert conditions(end)["Ready"][1] == "InfrastructureRetriesExhausted"


def test_a_node_failing_under_a_running_attempt_moves_it() -> None:
    spec = template()
    running = step(spec, admitted(spec), at(5), attempt=view()).status
    after = step(spec, running, at(50), attempt=view(), trouble="node node-a lost")
    status = after.status
    assert status.phase == "Migrating"
    assert status.attempts == 1  # the same RayJob is resumed elsewhere
    assert status.infrastructure_retries == 1 and status.failed_attempts == 0
    assert status.placements == [] and status.ray_cluster_name is None
    assert after.wants_admission and after.released
    assert [e.reason for e in after.events] == ["Migrating"]
    resumed = machine.admitted(REF, spec, status, PLACED, "head-0", "fits", at(51))
    assert resumed.status.phase == "Admitted"
    assert [e.reason for e in resumed.events] == ["Resumed"]


def test_a_grace_period_still_running_wakes_the_job_when_it_ends() -> None:
    spec = template()
    after = step(spec, admitted(spec), at(5), attempt=view(), trouble_wake=at(35))
    assert after.status.phase == "Running" and after.wake_at == at(35)


def test_attempt_names_fit_kuberays_limit() -> None:
    assert rayjob_name("train", 1) == "train"
    assert rayjob_name("train", 3) == "train-a3"
    long = rayjob_name("x" * 60, 12)
    assert len(long) <= 47 and long.endswith("-a12")
    assert rayjob_name("x" * 60, 12) != rayjob_name("x" * 59 + "y", 12)
    assert rayjob_name("7-up", 1)[0].isalpha()
    assert rayjob_name("a.b", 1).startswith("a-b-")


# --- deadline, TTL, suspension, preemption -----------------------------------------------------


def test_active_deadline_fails_the_job_and_stops_the_attempt() -> None:
    spec = template(activeDeadlineSeconds=100, maxRetries=5)
    status = admitted(spec)
    early = step(spec, status, at(50), attempt=view())
    assert early.status.phase == "Running" and early.wake_at == at(100)
    late = step(spec, early.status, at(100), attempt=view())
    assert late.status.phase == "Failed" and late.released
    assert conditions(late.status)["Stalled"] == ("True", "DeadlineExceeded")
    assert late.stop_rayjob is None  # a template's RayJob is suspended, not deleted


def test_time_spent_waiting_does_not_count_against_the_deadline() -> None:
    spec = template(activeDeadlineSeconds=100)
    status = admitted(spec)
    moved = step(spec, status, at(60), attempt=view(), trouble="node node-a lost").status
    assert moved.active_seconds == 60
    # waits an hour for GPUs, then runs again
    again = machine.admitted(REF, spec, moved, PLACED, "head-0", "fits", at(3660)).status
    running = step(spec, again, at(3690), attempt=view())
    assert running.status.phase == "Running" and running.wake_at == at(3700)
    assert step(spec, running.status, at(3700), attempt=view()).status.phase == "Failed"


def test_ttl_deletes_the_job_after_it_finished() -> None:
    spec = template(ttlSecondsAfterFinished=30)
    done = step(spec, admitted(spec), at(10), attempt=view("Complete", "SUCCEEDED")).status
    waiting = step(spec, done, at(20))
    assert not waiting.delete_job and waiting.wake_at == at(40)
    expired = step(spec, done, at(40))
    assert expired.delete_job
    assert [e.reason for e in expired.events] == ["Expired"]
    assert not step(template(), done, at(10_000)).delete_job  # no TTL: kept


def test_user_suspension_releases_the_gpus_and_resumption_queues_again() -> None:
    spec = template()
    running = step(spec, admitted(spec), at(5), attempt=view()).status
    suspended = step(template(suspend=True), running, at(20), attempt=view())
    assert suspended.status.phase == "Suspended" and suspended.released
    assert not suspended.wants_admission
    assert conditions(suspended.status)["Reconciling"][0] == "False"
    assert suspended.status.attempts == 1  # a template's RayJob is suspended in place
    resumed = step(spec, suspended.status, at(30))
    assert resumed.status.phase == "Queued" and resumed.wants_admission


def test_preemption_suspends_until_admitted_again_and_costs_no_retry() -> None:
    spec = template(maxRetries=0)
    running = step(spec, admitted(spec), at(5), attempt=view()).status
    hit = machine.preempted(REF, spec, running, "Job/team-a/urgent", "preempted by urgent", at(9))
    status = hit.status
    assert status.phase == "Suspended" and status.preempted_by == "Job/team-a/urgent"
    assert status.infrastructure_retries == 1 and status.failed_attempts == 0
    assert status.placements == [] and hit.released
    assert [e.reason for e in hit.events] == ["Preempted"]
    waiting = step(spec, status, at(10), attempt=view("Suspended", "", suspend=True))
    assert waiting.status.phase == "Suspended" and waiting.wants_admission
    back = machine.admitted(REF, spec, waiting.status, PLACED, "head-0", "fits", at(99))
    assert back.status.phase == "Admitted" and back.status.preempted_by is None
    assert [e.reason for e in back.events] == ["Resumed"]


def test_a_finished_attempt_beats_a_concurrent_preemption() -> None:
    spec = template()
    running = step(spec, admitted(spec), at(5), attempt=view()).status
    hit = machine.preempted(REF, spec, running, "Job/team-a/urgent", "preempted", at(9)).status
    done = step(spec, hit, at(10), attempt=view("Complete", "SUCCEEDED"))
    assert done.status.phase == "Succeeded"


def test_a_finished_job_stays_finished() -> None:
    spec = template()
    done = step(spec, admitted(spec), at(10), attempt=view("Complete", "SUCCEEDED")).status
    again = step(spec, done, at(20), attempt=view("Failed", "FAILED", "AppFailed"))
    assert again.status == done and not again.events


# --- on a referenced GPUCluster ------------------------------------------------------------------

READY = ClusterView("shared", "Ready", "shared")


def test_a_job_on_a_cluster_waits_for_it_to_be_ready() -> None:
    spec = on_cluster()
    waiting = step(spec, JobStatus(), cluster=ClusterView("shared", "Provisioning", None))
    assert waiting.status.phase == "Queued" and not waiting.wants_admission
    assert "Provisioning" in (waiting.status.message or "")
    missing = step(spec, JobStatus())
    assert "not found" in (missing.status.message or "")
    started = step(spec, waiting.status, at(5), cluster=READY)
    assert started.status.phase == "Admitted"
    assert started.status.active_since == at(5)
    assert started.status.ray_cluster_name == "shared"
    assert started.status.gpus == 0  # the GPUCluster holds (and meters) the GPUs


def test_a_job_on_a_cluster_follows_its_rayjob_and_the_cluster_migrating() -> None:
    spec = on_cluster()
    started = step(spec, JobStatus(), cluster=READY).status
    running = step(spec, started, at(5), cluster=READY, attempt=view(name="train"))
    assert running.status.phase == "Running"
    moving = ClusterView("shared", "Migrating", "shared")
    assert step(spec, running.status, at(6), cluster=moving, attempt=view()).status.phase == (
        "Migrating"
    )


def test_a_job_on_a_cluster_that_fails_while_the_cluster_is_not_ready_is_retried_free() -> None:
    spec = on_cluster(maxRetries=0)
    started = step(spec, JobStatus(), cluster=READY).status
    degraded = ClusterView("shared", "Degraded", "shared")
    after = step(
        spec, started, at(9), cluster=degraded, attempt=view("Failed", "FAILED", "AppFailed")
    )
    assert after.status.phase == "Queued"
    assert after.status.infrastructure_retries == 1 and after.status.attempts == 2
    assert after.stop_rayjob is None  # it finished by itself; history stays


def test_a_job_whose_cluster_disappears_stops_its_rayjob_and_waits() -> None:
    spec = on_cluster()
    started = step(spec, JobStatus(), cluster=READY).status
    after = step(spec, started, at(9), attempt=view())
    assert after.stop_rayjob == "train"
    assert after.status.phase == "Queued" and after.status.attempts == 2


def test_suspending_a_job_on_a_cluster_deletes_its_rayjob() -> None:
    started = step(on_cluster(), JobStatus(), cluster=READY).status
    after = step(on_cluster(suspend=True), started, at(9), cluster=READY, attempt=view())
    assert after.stop_rayjob == "train"
    assert after.status.phase == "Suspended" and after.status.attempts == 2
    back = step(on_cluster(), after.status, at(20), cluster=READY)
    assert back.status.phase == "Admitted" and back.status.ray_job_name == "train-a2"


def test_a_deadline_on_a_cluster_deletes_the_rayjob() -> None:
    spec = on_cluster(activeDeadlineSeconds=10)
    started = step(spec, JobStatus(), cluster=READY).status
    after = step(spec, started, at(10), cluster=READY, attempt=view())
    assert after.status.phase == "Failed" and after.stop_rayjob == "train"


def test_an_invalid_spec_stalls() -> None:
    status = machine.invalid(REF, JobStatus(), "spec.entrypoint: too short", T0)
    assert conditions(status)["Stalled"] == ("True", "InvalidSpec")
