"""GPUCluster reconcile and admission queue against a fake API that plays the indexes.

The fake applies what the reconciler writes to in-memory objects and shows them back as
the kopf indexes would (trimmed RayClusters, GPUCluster bodies with their status), so the
tests follow the same round trips as the operator: create, pass, reconcile, KubeRay.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from gpumesh.api.patch import apply_merge_patch
from gpumesh.operator.jobs.metrics import UsageCounters
from gpumesh.operator.placement import InventoryIndex, NodeOffer
from gpumesh.operator.placement.synthetic import make_offer
from gpumesh.operator.progress import ProgressLine
from gpumesh.operator.reconcile_gpucluster import Reconciler
from gpumesh.operator.rejection import RETRY_AFTER, Rejected
from gpumesh.operator.world import ClusterKey, trim_raycluster

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NS = "team-a"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class FakeApi:
    """Writer and world at once: writes land in dicts the world then reads."""

    def __init__(self, offers: Sequence[NodeOffer]) -> None:
        self.set_offers(*offers)
        self.clusters: dict[str, dict[str, Any]] = {}
        self.rayclusters: dict[str, dict[str, Any]] = {}
        self.quotas: dict[str, dict[str, Any]] = {}
        self.foreign: set[str] = set()
        self.applies: list[str] = []
        self.status_patches: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.woken: list[ClusterKey] = []
        self.later: list[tuple[ClusterKey, float]] = []
        self.clock = 0.0
        self.passes_requested: list[float] = []
        self.live_pods: dict[str, list[dict[str, Any]]] = {}
        self.pod_lists: list[ClusterKey] = []
        self.refuse: dict[str, Rejected] = {}
        """RayClusters whose apply the API server refuses, with its answer."""
        self.refused_applies: list[str] = []

    def set_offers(self, *offers: NodeOffer) -> None:
        """The supply placement sees from now on, with the head node always in it."""
        head = make_offer("head-0", gpus_total=0, gpu_model="", head_capable=True)
        self.index = InventoryIndex([*offers, head])

    # Writer
    def apply_custom(
        self, group: str, version: str, plural: str, manifest: Mapping[str, Any]
    ) -> dict[str, Any]:
        assert plural == "rayclusters"
        name = manifest["metadata"]["name"]
        if name in self.refuse:
            self.refused_applies.append(name)
            raise self.refuse[name]
        old = self.rayclusters.get(name, {})
        self.rayclusters[name] = {**copy.deepcopy(dict(manifest)), "status": old.get("status", {})}
        self.applies.append(name)
        return {
            **self.rayclusters[name],
            "metadata": {"resourceVersion": f"rc-{len(self.applies)}"},
        }

    def wake(self, key: ClusterKey, after: float) -> None:
        (self.woken.append(key) if after <= 0 else self.later.append((key, after)))

    def patch_status(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
    ) -> str | None:
        target = self.quotas if plural == "gpuquotas" else self.clusters
        target[name]["status"] = apply_merge_patch(target[name].get("status", {}), status)
        if plural == "gpuclusters":
            self.status_patches.append(name)
        return f"v-{len(self.status_patches)}"

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((obj["metadata"]["name"], reason, message))

    # ClusterWorld
    def gpucluster(self, key: ClusterKey) -> dict[str, Any] | None:
        found = self.clusters.get(key.name)
        return copy.deepcopy(found) if found is not None else None

    def gpuclusters(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(c) for c in self.clusters.values()]

    def raycluster(self, key: ClusterKey) -> dict[str, Any] | None:
        found = self.rayclusters.get(key.name)
        return trim_raycluster(found) if found is not None else None

    def pods(self, key: ClusterKey) -> list[dict[str, Any]]:
        self.pod_lists.append(key)
        return self.live_pods.get(key.name, [])

    def foreign_raycluster(self, key: ClusterKey) -> bool:
        return key.name in self.foreign

    def offers(self) -> InventoryIndex:
        return self.index

    def gpuquotas(self) -> list[dict[str, Any]]:
        return list(self.quotas.values())

    # the renter and KubeRay
    def create(
        self, name: str, replicas: int, gpus: int = 8, age_s: float = 0, **spec: Any
    ) -> None:
        self.clusters[name] = {
            "apiVersion": "gpumesh.io/v1alpha1",
            "kind": "GPUCluster",
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"uid-{name}",
                "generation": 1,
                "creationTimestamp": (T0 - timedelta(hours=1, seconds=-age_s)).isoformat(),
            },
            "spec": {"workers": {"gpusPerWorker": gpus, "replicas": replicas}, **spec},
        }

    def edit(self, name: str, **workers: Any) -> None:
        self.clusters[name]["spec"]["workers"].update(workers)
        self.clusters[name]["metadata"]["generation"] += 1

    def quota(self, gpus: int) -> None:
        self.quotas["q"] = {
            "apiVersion": "gpumesh.io/v1alpha1",
            "kind": "GPUQuota",
            "metadata": {"name": "q", "namespace": NS, "generation": 1},
            "spec": {"hard": {"gpus": gpus}},
        }

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.clusters[name].get("status", {})
        return status

    def stalled(self, name: str) -> dict[str, Any]:
        return next(c for c in self.status(name)["conditions"] if c["type"] == "Stalled")

    def replicas_by_node(self, name: str) -> dict[str, int]:
        """Every worker group's replicas by its pinned node, groups at zero included."""
        groups = self.rayclusters[name]["spec"]["workerGroupSpecs"]
        return {
            g["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"]: g["replicas"]
            for g in groups
        }

    def workers_by_node(self, name: str) -> dict[str, int]:
        return {node: n for node, n in self.replicas_by_node(name).items() if n}


