"""The Job reconcile against a fake API: admission in queue order, quotas, preemption and
resumption, GPUs shared with GPUCluster placement, writes only on change, metering."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gpumesh.api.gpucluster import GPUClusterSpec
from gpumesh.api.patch import apply_merge_patch
from gpumesh.operator.jobs.metrics import UsageCounters
from gpumesh.operator.jobs.settings import JobSettings
from gpumesh.operator.placement import Assignment, NodeOffer, Preemption, Request, Running
from gpumesh.operator.placement.synthetic import make_offer
from gpumesh.operator.reconcile_job import JobReconciler, JobSnapshot, job_key
from gpumesh.operator.rejection import RETRY_AFTER, Rejected
from gpumesh.operator.world import ClusterKey, Holdings, trim_rayjob

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NS = "team-a"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class FakeApi:
    """Records writes and plays the index that reflects them (and KubeRay's statuses)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.rayjobs: dict[str, dict[str, Any]] = {}
        self.deleted: list[tuple[str, str]] = []
        self.applies: list[str] = []
        self.patches: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.gpuclusters: dict[ClusterKey, dict[str, Any]] = {}
        self.gpuquotas: list[dict[str, Any]] = []
        self.refuse: dict[str, Rejected] = {}
        """RayJobs whose apply the API server refuses, with its answer."""
        self.refused_applies: list[str] = []

    # Writer
    def apply_custom(
        self, group: str, version: str, plural: str, manifest: Mapping[str, Any]
    ) -> dict[str, Any]:
        assert plural == "rayjobs"
        name = manifest["metadata"]["name"]
        if name in self.refuse:
            self.refused_applies.append(name)
            raise self.refuse[name]
        old = self.rayjobs.get(name, {})
        self.rayjobs[name] = {**copy.deepcopy(dict(manifest)), "status": old.get("status", {})}
        self.applies.append(name)
        return self.rayjobs[name]

    def patch_status(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
    ) -> None:
        self.jobs[name]["status"] = apply_merge_patch(self.jobs[name].get("status", {}), status)
        self.patches.append(name)

    def delete_custom(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> None:
        self.deleted.append((plural, name))
        (self.jobs if plural == "jobs" else self.rayjobs).pop(name, None)

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((obj["metadata"]["name"], reason, message))

    # the world
    def create(self, name: str, spec: dict[str, Any], age_s: float = 0) -> dict[str, Any]:
        created = (T0 - timedelta(hours=1) + timedelta(seconds=age_s)).isoformat()
        self.jobs[name] = {
            "apiVersion": "gpumesh.io/v1alpha1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"uid-{name}",
                "generation": 1,
                "creationTimestamp": created,
            },
            "spec": {"entrypoint": "python train.py", **spec},
        }
        return self.jobs[name]

    def kuberay(self, rayjob: str, deployment: str, job_status: str = "", **more: str) -> None:
        self.rayjobs[rayjob]["status"] = {
            "jobDeploymentStatus": deployment,
            "jobStatus": job_status,
            **more,
        }

    def snapshot(self, offers: list[NodeOffer]) -> JobSnapshot:
        rayjobs: dict[ClusterKey, list[Any]] = {}
        for body in self.rayjobs.values():
            key = job_key(NS, body["metadata"]["labels"]["gpumesh.io/job"])
            rayjobs.setdefault(key, []).append(trim_rayjob(body))
        return JobSnapshot(
            jobs={job_key(NS, n): copy.deepcopy(b) for n, b in self.jobs.items()},
            rayjobs=rayjobs,
            gpuclusters=dict(self.gpuclusters),
            gpuquotas=list(self.gpuquotas),
            offers=offers,
            node_names=frozenset(o.name for o in offers),
        )


def mesh(*gpu_nodes: NodeOffer) -> list[NodeOffer]:
    head = make_offer("head-0", gpus_total=0, gpu_model="", head_capable=True)
    return [*gpu_nodes, head]


def template(gpus: int, replicas: int = 1, **fields: Any) -> dict[str, Any]:
    return {"clusterTemplate": {"workers": {"gpusPerWorker": gpus, "replicas": replicas}}, **fields}


class ResidentClusters:
    """GPUClusters in the shared queue, as the Job pass sees them: one resident cluster."""

    def __init__(self, node: str, gpus: int, priority: int) -> None:
        spec = GPUClusterSpec.model_validate(
            {"workers": {"gpusPerWorker": gpus, "replicas": 1}, "priority": priority}
        )
        held = Assignment("workers", node, 1, gpus, "acme", "eu-west", "A100", Decimal("1"))
        self.resident = Running("GPUCluster", NS, "resident", spec, T0, (held,), "head-0", priority)
        self.preempted: list[Preemption] = []

    def workloads(self, now: datetime) -> tuple[list[Request], list[Running]]:
        return [], [] if self.preempted else [self.resident]

    def take_back(self, preemptions: Sequence[Preemption], now: datetime) -> bool:
        self.preempted.extend(preemptions)
        return True

    def kick(self) -> None:
        pass


def setup(
    *offers: NodeOffer,
    holdings: Holdings | None = None,
    clusters: ResidentClusters | None = None,
) -> tuple[FakeApi, JobReconciler, list[NodeOffer], CollectorRegistry]:
    api = FakeApi()
    registry = CollectorRegistry()
    reconciler = reconciler_on(api, registry, holdings, clusters)
    return api, reconciler, mesh(*offers), registry


def reconciler_on(
    api: FakeApi,
    registry: CollectorRegistry,
    holdings: Holdings | None = None,
    clusters: ResidentClusters | None = None,
) -> JobReconciler:
    """A reconciler on ``api``; a second one stands for the operator after a restart."""
    return JobReconciler(
        api,
        api.post_event,
        holdings=holdings,
        clusters=clusters,
        counters=UsageCounters(registry),
        settings=JobSettings(meter_flush_seconds=60),
    )


def run(
    api: FakeApi, reconciler: JobReconciler, inventory: list[NodeOffer], name: str, now: datetime
) -> Any:
    return reconciler.reconcile(api.jobs[name], api.snapshot(inventory), now)


def status(api: FakeApi, name: str) -> dict[str, Any]:
    found: dict[str, Any] = api.jobs[name]["status"]
    return found


def suspended(api: FakeApi, rayjob: str) -> bool:
    return bool(api.rayjobs[rayjob]["spec"]["suspend"])


def reasons(api: FakeApi, name: str) -> list[str]:
    return [reason for who, reason, _ in api.events if who == name]


def test_a_job_that_fits_is_admitted_with_its_placed_rayjob_at_once() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4))
    api.create("train", template(2, replicas=2, checkpointUri="s3://b/ckpt"))
    outcome = run(api, reconciler, inventory, "train", T0)
    s = status(api, "train")
    assert s["phase"] == "Admitted" and s["attempts"] == 1 and s["rayJobName"] == "train"
    assert [(p["node"], p["workers"]) for p in s["placements"]] == [("node-a", 2)]
    assert s["headNode"] == "head-0" and s["gpus"] == 4
    rj = api.rayjobs["train"]
    assert rj["spec"]["suspend"] is False
    assert rj["metadata"]["annotations"]["gpumesh.io/applied-hash"]
    assert outcome.queue_moved
    assert reasons(api, "train") == ["Queued", "Admitted"]


