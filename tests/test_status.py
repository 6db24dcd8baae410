"""GPUCluster status follows ready versus desired workers and the head, never KubeRay's state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from gpumesh.api.gpucluster import GPUClusterSpec, GPUClusterStatus, WorkerPlacement
from gpumesh.operator.status import Observation, RayClusterView, Waiting, compute_status

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = GPUClusterSpec.model_validate({"workers": {"replicas": 2, "gpusPerWorker": 2}})
PLACED = [
    WorkerPlacement(
        group="workers",
        node=f"n{i}",
        supplier="acme",
        region="eu-west",
        gpu_model="NVIDIA A100-SXM4-80GB",
        workers=1,
        gpus=2,
        price_per_gpu_hour=Decimal("1.50"),
    )
    for i in range(2)
]


def ray(ready: int, head_ready: bool = True) -> RayClusterView:
    return RayClusterView(
        name="c",
        ready_workers=ready,
        head_ready=head_ready,
        head_node="dc-0",
        head_service="c-head-svc",
        ready_by_group={"workers": ready},
    )


def observe(
    ray_view: RayClusterView | None,
    previous: GPUClusterStatus | None = None,
    generation: int = 1,
    waiting: Waiting | None = None,
    placements: list[WorkerPlacement] | None = None,
    now: datetime = T0,
) -> GPUClusterStatus:
    return compute_status(
        Observation(
            generation=generation,
            spec=SPEC,
            previous=previous or GPUClusterStatus(),
            placements=PLACED if placements is None else placements,
            waiting=waiting,
            raycluster=ray_view,
            now=now,
            selector="gpumesh.io/cluster=c,gpumesh.io/group=workers",
        )
    )


def condition(status: GPUClusterStatus, type_: str) -> str:
    return next(c.status for c in status.conditions if c.type == type_)


def test_provisioning_until_every_worker_and_the_head_are_ready() -> None:
    assert observe(None).phase == "Provisioning"
    assert observe(ray(2, head_ready=False)).phase == "Provisioning"
    status = observe(ray(1))
    assert status.phase == "Provisioning"
    assert condition(status, "Ready") == "False"
    assert condition(status, "Reconciling") == "True"


def test_ready_with_kstatus_conditions_gpus_and_price() -> None:
    status = observe(ray(2))
    assert status.phase == "Ready"
    assert condition(status, "Ready") == "True"
    assert condition(status, "Reconciling") == "False"
    assert condition(status, "Stalled") == "False"
    assert status.gpus == 4
    assert status.price_per_hour == Decimal("6.0000")
    assert status.worker_replicas == 2
    assert status.head is not None and status.head.dashboard_url == "http://c-head-svc:8265"


def test_losing_a_worker_after_ready_is_degraded_not_provisioning() -> None:
    ready = observe(ray(2))
    degraded = observe(ray(1), previous=ready)
    assert degraded.phase == "Degraded"
    assert condition(degraded, "Degraded") == "True"


def test_a_spec_change_is_provisioning_even_after_ready() -> None:
    ready = observe(ray(2))
    assert observe(ray(1), previous=ready, generation=2).phase == "Provisioning"


def test_unplaceable_is_pending_and_stalled_with_the_explanation() -> None:
    why = "asked 2 workers x 2 GPUs of H100: none free"
    status = observe(None, waiting=Waiting("Unschedulable", why, 3), placements=[])
    assert status.phase == "Pending"
    assert status.queue_position == 3
    stalled = next(c for c in status.conditions if c.type == "Stalled")
    assert stalled.status == "True" and stalled.reason == "Unschedulable"
    assert stalled.message == why


def test_same_inputs_later_give_an_identical_status_so_nothing_is_written() -> None:
    first = observe(ray(2))
    again = observe(ray(2), previous=first, now=T0 + timedelta(minutes=5))
    assert again.to_api() == first.to_api()


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    first = observe(ray(1))
    later = observe(ray(2), previous=first, now=T0 + timedelta(minutes=1))
    ready = next(c for c in later.conditions if c.type == "Ready")
    stalled = next(c for c in later.conditions if c.type == "Stalled")
    assert ready.last_transition_time == T0 + timedelta(minutes=1)
    assert stalled.last_transition_time == T0


def test_suspended_has_no_desired_workers() -> None:
    spec = SPEC.model_copy(update={"suspend": True})
    status = compute_status(Observation(1, spec, GPUClusterStatus(), [], None, None, T0, "s"))
    assert status.phase == "Suspended"
    assert status.desired_workers == 0


def test_a_head_nothing_is_known_about_is_left_out_rather_than_written_empty() -> None:
    unknown = RayClusterView("c", 0, True, None, None, {})
    assert observe(unknown).head is None


def test_the_head_is_shown_once_ready_and_kept_while_it_is_not() -> None:
    starting = observe(ray(0, head_ready=False))
    assert starting.head is None
    ready = observe(ray(2))
    assert ready.head is not None and ready.head.node == "dc-0"
    restarting = RayClusterView("c", 2, False, "dc-1", None, {"workers": 2})
    kept = observe(restarting, previous=ready)
    assert kept.head == ready.head


def test_main_group_replicas_never_run_ahead_of_kuberays_ready_count() -> None:
    pods_first = RayClusterView("c", 1, True, "dc-0", "c-head-svc", {"workers": 2})
    assert observe(pods_first).worker_replicas == 1


def test_the_view_reads_the_pinned_head_node_and_counts_groups_only_from_pods() -> None:
    raycluster = {
        "metadata": {"name": "c"},
        "spec": {"headNode": "head-0"},
        "status": {
            "readyWorkerReplicas": 3,
            "conditions": [{"type": "HeadPodReady", "status": "True"}],
            "head": {"serviceName": "c-head-svc"},
        },
    }
    alone = RayClusterView.from_objects(raycluster)
    assert alone.head_node == "head-0" and alone.head_ready
    assert alone.ready_by_group == {"workers": 3}

    def pod(group: str, ready: bool) -> dict[str, object]:
        condition = {"type": "Ready", "status": "True" if ready else "False"}
        return {
            "metadata": {"labels": {"gpumesh.io/group": group}},
            "status": {"conditions": [condition]},
        }

    pods = [pod("head", True), pod("workers", True), pod("eval", True), pod("eval", False)]
    grouped = RayClusterView.from_objects(raycluster, pods)
    assert grouped.ready_by_group == {"workers": 1, "eval": 1}


def ready_counts(status: GPUClusterStatus) -> dict[str, int]:
    return {p.node: p.ready for p in status.placements}


def test_placements_say_how_many_of_their_workers_are_ready_for_metering() -> None:
    assert ready_counts(observe(None)) == {"n0": 0, "n1": 0}
    assert ready_counts(observe(ray(2))) == {"n0": 1, "n1": 1}
    # Partly ready without pods: none of the group counts (the reconciler reads pods then).
    assert ready_counts(observe(ray(1))) == {"n0": 0, "n1": 0}
    by_node = RayClusterView("c", 1, True, "dc-0", None, {"workers": 1}, {("workers", "n1"): 1})
    assert ready_counts(observe(by_node)) == {"n0": 0, "n1": 1}


def test_the_view_counts_ready_workers_by_group_and_node_from_pods() -> None:
    raycluster = {"metadata": {"name": "c"}, "status": {"readyWorkerReplicas": 2}}

    def pod(node: str, ready: bool) -> dict[str, object]:
        return {
            "metadata": {"labels": {"gpumesh.io/group": "workers"}},
            "spec": {"nodeName": node},
            "status": {"conditions": [{"type": "Ready", "status": str(ready)}]},
        }

    view = RayClusterView.from_objects(
        raycluster, [pod("a", True), pod("a", True), pod("b", False)]
    )
    assert view.ready_on == {("workers", "a"): 2}
    assert RayClusterView.from_objects(raycluster).ready_on is None