def setup(*offers: NodeOffer, status_interval: float = 0.0) -> tuple[FakeApi, Reconciler]:
    api = FakeApi(offers)
    return api, reconciler_for(api, status_interval)


def reconciler_for(
    api: FakeApi, status_interval: float = 0.0, progress: ProgressLine[ClusterKey] | None = None
) -> Reconciler:
    """A reconciler on ``api``; a second one stands for the operator after a restart."""
    return Reconciler(
        api,
        api.post_event,
        api,
        wake=api.wake,
        request_pass=api.passes_requested.append,
        counters=UsageCounters(CollectorRegistry()),
        status_interval=status_interval,
        progress=progress,
        clock=lambda: api.clock,
    )


def settle(api: FakeApi, reconciler: Reconciler, now: datetime = T0) -> None:
    """What the work queue does: a pass, then every reconcile it asked for."""
    reconciler.admission_pass(now)
    while api.woken:
        reconciler.reconcile(api.woken.pop(0), now)


def test_a_new_cluster_waits_for_the_queue_then_gets_one_group_per_node() -> None:
    api, reconciler = setup(make_offer("n1"), make_offer("n2"))
    api.create("train", replicas=2)
    reconciler.reconcile(ClusterKey(NS, "train"), T0)
    assert api.rayclusters == {} and api.passes_requested == [0]
    assert api.status("train") == {}  # its first status waits for the queue's word

    settle(api, reconciler)
    assert api.workers_by_node("train") == {"n1": 1, "n2": 1}
    status = api.status("train")
    assert status["phase"] == "Provisioning" and status["gpus"] == 16
    assert status["rayClusterName"] == "train"  # in the same write as the placements
    assert ("train", "Placed", "2 workers on n1(1), n2(1)") in api.events


def test_nothing_is_written_when_nothing_changed() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("train", replicas=1)
    reconciler.reconcile(ClusterKey(NS, "train"), T0)
    settle(api, reconciler)
    reconciler.reconcile(ClusterKey(NS, "train"), at(1))  # the RayCluster shows up
    applies, patches = len(api.applies), len(api.status_patches)
    for _ in range(3):
        reconciler.reconcile(ClusterKey(NS, "train"), at(1))
    assert (len(api.applies), len(api.status_patches)) == (applies, patches)