def test_a_reconcile_that_changes_nothing_writes_nothing() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4))
    api.create("train", template(2))
    run(api, reconciler, inventory, "train", T0)
    api.applies.clear()
    api.patches.clear()
    run(api, reconciler, inventory, "train", at(1))
    assert api.applies == [] and api.patches == []
    # The index lagging behind our own writes must not undo them or write twice.
    stale = copy.deepcopy(api.jobs["train"])
    stale.pop("status")
    reconciler.reconcile(stale, api.snapshot(inventory), at(2))
    assert api.applies == [] and api.patches == []


def test_queue_order_is_priority_then_age_and_waiting_jobs_show_their_place() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4))
    api.create("holder", template(4, priority=100), age_s=0)  # not preemptable here
    run(api, reconciler, inventory, "holder", T0)
    api.create("old-low", template(4), age_s=1)
    api.create("young-high", template(4, priority=10), age_s=50)
    api.create("young-low", template(4), age_s=60)
    for name in ("young-low", "old-low", "young-high"):
        run(api, reconciler, inventory, name, at(1))
    positions = {n: status(api, n)["queuePosition"] for n in ("young-high", "old-low", "young-low")}
    assert positions == {"young-high": 0, "old-low": 1, "young-low": 2}
    assert all(status(api, n)["phase"] == "Queued" for n in positions)
    assert suspended(api, "old-low")  # created suspended

    api.kuberay("holder", "Complete", "SUCCEEDED")
    outcome = run(api, reconciler, inventory, "holder", at(100))
    assert outcome.queue_moved and status(api, "holder")["phase"] == "Succeeded"
    reconciler.reconcile_queue(api.snapshot(inventory), at(101))
    assert status(api, "young-high")["phase"] == "Admitted"
    assert not suspended(api, "young-high")
    assert status(api, "old-low")["queuePosition"] == 0
    assert status(api, "young-low")["queuePosition"] == 1


