"""GPUCluster on the real control plane: from a renter's request to Ray pods on kwok GPUs.

The operator and one node agent per fleet node run as the shipped programs
(:func:`~testbed.testing.operated_mesh`). kwok pods do not run Ray,
but KubeRay, the scheduler and kwok's pod-ready stage make them Running and Ready.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpumesh.api.gpunode import Track
from gpumesh.operator.reputation import ReputationSettings, score
from testbed.testing import (
    KubeTarget,
    OperatedMesh,
    find_custom,
    operated_mesh,
    steady_fleet,
    wait_for,
)

pytestmark = pytest.mark.e2e

FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
NS = "e2e-gpucluster"
GROUP, VERSION = "gpumesh.io", "v1alpha1"
WHOLE_A100: dict[str, Any] = {
    "workers": {"gpu": {"models": ["A100 80GB"]}, "gpusPerWorker": 8, "replicas": 1},
    "placement": {"verifiedOnly": True},
}
"""One worker taking a whole A100 80GB node (the fleet has two): a move has one place to go."""


REPUTATION = ReputationSettings(
    half_life=timedelta(minutes=10), prior_s=60, rewrite_after=timedelta(seconds=2)
)
"""A reputation that moves within a test: the formula as shipped, on a shorter clock."""
OPERATOR_ENV = {
    "GPUMESH_RESYNC_SECONDS": 10,
    "GPUMESH_REPUTATION_HALF_LIFE_SECONDS": REPUTATION.half_life.total_seconds(),
    "GPUMESH_REPUTATION_PRIOR_SECONDS": REPUTATION.prior_s,
    "GPUMESH_REPUTATION_REWRITE_SECONDS": REPUTATION.rewrite_after.total_seconds(),
}


@pytest.fixture(scope="module")
def running_mesh(
    kube: KubeTarget, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatedMesh]:
    if kube.fleet is None:
        pytest.skip("this cluster has no simulated fleet for agents to play")
    tmp = tmp_path_factory.mktemp("mesh")
    with operated_mesh(kube, tmp, FLEET, (NS,), operator_env=OPERATOR_ENV) as world:
        yield world


def custom(api: client.ApiClient) -> Any:
    return client.CustomObjectsApi(api)


def create_cluster(api: client.ApiClient, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUCluster", "metadata": {"name": name}}
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, NS, "gpuclusters", {**body, "spec": spec}
    )


def gpucluster(api: client.ApiClient, name: str) -> dict[str, Any]:
    found: dict[str, Any] = custom(api).get_namespaced_custom_object(
        GROUP, VERSION, NS, "gpuclusters", name
    )
    return found


def raycluster(api: client.ApiClient, name: str) -> dict[str, Any] | None:
    return find_custom(api, "ray.io", "v1", NS, "rayclusters", name)


def cluster_pods(api: client.ApiClient, name: str) -> list[Any]:
    pods: Any = client.CoreV1Api(api).list_namespaced_pod(
        NS, label_selector=f"gpumesh.io/cluster={name}"
    )
    return [p for p in pods.items if p.metadata.deletion_timestamp is None]


def ready(api: client.ApiClient, name: str) -> dict[str, Any] | None:
    obj = gpucluster(api, name)
    status = obj.get("status") or {}
    if status.get("phase") != "Ready":
        return None
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    return obj


def stalled(api: client.ApiClient, name: str, reason: str) -> dict[str, Any] | None:
    """The cluster's Stalled condition, once it is True for ``reason``."""
    status = gpucluster(api, name).get("status") or {}
    found = {c["type"]: c for c in status.get("conditions", [])}.get("Stalled")
    return found if found and found["status"] == "True" and found["reason"] == reason else None


def placed_nodes(obj: dict[str, Any]) -> dict[str, int]:
    return {p["node"]: p["workers"] for p in obj["status"]["placements"]}