def test_one_pass_admits_a_burst_without_booking_a_gpu_twice() -> None:
    api, reconciler = setup(*(make_offer(f"n{i}") for i in range(3)))
    for i in range(5):
        api.create(f"c{i}", replicas=1, age_s=i)
    reconciler.admission_pass(T0)
    assert len(api.woken) == 5  # 3 admitted, 2 told they wait
    settle(api, reconciler)
    placed = [api.workers_by_node(f"c{i}") for i in range(5) if f"c{i}" in api.rayclusters]
    assert len(placed) == 3
    assert sorted(node for p in placed for node in p) == ["n0", "n1", "n2"]
    assert api.status("c3")["phase"] == "Pending"
    assert api.stalled("c3")["reason"] == "Unschedulable"
    assert api.status("c4")["queuePosition"] == 1


def test_higher_priority_goes_first_whatever_the_age() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("old-low", replicas=1, age_s=0)
    api.create("young-high", replicas=1, age_s=60, priority=10, preemptionPolicy="Never")
    settle(api, reconciler)
    assert "young-high" in api.rayclusters and "old-low" not in api.rayclusters


def test_a_namespace_quota_keeps_a_cluster_queued_and_reports_its_use() -> None:
    api, reconciler = setup(make_offer("n1"), make_offer("n2"))
    api.quota(gpus=8)
    api.create("first", replicas=1, age_s=0)
    api.create("second", replicas=1, age_s=1)
    settle(api, reconciler)
    assert "first" in api.rayclusters and "second" not in api.rayclusters
    assert api.stalled("second")["reason"] == "QuotaExceeded"
    assert "GPUQuota" in api.stalled("second")["message"]
    quota = api.quotas["q"]["status"]
    assert quota["used"]["gpus"] == 8 and quota["admitted"] == 1 and quota["waiting"] == 1
    exhausted = next(c for c in quota["conditions"] if c["type"] == "Exhausted")
    assert exhausted["status"] == "True"


def test_a_higher_priority_cluster_preempts_and_the_victim_waits_with_its_head() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("batch", replicas=1)
    settle(api, reconciler)
    assert api.workers_by_node("batch") == {"n1": 1}

    api.create("urgent", replicas=1, priority=100)
    settle(api, reconciler, at(10))
    assert api.workers_by_node("batch") == {}  # scaled to zero before urgent was booked
    assert api.applies.index("urgent") > len(api.applies) - 3
    assert api.workers_by_node("urgent") == {"n1": 1}
    assert api.stalled("batch")["reason"] == "Preempted"
    assert api.status("batch")["phase"] == "Pending"
    settle(api, reconciler, at(11))  # later passes still say why it waits
    assert api.stalled("batch")["reason"] == "Preempted"
    assert api.stalled("batch")["message"].startswith("preempted by GPUCluster team-a/urgent")
    head = api.rayclusters["batch"]["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"]["kubernetes.io/hostname"] == "head-0"
    assert ("batch", "Preempted") in {(n, r) for n, r, _ in api.events}
    assert ("urgent", "Preempting") in {(n, r) for n, r, _ in api.events}

    # urgent goes: batch gets its GPUs back on the next pass
    del api.clusters["urgent"]
    reconciler.reconcile(ClusterKey(NS, "urgent"), at(20))
    settle(api, reconciler, at(21))
    assert api.workers_by_node("batch") == {"n1": 1}


def test_scaling_down_needs_no_queue_and_keeps_the_rest_in_place() -> None:
    api, reconciler = setup(make_offer("n1"), make_offer("n2"), make_offer("n3"))
    api.create("train", replicas=3)
    settle(api, reconciler)
    before = api.workers_by_node("train")
    api.passes_requested.clear()
    api.edit("train", replicas=2)
    reconciler.reconcile(ClusterKey(NS, "train"), at(5))
    after = api.workers_by_node("train")
    assert api.passes_requested == []
    assert sum(after.values()) == 2
    assert all(before[node] >= n for node, n in after.items())