def test_a_namespace_quota_keeps_a_job_queued() -> None:
    clusters = ResidentClusters("node-b", gpus=2, priority=0)
    api, reconciler, inventory, _ = setup(
        make_offer("node-a", gpus_total=8), make_offer("node-b", gpus_total=2), clusters=clusters
    )
    api.gpuquotas.append(
        {
            "apiVersion": "gpumesh.io/v1alpha1",
            "kind": "GPUQuota",
            "metadata": {"name": "q", "namespace": NS},
            "spec": {"hard": {"gpus": 6}},
        }
    )
    api.create("big", template(8))
    api.create("fits", template(4))
    run(api, reconciler, inventory, "big", T0)
    run(api, reconciler, inventory, "fits", T0)
    assert status(api, "big")["phase"] == "Queued"
    stalled = {c["type"]: c for c in status(api, "big")["conditions"]}["Stalled"]
    assert stalled["status"] == "False"
    assert "GPUQuota" in status(api, "big")["message"]
    # the resident GPUCluster's 2 GPUs count against the namespace's 6
    assert "2 of 6 GPUs in use and this needs 8" in status(api, "big")["message"]
    assert status(api, "fits")["phase"] == "Admitted"


def test_preemption_suspends_the_lower_priority_job_and_resumes_it_later() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4))
    api.create("batch", template(4, priority=0))
    run(api, reconciler, inventory, "batch", T0)
    api.kuberay("batch", "Running", "RUNNING")
    run(api, reconciler, inventory, "batch", at(10))
    assert status(api, "batch")["phase"] == "Running"

    api.create("urgent", template(4, priority=100))
    run(api, reconciler, inventory, "urgent", at(20))
    victim = status(api, "batch")
    assert victim["phase"] == "Suspended"
    assert victim["preemptedBy"] == "Job/team-a/urgent"
    assert victim["infrastructureRetries"] == 1 and victim.get("failedAttempts", 0) == 0
    assert "placements" not in victim or victim["placements"] == []
    assert suspended(api, "batch")
    assert status(api, "urgent")["phase"] == "Admitted"
    assert "Preempted" in reasons(api, "batch")
    assert "Preempting" in reasons(api, "urgent")

    # KubeRay suspends the victim; the preemptor finishes; the victim comes back.
    api.kuberay("batch", "Suspended")
    run(api, reconciler, inventory, "batch", at(30))
    assert status(api, "batch")["phase"] == "Suspended"
    api.kuberay("urgent", "Complete", "SUCCEEDED")
    run(api, reconciler, inventory, "urgent", at(40))
    reconciler.reconcile_queue(api.snapshot(inventory), at(41))
    back = status(api, "batch")
    assert back["phase"] == "Admitted" and "preemptedBy" not in back
    assert not suspended(api, "batch")
    assert "Resumed" in reasons(api, "batch")
    assert back["attempts"] == 1  # the same RayJob, re-placed