def worker_nodes(api: client.ApiClient, name: str) -> dict[str, int]:
    """Running, Ready worker pods per node."""
    nodes: dict[str, int] = {}
    for pod in cluster_pods(api, name):
        if pod.metadata.labels.get("gpumesh.io/group") == "head":
            continue
        ready_ = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        if pod.status.phase == "Running" and ready_:
            nodes[pod.spec.node_name] = nodes.get(pod.spec.node_name, 0) + 1
    return nodes


def scale(api: client.ApiClient, name: str, replicas: int) -> None:
    """What `kubectl scale gpucluster NAME --replicas N` does: patch the scale subresource."""
    custom(api).patch_namespaced_custom_object_scale(
        GROUP, VERSION, NS, "gpuclusters", name, {"spec": {"replicas": replicas}}
    )


def delete(api: client.ApiClient, name: str) -> None:
    with contextlib.suppress(ApiException):
        custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, "gpuclusters", name)


A100_SPEC = {
    "workers": {"gpu": {"models": ["A100 80GB"]}, "gpusPerWorker": 2, "replicas": 2},
    "placement": {"maxPricePerGpuHour": "2.00", "verifiedOnly": True},
}


def test_gpucluster_runs_on_the_chosen_a100_nodes_and_becomes_ready(
    running_mesh: OperatedMesh,
) -> None:
    api = running_mesh.api
    create_cluster(api, "a100", A100_SPEC)
    try:
        obj = wait_for("GPUCluster a100 Ready", lambda: ready(api, "a100"), timeout=120)
        placed = placed_nodes(obj)
        assert sum(placed.values()) == 2
        assert all(node.startswith("nordic-a100-") and "40g" not in node for node in placed)
        rc = raycluster(api, "a100")
        assert rc is not None
        groups = rc["spec"]["workerGroupSpecs"]
        pinned = {
            g["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"]: g["replicas"]
            for g in groups
        }
        assert pinned == placed
        assert worker_nodes(api, "a100") == placed
        head_pod = next(
            p for p in cluster_pods(api, "a100") if p.metadata.labels["gpumesh.io/group"] == "head"
        )
        assert head_pod.spec.node_name in {
            "atlas-head-0",
            "nordic-a100-0",
            "nordic-a100-1",
            "nordic-a100-40g-0",
            "atlas-h100-0",
            "atlas-h100-1",
        }
        status = obj["status"]
        assert status["gpus"] == 4
        assert status["pricePerHour"] == "5.16"
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        assert conditions == {
            "Degraded": "False",
            "Ready": "True",
            "Reconciling": "False",
            "Stalled": "False",
        }
        # Who wrote what, as `kubectl get --show-managed-fields` tells it: the operator
        # applied the RayCluster server-side and wrote the GPUCluster's status.
        assert {m for m in managers(rc) if m[2] != "status"} == {("gpumesh-operator", "Apply", "")}
        assert ("gpumesh-operator", "Update", "status") in managers(obj)
    finally:
        delete(api, "a100")