def test_pods_are_listed_only_while_a_group_leaves_and_it_stays_at_zero_until_they_go() -> None:
    api, reconciler = setup(make_offer("n1"), make_offer("n2"))
    api.create("train", replicas=2)
    settle(api, reconciler)
    key = ClusterKey(NS, "train")
    reconciler.reconcile(key, at(5))
    assert api.pod_lists == [], "a steady single-group cluster needs no pod list"
    labels = {"gpumesh.io/cluster": "train", "gpumesh.io/group": "workers"}
    api.live_pods["train"] = [
        {"metadata": {"labels": {**labels, "gpumesh.io/node": n}}, "spec": {}} for n in ("n1", "n2")
    ]
    api.edit("train", replicas=1)
    reconciler.reconcile(key, at(6))
    assert api.pod_lists == [key]
    assert sorted(api.replicas_by_node("train").values()) == [0, 1], "left at zero, pod alive"
    api.live_pods["train"] = []
    reconciler.reconcile(key, at(7))
    assert list(api.replicas_by_node("train").values()) == [1], "dropped once its pod is gone"


def test_scaling_up_waits_for_the_queue_and_keeps_running_workers() -> None:
    api, reconciler = setup(make_offer("n1"), make_offer("n2"))
    api.create("train", replicas=1)
    settle(api, reconciler)
    first = api.workers_by_node("train")
    api.edit("train", replicas=2)
    reconciler.reconcile(ClusterKey(NS, "train"), at(5))
    assert api.workers_by_node("train") == first and api.passes_requested[-1] == 0
    settle(api, reconciler, at(6))
    assert sum(api.workers_by_node("train").values()) == 2
    assert all(api.workers_by_node("train")[node] >= n for node, n in first.items())


def test_a_restarted_operator_adopts_what_the_rayclusters_hold() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("resident", replicas=1)
    settle(api, reconciler)
    applies = len(api.applies)

    fresh = reconciler_for(api)
    api.create("newcomer", replicas=1)
    settle(api, fresh)
    fresh.reconcile(ClusterKey(NS, "resident"), at(5))
    assert len(api.applies) == applies  # nothing re-applied, nothing double-booked
    assert "newcomer" not in api.rayclusters
    assert api.stalled("newcomer")["reason"] == "Unschedulable"


def test_deleting_a_cluster_frees_its_gpus_for_the_next_one() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("first", replicas=1)
    api.create("second", replicas=1, age_s=5)
    settle(api, reconciler)
    assert "second" not in api.rayclusters
    del api.clusters["first"]
    api.passes_requested.clear()
    reconciler.reconcile(ClusterKey(NS, "first"), at(10))
    assert api.passes_requested == [0]
    settle(api, reconciler, at(11))
    assert api.workers_by_node("second") == {"n1": 1}


class CountingJobs:
    """The Job side of the queue, counting the passes it is asked for."""

    def __init__(self) -> None:
        self.kicks = 0

    def workloads(self, now: datetime) -> tuple[list[Any], list[Any]]:
        return [], []

    def take_back(self, preemptions: Sequence[Any], now: datetime) -> bool:
        return True

    def kick(self) -> None:
        self.kicks += 1


def test_gpus_given_back_give_waiting_gpuclusters_and_jobs_a_pass() -> None:
    api, reconciler = setup(make_offer("n1"))
    jobs = CountingJobs()
    reconciler.jobs = jobs
    reconciler.gpus_given_back()
    assert api.passes_requested == [0] and jobs.kicks == 1


def test_a_victim_mid_reconcile_is_not_preempted_under_it_the_pass_tries_again() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("batch", replicas=1)
    settle(api, reconciler)
    api.create("urgent", replicas=1, priority=100)
    api.passes_requested.clear()
    victim = reconciler._key_lock(ClusterKey(NS, "batch"))
    with victim:  # batch's own reconcile is applying what it decided before this pass
        reconciler.admission_pass(at(5))
    assert api.workers_by_node("batch") == {"n1": 1}
    assert "urgent" not in api.rayclusters
    assert api.passes_requested == [0]  # soon, not at the next resync
    settle(api, reconciler, at(6))
    assert api.workers_by_node("urgent") == {"n1": 1}
    assert api.workers_by_node("batch") == {}


def kuberay_reports(api: FakeApi, name: str, ready_workers: int, head_ready: bool) -> None:
    api.rayclusters[name]["status"] = {
        "readyWorkerReplicas": ready_workers,
        "conditions": [{"type": "HeadPodReady", "status": "True" if head_ready else "False"}],
        "head": {"serviceName": f"{name}-head-svc"},
    }