def test_job_gpus_count_for_gpucluster_placement_through_the_shared_holdings() -> None:
    holdings = Holdings()
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4), holdings=holdings)
    api.create("train", template(3))
    run(api, reconciler, inventory, "train", T0)
    assert holdings.reserved(exclude=[ClusterKey(NS, "some-gpucluster")]) == {"node-a": 3}
    api.kuberay("train", "Complete", "SUCCEEDED")
    run(api, reconciler, inventory, "train", at(5))
    assert holdings.reserved(exclude=[ClusterKey(NS, "x")]) == {}


def test_gpucluster_gpus_are_not_given_to_a_job_of_the_same_priority() -> None:
    clusters = ResidentClusters("node-a", gpus=6, priority=0)
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=8), clusters=clusters)
    api.create("train", template(4))
    run(api, reconciler, inventory, "train", T0)
    assert status(api, "train")["phase"] == "Queued"
    assert clusters.preempted == []


def test_a_higher_priority_job_preempts_a_lower_priority_gpucluster() -> None:
    clusters = ResidentClusters("node-a", gpus=6, priority=0)
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=8), clusters=clusters)
    api.create("urgent", template(4, priority=100))
    run(api, reconciler, inventory, "urgent", T0)
    assert [p.victim.key for p in clusters.preempted] == [f"GPUCluster/{NS}/resident"]
    assert status(api, "urgent")["phase"] == "Admitted"


def test_a_program_failure_makes_a_new_suspended_rayjob_after_backoff() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4))
    api.create("train", template(4, maxRetries=1, retryBackoffSeconds=5))
    run(api, reconciler, inventory, "train", T0)
    api.kuberay("train", "Failed", "FAILED", reason="AppFailed", message="exit 1")
    outcome = run(api, reconciler, inventory, "train", at(10))
    s = status(api, "train")
    assert s["phase"] == "Queued" and s["attempts"] == 2 and s["failedAttempts"] == 1
    assert outcome.wake_at == at(15)
    assert suspended(api, "train-a2")
    assert "GPUMESH_ATTEMPT: '2'" in api.rayjobs["train-a2"]["spec"]["runtimeEnvYAML"]
    run(api, reconciler, inventory, "train", at(15))
    assert status(api, "train")["phase"] == "Admitted"
    assert not suspended(api, "train-a2")
    assert "train" in api.rayjobs  # the failed attempt stays for its history


def test_the_failover_grace_runs_on_across_an_operator_restart() -> None:
    api, reconciler, _, _ = setup()
    healthy = mesh(make_offer("node-a", gpus_total=4), make_offer("node-b", gpus_total=4))
    sick = mesh(
        make_offer("node-a", gpus_total=4, health="Unhealthy"), make_offer("node-b", gpus_total=4)
    )
    spec = template(4)
    spec["clusterTemplate"]["failover"] = {"unhealthyGraceSeconds": 30}
    api.create("train", spec)
    run(api, reconciler, healthy, "train", T0)
    (node,) = [p["node"] for p in status(api, "train")["placements"]]
    if node == "node-b":  # the test makes node-a the sick one
        sick = mesh(
            make_offer("node-a", gpus_total=4),
            make_offer("node-b", gpus_total=4, health="Unhealthy"),
        )
    api.kuberay("train", "Running", "RUNNING")
    run(api, reconciler, sick, "train", at(10))
    assert status(api, "train")["unhealthyNodes"] == [
        {"node": node, "since": at(10).isoformat().replace("+00:00", "Z")}
    ]
    restarted = reconciler_on(api, CollectorRegistry())
    run(api, restarted, sick, "train", at(25))
    assert status(api, "train")["phase"] == "Running", "still within the grace from 10 s"
    run(api, restarted, sick, "train", at(40))
    moved = status(api, "train")
    assert moved["infrastructureRetries"] == 1, "not a new grace from the restart"
    assert [p["node"] for p in moved["placements"]] != [node]
    assert moved["unhealthyNodes"] == []