def managers(obj: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(manager, operation, subresource) of each managedFields entry."""
    return {
        (m["manager"], m["operation"], m.get("subresource", ""))
        for m in obj["metadata"].get("managedFields") or []
    }


def test_scaling_adds_and_removes_workers_without_moving_healthy_ones(
    running_mesh: OperatedMesh,
) -> None:
    api = running_mesh.api
    create_cluster(api, "scaled", {**A100_SPEC, "workers": {**A100_SPEC["workers"], "replicas": 1}})
    try:
        before = placed_nodes(wait_for("ready at 1", lambda: ready(api, "scaled"), timeout=120))
        original_pods = {p.metadata.name for p in cluster_pods(api, "scaled")}
        scale(api, "scaled", 3)
        after = placed_nodes(
            wait_for(
                "ready at 3",
                lambda: (o := ready(api, "scaled")) and o["status"]["readyWorkers"] == 3 and o,
                timeout=120,
            )
        )
        assert sum(after.values()) == 3
        for node, workers in before.items():
            assert after.get(node, 0) >= workers, "a healthy worker was moved"
        assert original_pods <= {p.metadata.name for p in cluster_pods(api, "scaled")}

        scale(api, "scaled", 1)
        wait_for(
            "ready at 1 again",
            lambda: (
                (o := ready(api, "scaled"))
                and o["status"]["readyWorkers"] == 1
                and sum(worker_nodes(api, "scaled").values()) == 1
            ),
            timeout=120,
        )
        assert (gpucluster(api, "scaled")["spec"]["workers"]["replicas"]) == 1
    finally:
        delete(api, "scaled")


def test_an_edit_that_does_not_touch_workers_changes_nothing_running(
    running_mesh: OperatedMesh,
) -> None:
    api = running_mesh.api
    create_cluster(api, "edited", A100_SPEC)
    try:
        wait_for("ready", lambda: ready(api, "edited"), timeout=120)
        rc_before = raycluster(api, "edited")
        assert rc_before is not None
        pods_before = {p.metadata.name for p in cluster_pods(api, "edited")}
        custom(api).patch_namespaced_custom_object(
            GROUP, VERSION, NS, "gpuclusters", "edited", {"spec": {"priority": 10}}
        )
        wait_for("edit observed", lambda: ready(api, "edited"), timeout=60)
        rc_after = raycluster(api, "edited")
        assert rc_after is not None
        assert rc_after["metadata"]["generation"] == rc_before["metadata"]["generation"]
        assert {p.metadata.name for p in cluster_pods(api, "edited")} == pods_before
    finally:
        delete(api, "edited")


def test_an_unplaceable_request_waits_with_a_message_that_names_the_binding_constraint(
    running_mesh: OperatedMesh,
) -> None:
    api = running_mesh.api
    spec = {
        "workers": {"gpu": {"models": ["H100"]}, "gpusPerWorker": 8, "replicas": 2},
        "placement": {"maxPricePerGpuHour": "1.00"},
    }
    create_cluster(api, "too-cheap", spec)
    try:
        condition = wait_for(
            "Stalled condition", lambda: stalled(api, "too-cheap", "Unschedulable"), timeout=60
        )
        assert gpucluster(api, "too-cheap")["status"]["phase"] == "Pending"
        assert condition["reason"] == "Unschedulable"
        assert "H100" in condition["message"] and "1.00" in condition["message"]
        assert raycluster(api, "too-cheap") is None
        events = client.CoreV1Api(api).list_namespaced_event(
            NS, field_selector="involvedObject.name=too-cheap"
        )
        assert any(e.reason == "Unschedulable" for e in events.items)
    finally:
        delete(api, "too-cheap")


def test_operator_killed_mid_way_resumes_without_duplicates_or_orphans(
    running_mesh: OperatedMesh,
) -> None:
    api = running_mesh.api
    create_cluster(api, "survivor", A100_SPEC)
    try:
        wait_for("RayCluster created", lambda: raycluster(api, "survivor"), timeout=60)
        running_mesh.kill_operator()
        running_mesh.start_operator()
        obj = wait_for("ready after restart", lambda: ready(api, "survivor"), timeout=120)
        rayclusters = custom(api).list_namespaced_custom_object(
            "ray.io", "v1", NS, "rayclusters", label_selector="gpumesh.io/cluster=survivor"
        )["items"]
        assert len(rayclusters) == 1
        assert sum(worker_nodes(api, "survivor").values()) == 2
        assert sum(placed_nodes(obj).values()) == 2
    finally:
        delete(api, "survivor")
    wait_for(
        "RayCluster garbage-collected", lambda: raycluster(api, "survivor") is None, timeout=60
    )
    wait_for("pods gone", lambda: not cluster_pods(api, "survivor"), timeout=60)


def test_a_cluster_the_operator_has_not_seen_reads_as_not_yet_reconciled(
    running_mesh: OperatedMesh,
) -> None:
    """kstatus (Flux's health checks) must not take a GPUCluster nobody has looked at for
    done: the CRD's default ``status.observedGeneration: 0`` is behind generation 1 until
    the operator writes, however long that takes (here: it is down)."""
    api = running_mesh.api
    running_mesh.kill_operator()
    try:
        create_cluster(api, "unseen", A100_SPEC)
        obj = gpucluster(api, "unseen")
        assert obj["metadata"]["generation"] == 1
        assert obj["status"]["observedGeneration"] == 0
        assert obj["status"]["phase"] == "Pending"  # the status schema's own default
        assert not obj["status"].get("conditions")
        running_mesh.start_operator()
        obj = wait_for("ready once the operator is back", lambda: ready(api, "unseen"), timeout=120)
        assert obj["status"]["observedGeneration"] == 1
    finally:
        if running_mesh.operator is None or running_mesh.operator.poll() is not None:
            running_mesh.start_operator()
        delete(api, "unseen")
    wait_for("RayCluster garbage-collected", lambda: raycluster(api, "unseen") is None, timeout=60)
    wait_for("pods gone", lambda: not cluster_pods(api, "unseen"), timeout=60)


def test_deleting_a_gpucluster_frees_its_gpus_for_the_next_one(running_mesh: OperatedMesh) -> None:
    api = running_mesh.api
    big = {
        "workers": {"gpu": {"models": ["A100 80GB"]}, "gpusPerWorker": 8, "replicas": 2},
        "placement": {"verifiedOnly": True},
    }
    create_cluster(api, "first", big)
    wait_for("first ready", lambda: ready(api, "first"), timeout=120)
    create_cluster(api, "second", big)
    try:
        wait_for(
            "second waits: all 16 A100 80GB GPUs are taken",
            lambda: (gpucluster(api, "second").get("status") or {}).get("phase") == "Pending",
            timeout=60,
        )
        delete(api, "first")
        wait_for("second ready once first is gone", lambda: ready(api, "second"), timeout=180)
    finally:
        delete(api, "first")
        delete(api, "second")


def test_a_raycluster_someone_else_owns_is_left_alone(running_mesh: OperatedMesh) -> None:
    api = running_mesh.api
    theirs = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "taken", "labels": {"team": "someone-else"}},
        "spec": {
            "suspend": True,
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [{"name": "ray-head", "image": "ray"}]}},
            },
        },
    }
    custom(api).create_namespaced_custom_object("ray.io", "v1", NS, "rayclusters", theirs)
    try:
        create_cluster(api, "taken", A100_SPEC)

        def refused() -> bool:
            found = client.CoreV1Api(api).list_namespaced_event(
                NS, field_selector="involvedObject.name=taken,involvedObject.kind=GPUCluster"
            )
            return any(e.reason == "ForeignRayCluster" for e in found.items)

        wait_for("a ForeignRayCluster warning on the GPUCluster", refused, timeout=60)
        rc = raycluster(api, "taken")
        assert rc is not None
        assert rc["metadata"]["labels"] == {"team": "someone-else"}
        assert "workerGroupSpecs" not in rc["spec"]
    finally:
        delete(api, "taken")
        with contextlib.suppress(ApiException):
            custom(api).delete_namespaced_custom_object("ray.io", "v1", NS, "rayclusters", "taken")


def test_gpus_a_pod_gpumesh_did_not_create_holds_are_not_placed_on(
    running_mesh: OperatedMesh,
) -> None:
    """The operator streams only others' pods (a server-side label selector): those it
    must still see, or it would book GPUs a foreign pod already holds."""
    api = running_mesh.api
    core: Any = client.CoreV1Api(api)
    foreign: dict[str, Any] = {
        "metadata": {"name": "someone-elses-training"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "nordic-a100-0"},
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "train",
                    "image": "registry.invalid/train:1",
                    "resources": {"limits": {"nvidia.com/gpu": "4"}},
                }
            ],
        },
    }
    core.create_namespaced_pod(NS, foreign)
    every_a100 = {
        "workers": {"gpu": {"models": ["A100 80GB"]}, "gpusPerWorker": 8, "replicas": 2},
        "placement": {"verifiedOnly": True},
    }
    try:
        wait_for(
            "the foreign pod bound",
            lambda: core.read_namespaced_pod("someone-elses-training", NS).spec.node_name or None,
            timeout=60,
        )
        create_cluster(api, "whole-a100-fleet", every_a100)

        def waiting() -> str | None:
            status = gpucluster(api, "whole-a100-fleet").get("status") or {}
            stalled = {c["type"]: c for c in status.get("conditions", [])}.get("Stalled")
            if status.get("phase") == "Pending" and stalled and stalled["status"] == "True":
                return str(stalled["message"])
            return None

        wait_for("Pending: 4 of the 16 GPUs are someone else's", waiting, timeout=60)
        assert raycluster(api, "whole-a100-fleet") is None
        core.delete_namespaced_pod("someone-elses-training", NS, grace_period_seconds=0)
        obj = wait_for(
            "Ready once the foreign pod is gone",
            lambda: ready(api, "whole-a100-fleet"),
            timeout=180,
        )
        assert placed_nodes(obj) == {"nordic-a100-0": 1, "nordic-a100-1": 1}
    finally:
        with contextlib.suppress(ApiException):
            core.delete_namespaced_pod("someone-elses-training", NS, grace_period_seconds=0)
        delete(api, "whole-a100-fleet")


def _set_node_ready(core: Any, node: str, ready: bool) -> None:
    """Write the Node's Ready condition as a kubelet that stopped (or came back) would."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "KubeletNotReady",
        "message": "e2e: back" if ready else "e2e: the supplier's machine stopped answering",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    core.patch_node_status(node, {"status": {"conditions": [condition]}})


def moved_off_a100(api: client.ApiClient, name: str, left: str, timeout: float) -> None:
    """Wait until cluster ``name``'s one worker runs Ready on the A100 80GB node it did not
    leave, and check that the move counted as one migration."""

    def moved_and_ready() -> dict[str, Any] | None:
        obj = ready(api, name)
        if obj is None or left in placed_nodes(obj):
            return None
        return obj if worker_nodes(api, name) == placed_nodes(obj) else None

    moved = wait_for("Ready again on the other A100 node", moved_and_ready, timeout=timeout)
    assert set(placed_nodes(moved)) == {"nordic-a100-0", "nordic-a100-1"} - {left}
    assert moved["status"]["migrations"] == 1


def test_workers_leave_a_node_that_goes_not_ready_and_the_move_is_counted(
    running_mesh: OperatedMesh,
) -> None:
    """Late in this module: it takes a node down for a while."""
    api = running_mesh.api
    core: Any = client.CoreV1Api(api)
    spec = {**WHOLE_A100, "failover": {"unhealthyGraceSeconds": 5}}
    create_cluster(api, "survives-a-node", spec)
    down: str | None = None
    try:
        obj = wait_for("ready", lambda: ready(api, "survives-a-node"), timeout=120)
        (down,) = placed_nodes(obj)
        _set_node_ready(core, down, False)
        moved_off_a100(api, "survives-a-node", down, timeout=180)
    finally:
        delete(api, "survives-a-node")
        if down is not None:
            _set_node_ready(core, down, True)
            wait_for(
                f"{down} Ready and untainted",
                lambda: (
                    not any(
                        t.key.startswith("node.kubernetes.io/")
                        for t in core.read_node(down).spec.taints or []
                    )
                ),
                timeout=120,
            )


def gpunode_health(api: client.ApiClient, node: str) -> str | None:
    found = custom(api).get_cluster_custom_object(GROUP, VERSION, "gpunodes", node)
    return (found.get("status") or {}).get("health")


def restore_agent(mesh: OperatedMesh, node: str) -> None:
    """Start ``node``'s agent as the fixture does and wait until it reports Healthy."""
    mesh.start_agent(node)
    wait_for(
        f"{node}'s agent back and Healthy",
        lambda: gpunode_health(mesh.api, node) == "Healthy",
        timeout=60,
    )


def test_workers_leave_a_node_whose_agent_died(running_mesh: OperatedMesh) -> None:
    """The agent of the worker's node is restarted with a 6 s Lease, then killed (SIGKILL):
    once its Lease lapses the operator marks the GPUNode Lost and the worker moves, and the
    node's reputation falls as the formula says. A restarted agent writes its own health
    again."""
    api = running_mesh.api
    core: Any = client.CoreV1Api(api)
    create_cluster(api, "outlives-an-agent", WHOLE_A100)
    quiet: str | None = None
    try:
        obj = wait_for("ready", lambda: ready(api, "outlives-an-agent"), timeout=120)
        (quiet,) = placed_nodes(obj)
        running_mesh.start_agent(quiet, "--lease-duration=6", "--lease-renew=2")
        lease_name = f"gpumesh-agent-{quiet}"
        coordination: Any = client.CoordinationV1Api(api)
        wait_for(
            "the agent renewing a 6 s Lease",
            lambda: (
                coordination.read_namespaced_lease(
                    lease_name, "gpumesh-system"
                ).spec.lease_duration_seconds
                == 6
            ),
        )
        assert gpunode_health(api, quiet) == "Healthy"
        up = wait_for("a reputation written while up", lambda: reputation(api, quiet, up=True))
        running_mesh.kill_agent(quiet)

        wait_for(f"{quiet} Lost", lambda: gpunode_health(api, quiet) == "Lost", timeout=60)
        # Lost counts as a fault at once; the downtime itself from the next rewrite on.
        wait_for(
            "the reputation to fall while the node is down, downtime counted",
            lambda: (
                found
                if (found := reputation(api, quiet, up=False))
                and found[0] < up[0]
                and found[1].down_seconds > 0
                else None
            ),
            timeout=60,
        )
        events = core.list_event_for_all_namespaces(
            field_selector=f"involvedObject.name={quiet},reason=AgentLost"
        ).items
        assert events and lease_name in events[0].message

        moved_off_a100(api, "outlives-an-agent", quiet, timeout=120)
    finally:
        delete(api, "outlives-an-agent")
        if quiet is not None:
            restore_agent(running_mesh, quiet)


def reputation(api: client.ApiClient, node: str, *, up: bool) -> tuple[float, Track] | None:
    """The node's reputation and record once the record says ``up``; the reputation is
    checked against the formula applied to the record it was written with."""
    status = custom(api).get_cluster_custom_object(GROUP, VERSION, "gpunodes", node)["status"]
    if "track" not in status or status["track"]["up"] is not up:
        return None
    track = Track.model_validate(status["track"])
    assert status["reputation"] == score(track, REPUTATION)
    return float(status["reputation"]), track


def test_the_failover_grace_runs_on_across_an_operator_restart(
    running_mesh: OperatedMesh, tmp_path: Path
) -> None:
    """The worker's node turns Unhealthy (its agent replays an uncorrectable ECC error);
    the operator is killed and restarted midway through the 30 s grace. The worker moves
    when the grace that began before the restart ends, not a whole grace after it."""
    api = running_mesh.api
    grace = 30
    spec = {**WHOLE_A100, "failover": {"unhealthyGraceSeconds": grace}}
    create_cluster(api, "rides-out-a-restart", spec)
    sick: str | None = None
    try:
        obj = wait_for("ready", lambda: ready(api, "rides-out-a-restart"), timeout=120)
        (sick,) = placed_nodes(obj)
        fleet = yaml.safe_load(steady_fleet(FLEET, tmp_path / "fleet.yaml").read_text())
        for supplier in fleet["suppliers"]:
            for node in supplier["nodes"]:
                if node["name"] == sick:
                    node["faults"] = [{"atSeconds": 0, "gpuIndex": 0, "kind": "ecc_dbe"}]
        (tmp_path / "sick.yaml").write_text(yaml.safe_dump(fleet))
        sick_fleet = running_mesh.share(tmp_path / "sick.yaml")
        running_mesh.start_agent(sick, "--fake-nvml", str(sick_fleet))

        def unhealthy_since() -> str | None:
            status = gpucluster(api, "rides-out-a-restart").get("status") or {}
            found = [u["since"] for u in status.get("unhealthyNodes", []) if u["node"] == sick]
            return found[0] if found else None

        since_text = wait_for(f"{sick} listed unhealthy", unhealthy_since, timeout=60)
        since = datetime.fromisoformat(since_text)
        time.sleep(
            max(0.0, (since + timedelta(seconds=grace / 2) - datetime.now(UTC)).total_seconds())
        )
        running_mesh.kill_operator()
        running_mesh.start_operator()
        restarted = datetime.now(UTC)
        assert placed_nodes(gpucluster(api, "rides-out-a-restart")) == {sick: 1}, "too early"

        def moved() -> datetime | None:
            obj = gpucluster(api, "rides-out-a-restart")
            return datetime.now(UTC) if sick not in placed_nodes(obj) else None

        moved_at = wait_for("the worker placed elsewhere", moved, timeout=grace + 60, interval=0.5)
        assert unhealthy_since() is None
        print(f"unhealthy {since}, operator restarted {restarted}, moved {moved_at}")
        assert moved_at >= since + timedelta(seconds=grace), "the grace was cut short"
        assert moved_at < restarted + timedelta(seconds=grace - 5), "the grace started over"
    finally:
        delete(api, "rides-out-a-restart")
        if sick is not None:
            restore_agent(running_mesh, sick)


@contextlib.contextmanager
def registry_policy(api: client.ApiClient, allowed: str) -> Iterator[None]:
    """A cluster admission policy a mesh operator might run: RayClusters in NS may only
    use images from ``allowed``. Refusals come back as the API server's 422."""
    name = f"e2e-{NS}-registry"
    admission: Any = client.AdmissionregistrationV1Api(api)
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["ray.io"],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["rayclusters"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": "object.spec.workerGroupSpecs.all(g, "
                    "g.template.spec.containers.all(c, "
                    f"c.image.startsWith('{allowed}/')))",
                    "message": f"images must come from {allowed}",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NS}}
            },
        },
    }
    admission.create_validating_admission_policy(policy)
    admission.create_validating_admission_policy_binding(binding)
    try:
        yield
    finally:
        with contextlib.suppress(ApiException):
            admission.delete_validating_admission_policy_binding(name)
        with contextlib.suppress(ApiException):
            admission.delete_validating_admission_policy(name)