def test_progress_within_a_phase_is_written_at_most_once_per_interval() -> None:
    api, reconciler = setup(make_offer("n1"), make_offer("n2"), status_interval=2.0)
    api.create("train", replicas=2)
    settle(api, reconciler)
    key = ClusterKey(NS, "train")
    reconciler.reconcile(key, at(0.1))
    written = len(api.status_patches)

    api.clock = 0.5
    kuberay_reports(api, "train", ready_workers=1, head_ready=True)
    reconciler.reconcile(key, at(0.5))
    assert len(api.status_patches) == written  # still Provisioning: put off
    assert api.later == [(key, 1.5)]  # and looked at again once the interval is over

    api.clock = 0.8
    kuberay_reports(api, "train", ready_workers=2, head_ready=True)
    reconciler.reconcile(key, at(0.8))
    assert len(api.status_patches) == written + 1  # Ready: a phase change goes at once
    assert api.status("train")["phase"] == "Ready"


def test_under_a_burst_progress_waits_its_turn_and_ready_clusters_write_once() -> None:
    api = FakeApi([make_offer(f"n{i}") for i in range(4)])
    line: ProgressLine[ClusterKey] = ProgressLine(rate=1, burst=1, clock=lambda: api.clock)
    reconciler = reconciler_for(api, progress=line)
    for i in range(4):
        api.create(f"c{i}", replicas=1, age_s=i)
    settle(api, reconciler)
    assert sorted(api.rayclusters) == ["c0", "c1", "c2", "c3"]  # placed and applied at once
    assert api.status_patches == ["c0"]  # the rest of the Provisioning writes wait
    assert ("c1", "Placed", "1 workers on n1(1)") in api.events  # the event tells at once
    assert api.clusters["c1"].get("status") is None

    kuberay_reports(api, "c1", ready_workers=1, head_ready=True)
    reconciler.reconcile(ClusterKey(NS, "c1"), at(0.5))
    assert api.status("c1")["phase"] == "Ready"  # a phase someone waits on: at once
    assert api.status_patches == ["c0", "c1"]

    api.clock = 1.0
    turns, _ = line.serve()
    assert turns == [ClusterKey(NS, "c2")]  # c1 left the line when it became Ready
    reconciler.reconcile(turns[0], at(1))
    assert api.status("c2")["phase"] == "Provisioning"
    assert api.status("c2")["placements"][0]["node"] == "n2"
    assert api.status_patches == ["c0", "c1", "c2"]


def test_the_echo_of_our_own_writes_is_recognised() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("train", replicas=1)
    settle(api, reconciler)
    key = ClusterKey(NS, "train")
    assert reconciler.is_own_write(key, f"v-{len(api.status_patches)}", raycluster=False)
    assert reconciler.is_own_write(key, f"rc-{len(api.applies)}", raycluster=True)
    assert not reconciler.is_own_write(key, "someone-else", raycluster=False)
    assert not reconciler.is_own_write(key, None, raycluster=True)


def test_a_raycluster_someone_else_manages_is_never_taken_over() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.foreign.add("train")
    api.create("train", replicas=1)
    settle(api, reconciler)
    assert api.applies == []
    assert api.stalled("train")["reason"] == "ForeignRayCluster"
    assert "not managed by gpumesh" in api.stalled("train")["message"]
    assert reconciler.holdings.reserved() == {}  # nothing stays booked for it
    api.foreign.clear()  # its owner deleted it: the next look places the cluster
    reconciler.reconcile(ClusterKey(NS, "train"), at(30))
    settle(api, reconciler, at(31))
    assert api.workers_by_node("train") == {"n1": 1}


def test_a_deleted_cluster_is_forgotten_once_and_asks_for_nothing_more() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("train", replicas=1)
    settle(api, reconciler)
    del api.clusters["train"]
    api.passes_requested.clear()
    assert reconciler.reconcile(ClusterKey(NS, "train"), at(5)) is False
    assert api.passes_requested == [0]  # its GPUs are free: the queue looks once
    assert reconciler.reconcile(ClusterKey(NS, "train"), at(35)) is False
    assert api.passes_requested == [0]  # and never again for a cluster that is gone