def test_deadline_suspends_a_templates_rayjob() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4))
    api.create("train", template(4, activeDeadlineSeconds=30))
    assert run(api, reconciler, inventory, "train", T0).wake_at == at(30)
    api.kuberay("train", "Running", "RUNNING")
    run(api, reconciler, inventory, "train", at(30))
    assert status(api, "train")["phase"] == "Failed"
    assert suspended(api, "train")


def test_ttl_deletes_the_finished_job() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4))
    api.create("train", template(4, ttlSecondsAfterFinished=60))
    run(api, reconciler, inventory, "train", T0)
    api.kuberay("train", "Complete", "SUCCEEDED")
    assert run(api, reconciler, inventory, "train", at(10)).wake_at == at(70)
    run(api, reconciler, inventory, "train", at(70))
    assert ("jobs", "train") in api.deleted


def test_a_job_on_a_gpucluster_runs_once_it_is_ready_and_is_deleted_to_stop() -> None:
    api, reconciler, inventory, _ = setup()
    api.create("eval", {"clusterRef": {"name": "shared"}, "activeDeadlineSeconds": 60})
    run(api, reconciler, inventory, "eval", T0)
    assert status(api, "eval")["phase"] == "Queued" and "eval" not in api.rayjobs
    api.gpuclusters[ClusterKey(NS, "shared")] = {
        "metadata": {"name": "shared", "namespace": NS},
        "status": {"phase": "Ready", "rayClusterName": "shared"},
    }
    run(api, reconciler, inventory, "eval", at(5))
    assert api.rayjobs["eval"]["spec"]["clusterSelector"] == {"ray.io/cluster": "shared"}
    assert status(api, "eval")["phase"] == "Admitted"
    run(api, reconciler, inventory, "eval", at(65))
    assert status(api, "eval")["phase"] == "Failed"
    assert ("rayjobs", "eval") in api.deleted


def test_gpu_time_is_metered_into_status_and_counters() -> None:
    api, reconciler, inventory, registry = setup(
        make_offer("node-a", gpus_total=4, supplier="nordic", price_per_gpu_hour=Decimal("1.29"))
    )
    api.create("train", template(2, replicas=2))
    run(api, reconciler, inventory, "train", T0)
    run(api, reconciler, inventory, "train", at(600))
    assert status(api, "train").get("gpuSeconds", 0) == 0  # placed, not yet running
    api.kuberay("train", "Running", "RUNNING")
    run(api, reconciler, inventory, "train", at(600))
    run(api, reconciler, inventory, "train", at(4200))
    s = status(api, "train")
    assert s["gpuSeconds"] == 4 * 3600 and s["cost"] == "5.16"
    labels = {"namespace": NS, "kind": "Job", "name": "train", "node": "node-a"}
    assert registry.get_sample_value(
        "gpumesh_gpu_seconds_total", labels | {"supplier": "nordic"}
    ) == (4 * 3600)
    api.kuberay("train", "Complete", "SUCCEEDED")
    run(api, reconciler, inventory, "train", at(4230))
    s = status(api, "train")
    assert s["gpuSeconds"] == 4 * 3630 and s["cost"] == "5.203"
    assert s["phase"] == "Succeeded" and s.get("gpus", 0) == 0


def test_an_invalid_spec_is_reported_once() -> None:
    api, reconciler, inventory, _ = setup()
    api.create("bad", {"clusterRef": {"name": "x"}, "clusterTemplate": {"workers": {}}})
    run(api, reconciler, inventory, "bad", T0)
    run(api, reconciler, inventory, "bad", at(1))
    stalled = {c["type"]: c for c in status(api, "bad")["conditions"]}["Stalled"]
    assert stalled["reason"] == "InvalidSpec"
    assert reasons(api, "bad") == ["InvalidSpec"]