def test_a_raycluster_the_api_server_refuses_stalls_the_cluster_once(
    running_mesh: OperatedMesh,
) -> None:
    api = running_mesh.api
    spec = {**A100_SPEC, "image": "untrusted.example.org/ray:2.52.0-gpu"}
    with registry_policy(api, "registry.example.com"):
        # The policy takes a moment to reach the API server's admission chain.
        time.sleep(2)
        create_cluster(api, "refused", spec)
        try:
            condition = wait_for(
                "Stalled, RayClusterRejected",
                lambda: stalled(api, "refused", "RayClusterRejected"),
                timeout=90,
            )
            assert condition["status"] == "True"
            assert "images must come from registry.example.com" in condition["message"]
            status = gpucluster(api, "refused")["status"]
            assert status["phase"] == "Pending" and status.get("gpus", 0) == 0
            assert raycluster(api, "refused") is None

            def rejected_events() -> list[Any]:
                events: Any = client.CoreV1Api(api).list_namespaced_event(
                    NS, field_selector="involvedObject.name=refused"
                )
                return [e for e in events.items if e.reason == "RayClusterRejected"]

            wait_for("a RayClusterRejected event", rejected_events, timeout=30)
            time.sleep(12)  # a resync (10 s here) and passes later: told once, not retried
            assert len(rejected_events()) == 1
            assert rejected_events()[0].count in (None, 1)

            # The renter moves to the allowed registry: a new generation is tried at once.
            custom(api).patch_namespaced_custom_object(
                GROUP,
                VERSION,
                NS,
                "gpuclusters",
                "refused",
                {"spec": {"image": "registry.example.com/ray:2.52.0-gpu"}},
            )
            wait_for("GPUCluster refused Ready", lambda: ready(api, "refused"), timeout=120)
        finally:
            delete(api, "refused")