def test_a_jobs_admission_does_not_hide_a_new_cluster_from_its_own_pass() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("train", replicas=1)
    reconciler.workloads(T0)  # a Job's admission looks at every GPUCluster first
    reconciler.reconcile(ClusterKey(NS, "train"), T0)
    assert api.passes_requested == [0]


def test_a_cluster_the_pass_leaves_out_keeps_its_gpus() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("old", replicas=1)
    settle(api, reconciler)
    api.clusters["old"]["spec"]["workers"]["replicas"] = "many"  # no longer parses
    api.create("new", replicas=1, age_s=5)
    settle(api, reconciler, at(5))
    assert "new" not in api.rayclusters  # old's RayCluster still holds n1's GPUs


def test_a_cluster_created_again_under_its_name_starts_from_nothing() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("train", replicas=1)
    settle(api, reconciler)
    api.create("waiting", replicas=1, age_s=1)
    settle(api, reconciler, at(1))
    # train is deleted and created again before the operator saw the deletion
    api.create("train", replicas=1, age_s=10)
    api.clusters["train"]["metadata"]["uid"] = "uid-train-2"
    api.rayclusters["train"]["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:05Z"
    reconciler.reconcile(ClusterKey(NS, "train"), at(10))
    settle(api, reconciler, at(11))
    # the old booking went to the one waiting first; the new train waits its turn
    assert api.workers_by_node("waiting") == {"n1": 1}
    assert api.status("train")["phase"] == "Pending"


def test_a_victim_whose_scale_down_fails_is_not_booked_as_empty() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("batch", replicas=1)
    settle(api, reconciler)
    api.create("urgent", replicas=1, priority=100)
    failing = api.apply_custom

    def refuse(group: str, version: str, plural: str, manifest: Any) -> dict[str, Any]:
        if manifest["metadata"]["name"] == "batch":
            raise ApiException(status=500, reason="etcd is unhappy")
        return failing(group, version, plural, manifest)

    api.apply_custom = refuse  # type: ignore[method-assign]
    reconciler.admission_pass(at(5))
    assert "urgent" not in api.rayclusters
    assert reconciler.holdings.reserved() == {"n1": 8}  # batch still holds its GPUs
    api.apply_custom = failing  # type: ignore[method-assign]
    settle(api, reconciler, at(6))
    assert api.workers_by_node("urgent") == {"n1": 1}
    assert api.workers_by_node("batch") == {}


def test_suspending_clears_a_preemption_notice() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("batch", replicas=1)
    settle(api, reconciler)
    api.create("urgent", replicas=1, priority=100)
    settle(api, reconciler, at(5))
    assert api.stalled("batch")["reason"] == "Preempted"
    api.clusters["batch"]["spec"]["suspend"] = True
    api.clusters["batch"]["metadata"]["generation"] += 1
    reconciler.reconcile(ClusterKey(NS, "batch"), at(10))
    assert api.status("batch")["phase"] == "Suspended"
    assert api.stalled("batch")["status"] == "False"


def test_a_cluster_waiting_to_grow_still_leaves_a_lost_node() -> None:
    api, reconciler = setup(make_offer("n1"), make_offer("n2"))
    api.create("train", replicas=1)
    settle(api, reconciler)
    (first,) = api.workers_by_node("train")
    api.edit("train", replicas=3)  # two nodes of 8 GPUs: the third worker cannot fit
    reconciler.reconcile(ClusterKey(NS, "train"), at(5))
    settle(api, reconciler, at(6))
    assert api.workers_by_node("train") == {first: 1}
    other = "n2" if first == "n1" else "n1"
    api.set_offers(make_offer(first, health="Lost"), make_offer(other))
    reconciler.reconcile(ClusterKey(NS, "train"), at(10))
    assert api.workers_by_node("train") == {other: 1}  # moved while the growth still waits
    assert api.status("train")["phase"] != "Ready"
    assert api.stalled("train")["status"] == "True"


def one_worker_on_two_nodes(
    failover: dict[str, int],
) -> tuple[FakeApi, Reconciler, str, str]:
    """A one-worker cluster placed on n1 or n2: (api, reconciler, its node, the other)."""
    api, reconciler = setup(make_offer("n1"), make_offer("n2"))
    api.create("train", replicas=1, failover=failover)
    settle(api, reconciler)
    (first,) = api.workers_by_node("train")
    return api, reconciler, first, "n2" if first == "n1" else "n1"


def test_workers_wait_out_the_grace_period_on_an_unhealthy_node_then_move_once() -> None:
    api, reconciler, first, other = one_worker_on_two_nodes({"unhealthyGraceSeconds": 30})
    api.set_offers(make_offer(first, health="Unhealthy"), make_offer(other))
    key = ClusterKey(NS, "train")
    api.later.clear()
    reconciler.reconcile(key, at(10))
    assert api.workers_by_node("train") == {first: 1}, "within the grace period it stays"
    assert (key, 30.0) in api.later, "and the reconcile comes back when the grace ends"
    reconciler.reconcile(key, at(39))
    assert api.workers_by_node("train") == {first: 1}
    reconciler.reconcile(key, at(40))
    assert api.workers_by_node("train") == {other: 1}
    assert api.status("train")["migrations"] == 1
    reconciler.reconcile(key, at(41))
    assert api.status("train")["migrations"] == 1, "one move counts once"


def test_the_grace_period_runs_on_across_an_operator_restart() -> None:
    api, reconciler, first, other = one_worker_on_two_nodes({"unhealthyGraceSeconds": 30})
    api.set_offers(make_offer(first, health="Unhealthy"), make_offer(other))
    key = ClusterKey(NS, "train")
    reconciler.reconcile(key, at(10))
    assert api.status("train")["unhealthyNodes"] == [
        {"node": first, "since": at(10).isoformat().replace("+00:00", "Z")}
    ]
    restarted = reconciler_for(api)
    settle(api, restarted, at(25))
    assert api.workers_by_node("train") == {first: 1}, "still within the grace from 10 s"
    restarted.reconcile(key, at(40))
    assert api.workers_by_node("train") == {other: 1}, "not a new grace from the restart"
    assert api.status("train")["unhealthyNodes"] == []


def test_a_node_that_recovers_within_the_grace_period_keeps_its_workers() -> None:
    api, reconciler, first, other = one_worker_on_two_nodes({"unhealthyGraceSeconds": 30})
    key = ClusterKey(NS, "train")
    api.set_offers(make_offer(first, health="Unhealthy"), make_offer(other))
    reconciler.reconcile(key, at(10))
    api.set_offers(make_offer(first), make_offer(other))
    reconciler.reconcile(key, at(20))
    assert api.status("train")["unhealthyNodes"] == []
    api.set_offers(make_offer(first, health="Unhealthy"), make_offer(other))
    reconciler.reconcile(key, at(45))  # unhealthy again: the grace starts over
    assert api.workers_by_node("train") == {first: 1}
    assert api.status("train").get("migrations", 0) == 0


def test_after_max_migrations_the_workers_stay_and_the_cluster_says_why() -> None:
    failover = {"unhealthyGraceSeconds": 0, "maxMigrations": 1}
    api, reconciler, first, other = one_worker_on_two_nodes(failover)
    key = ClusterKey(NS, "train")
    api.set_offers(make_offer(first, health="Unhealthy"), make_offer(other))
    reconciler.reconcile(key, at(10))
    assert api.workers_by_node("train") == {other: 1}
    api.set_offers(make_offer(first), make_offer(other, health="Unhealthy"))
    reconciler.reconcile(key, at(20))
    assert api.workers_by_node("train") == {other: 1}
    stalled = api.stalled("train")
    assert stalled["status"] == "True" and stalled["reason"] == "MigrationLimit"
    assert "maxMigrations (1)" in stalled["message"]


DENIED = Rejected(
    403,
    "Forbidden",
    'admission webhook "images.policy.example" denied the request: registry not allowed',
)


def test_a_refused_raycluster_stalls_the_cluster_once_and_gives_its_gpus_back() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("train", replicas=1)
    api.refuse["train"] = DENIED
    settle(api, reconciler)

    stalled = api.stalled("train")
    assert stalled["status"] == "True"
    assert stalled["reason"] == "RayClusterRejected"
    assert "403 Forbidden" in stalled["message"] and "registry not allowed" in stalled["message"]
    assert [e[1] for e in api.events] == ["RayClusterRejected"]
    assert api.status("train")["gpus"] == 0 and api.status("train")["phase"] == "Pending"

    # Nothing is tried again while nothing changed: not by reconciles, not by passes.
    for second in range(1, 60):
        settle(api, reconciler, at(second))
        reconciler.reconcile(ClusterKey(NS, "train"), at(second))
    assert api.refused_applies == ["train"]
    assert [e[1] for e in api.events] == ["RayClusterRejected"]

    # The GPUs it was promised went back: another cluster gets them.
    api.create("other", replicas=1)
    settle(api, reconciler, at(61))
    assert api.workers_by_node("other") == {"n1": 1}


def test_a_refused_cluster_tries_again_when_its_spec_changes() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("train", replicas=1)
    api.refuse["train"] = DENIED
    settle(api, reconciler)
    del api.refuse["train"]  # the renter fixed what the policy objected to

    api.edit("train", replicas=1, cpuPerWorker="8")
    reconciler.reconcile(ClusterKey(NS, "train"), at(5))
    settle(api, reconciler, at(5))
    assert api.workers_by_node("train") == {"n1": 1}
    assert api.stalled("train")["status"] == "False"


def test_a_refused_cluster_tries_again_after_a_long_pause() -> None:
    api, reconciler = setup(make_offer("n1"))
    api.create("train", replicas=1)
    api.refuse["train"] = DENIED
    settle(api, reconciler)
    assert (ClusterKey(NS, "train"), RETRY_AFTER.total_seconds()) in api.later
    del api.refuse["train"]  # the cluster's policy was relaxed

    later = T0 + RETRY_AFTER
    reconciler.reconcile(ClusterKey(NS, "train"), later)
    settle(api, reconciler, later)
    assert api.workers_by_node("train") == {"n1": 1}


def placement_terms(api: FakeApi, name: str) -> set[tuple[str, str, str, int]]:
    return {
        (p["node"], p["supplier"], p["pricePerGpuHour"], p["workers"])
        for p in api.status(name)["placements"]
    }


def test_workers_keep_the_terms_they_were_placed_on_whatever_the_gpunode_says_later() -> None:
    """A supplier raising its price, or its GPUNode naming another supplier, changes what
    new placements see; workers already there keep their price and their earner, when
    more join them and after an operator restart."""
    api, reconciler = setup(make_offer("n1", price_per_gpu_hour=Decimal("2.00")))
    api.create("train", replicas=1, gpus=2)
    settle(api, reconciler)
    assert placement_terms(api, "train") == {("n1", "acme", "2.00", 1)}

    api.set_offers(make_offer("n1", price_per_gpu_hour=Decimal("9.00"), supplier="rival"))
    api.edit("train", replicas=2)  # one more worker on the same node
    reconciler.reconcile(ClusterKey(NS, "train"), at(5))
    settle(api, reconciler, at(5))
    assert placement_terms(api, "train") == {("n1", "acme", "2.00", 2)}
    assert api.status("train")["pricePerHour"] == "8.00"

    restarted = reconciler_for(api)
    restarted.reconcile(ClusterKey(NS, "train"), at(10))
    assert placement_terms(api, "train") == {("n1", "acme", "2.00", 2)}


def test_new_nodes_are_placed_on_their_terms_of_the_day() -> None:
    api, reconciler = setup(make_offer("n1", gpus_total=2), make_offer("n2"))
    api.create("train", replicas=1, gpus=2)
    settle(api, reconciler)
    api.set_offers(
        make_offer("n1", gpus_total=2), make_offer("n2", price_per_gpu_hour=Decimal("3.00"))
    )
    api.edit("train", replicas=2)
    reconciler.reconcile(ClusterKey(NS, "train"), at(5))
    settle(api, reconciler, at(5))
    assert placement_terms(api, "train") == {("n1", "acme", "2.00", 1), ("n2", "acme", "3.00", 1)}