def test_reconciles_from_many_threads_never_give_a_gpu_twice() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=8))
    for i in range(12):
        api.create(f"j{i}", template(2), age_s=i)
    snap = api.snapshot(inventory)
    threads = [
        threading.Thread(target=reconciler.reconcile, args=(api.jobs[f"j{i}"], snap, T0))
        for i in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted = [n for n in api.jobs if status(api, n)["phase"] == "Admitted"]
    assert len(admitted) == 4


def test_a_refused_rayjob_stalls_the_job_once_and_frees_what_it_was_promised() -> None:
    holdings = Holdings()
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4), holdings=holdings)
    api.create("train", template(4))
    api.refuse["train"] = Rejected(
        422, "Invalid", 'RayJob.ray.io "train" is invalid: spec.entrypoint: Too long'
    )
    outcome = run(api, reconciler, inventory, "train", T0)

    stalled = next(c for c in status(api, "train")["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "RayJobRejected")
    assert "422 Invalid" in stalled["message"] and "spec.entrypoint: Too long" in stalled["message"]
    assert reasons(api, "train") == ["RayJobRejected"]
    assert outcome.wake_at == T0 + RETRY_AFTER
    assert holdings.reserved() == {}

    # Not tried again while the Job stays the same, whoever asks.
    for second in range(1, 30):
        run(api, reconciler, inventory, "train", at(second))
        reconciler.reconcile_queue(api.snapshot(inventory), at(second))
    assert api.refused_applies == ["train"]
    assert reasons(api, "train") == ["RayJobRejected"]

    # The GPUs are there for the next Job.
    api.create("next", template(4), age_s=10)
    run(api, reconciler, inventory, "next", at(31))
    assert status(api, "next")["phase"] == "Admitted"


def test_a_refused_rayjob_is_tried_again_after_the_pause() -> None:
    api, reconciler, inventory, _ = setup(make_offer("node-a", gpus_total=4))
    api.create("train", template(4))
    api.refuse["train"] = Rejected(403, "Forbidden", "denied by policy")
    run(api, reconciler, inventory, "train", T0)
    del api.refuse["train"]
    run(api, reconciler, inventory, "train", T0 + RETRY_AFTER)
    assert status(api, "train")["phase"] == "Admitted"
    assert api.rayjobs["train"]["spec"]["suspend"] is False


class SlowApi(FakeApi):
    """An API server that answers status writes only when told to (or fails them)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.answer = threading.Event()
        self.fail = False

    def patch_status(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
    ) -> None:
        self.writing.set()
        assert self.answer.wait(10)
        if self.fail:
            raise ConnectionError("API server went away")
        super().patch_status(group, version, plural, namespace, name, status)


def test_a_slow_status_write_holds_no_placement_lock() -> None:
    api = SlowApi()
    reconciler = reconciler_on(api, CollectorRegistry())
    inventory = mesh(make_offer("node-a", gpus_total=4))
    api.create("train", template(4))
    worker = threading.Thread(target=run, args=(api, reconciler, inventory, "train", T0))
    worker.start()
    try:
        assert api.writing.wait(10)
        # The write hangs; placement for everyone else goes on.
        assert reconciler.lock.acquire(timeout=2)
        reconciler.lock.release()
    finally:
        api.answer.set()
        worker.join(10)
    assert status(api, "train")["phase"] == "Admitted"


def test_a_failed_status_write_is_not_taken_for_written() -> None:
    api = SlowApi()
    api.answer.set()
    reconciler = reconciler_on(api, CollectorRegistry())
    inventory = mesh(make_offer("node-a", gpus_total=4))
    api.create("train", template(4))
    api.fail = True
    with pytest.raises(ConnectionError):
        run(api, reconciler, inventory, "train", T0)
    api.fail = False
    run(api, reconciler, inventory, "train", at(1))
    # Started again from the API's status (none), not from the unwritten one: the whole
    # status is written, phase included.
    assert status(api, "train")["phase"] == "Admitted"
    assert api.patches == ["train"]
