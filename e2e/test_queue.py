"""The admission queue on the real control plane: order, preemption and GPUQuota.

GPUClusters and Jobs wait in one queue: higher priority first, then older first; a
request with preemptionPolicy LowerPriority takes GPUs from lower-priority work; a
namespace's GPUQuota caps what its GPUClusters and Jobs hold together. The example fleet
has 16 verified A100 80GB GPUs (two nodes of 8), which these tests fill on purpose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from testbed.testing import (
    KubeTarget,
    OperatedMesh,
    find_custom,
    operated_mesh,
    wait_for,
)

pytestmark = pytest.mark.e2e

FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
NS = "e2e-queue"
GROUP, VERSION = "gpumesh.io", "v1alpha1"
A100 = {"models": ["A100 80GB"]}


def a100_workers(replicas: int, **spec: Any) -> dict[str, Any]:
    """``replicas`` workers of 8 A100 80GB GPUs each (a whole node each)."""
    return {
        "workers": {"gpu": A100, "gpusPerWorker": 8, "replicas": replicas},
        "placement": {"verifiedOnly": True},
        **spec,
    }


@pytest.fixture(scope="module")
def running_mesh(
    kube: KubeTarget, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatedMesh]:
    if kube.fleet is None:
        pytest.skip("this cluster has no simulated fleet for agents to play")
    env = {"GPUMESH_RESYNC_SECONDS": 10, "GPUMESH_RAYJOB_SUBMISSION_MODE": "InteractiveMode"}
    with operated_mesh(
        kube, tmp_path_factory.mktemp("queue"), FLEET, (NS,), operator_env=env
    ) as world:
        yield world


@pytest.fixture
def api(running_mesh: OperatedMesh) -> Iterator[client.ApiClient]:
    """The API, with every GPUCluster, Job and GPUQuota of the test gone afterwards."""
    yield running_mesh.api
    clean(running_mesh.api)


def custom(api: client.ApiClient) -> Any:
    return client.CustomObjectsApi(api)


def create(api: client.ApiClient, plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}}
    custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, plural, {**body, "spec": spec})


def create_cluster(api: client.ApiClient, name: str, spec: dict[str, Any]) -> None:
    create(api, "gpuclusters", "GPUCluster", name, spec)


def get(api: client.ApiClient, plural: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = custom(api).get_namespaced_custom_object(
        GROUP, VERSION, NS, plural, name
    )
    return found


def status(api: client.ApiClient, name: str, plural: str = "gpuclusters") -> dict[str, Any]:
    found: dict[str, Any] = get(api, plural, name).get("status") or {}
    return found


def condition(api: client.ApiClient, name: str, type_: str) -> dict[str, Any] | None:
    conditions = status(api, name).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


def stalled_because(api: client.ApiClient, name: str, reason: str) -> dict[str, Any] | None:
    found = condition(api, name, "Stalled")
    if found and found["status"] == "True" and found["reason"] == reason:
        return found
    return None


def ready(api: client.ApiClient, name: str) -> dict[str, Any] | None:
    obj = get(api, "gpuclusters", name)
    s = obj.get("status") or {}
    if s.get("phase") == "Ready" and s.get("observedGeneration") == obj["metadata"]["generation"]:
        return obj
    return None


def worker_pods(api: client.ApiClient, name: str) -> list[Any]:
    found: Any = client.CoreV1Api(api).list_namespaced_pod(
        NS, label_selector=f"gpumesh.io/cluster={name},gpumesh.io/group=workers"
    )
    return [p for p in found.items if p.metadata.deletion_timestamp is None]


def raycluster_exists(api: client.ApiClient, name: str) -> bool:
    return find_custom(api, "ray.io", "v1", NS, "rayclusters", name) is not None


def reasons(api: client.ApiClient, name: str) -> set[str]:
    found: Any = client.CoreV1Api(api).list_namespaced_event(
        NS, field_selector=f"involvedObject.name={name}"
    )
    return {str(e.reason) for e in found.items}


def delete(api: client.ApiClient, plural: str, name: str) -> None:
    with contextlib.suppress(ApiException):
        custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, plural, name)


def clean(api: client.ApiClient) -> None:
    for plural in ("jobs", "gpuclusters", "gpuquotas"):
        for item in custom(api).list_namespaced_custom_object(GROUP, VERSION, NS, plural)["items"]:
            delete(api, plural, item["metadata"]["name"])

    def nothing_left() -> bool:
        found: Any = client.CoreV1Api(api).list_namespaced_pod(NS)
        pods = [p for p in found.items if "gpumesh.io/cluster" in (p.metadata.labels or {})]
        rcs = custom(api).list_namespaced_custom_object("ray.io", "v1", NS, "rayclusters")
        return not pods and not rcs["items"]

    wait_for("the namespace emptied of RayClusters and pods", nothing_left, timeout=120)


def test_waiting_clusters_are_admitted_by_priority_then_age(api: client.ApiClient) -> None:
    create_cluster(api, "holder", a100_workers(2))
    wait_for("holder Ready on all 16 A100 80GB GPUs", lambda: ready(api, "holder"), timeout=120)
    create_cluster(api, "old-low", a100_workers(2))
    create_cluster(api, "young-high", a100_workers(2, priority=5, preemptionPolicy="Never"))

    def both_queued() -> bool:
        return status(api, "young-high").get("queuePosition") == 0 and (
            status(api, "old-low").get("queuePosition") == 1
        )

    wait_for("young-high first in the queue, old-low second", both_queued, timeout=60)
    assert stalled_because(api, "old-low", "Unschedulable")
    assert not raycluster_exists(api, "old-low") and not raycluster_exists(api, "young-high")

    delete(api, "gpuclusters", "holder")
    wait_for(
        "young-high admitted once holder is gone", lambda: ready(api, "young-high"), timeout=180
    )
    assert status(api, "old-low")["phase"] == "Pending"
    wait_for(
        "old-low next in line",
        lambda: status(api, "old-low").get("queuePosition") == 0,
        timeout=30,
    )
    assert not raycluster_exists(api, "old-low")


def test_a_higher_priority_cluster_preempts_a_lower_one_which_comes_back_later(
    api: client.ApiClient,
) -> None:
    create_cluster(api, "batch", a100_workers(2))
    wait_for("batch Ready", lambda: ready(api, "batch"), timeout=120)
    create_cluster(api, "urgent", a100_workers(1, priority=10))

    wait_for("urgent Ready", lambda: ready(api, "urgent"), timeout=180)
    preempted = wait_for(
        "batch preempted", lambda: stalled_because(api, "batch", "Preempted"), timeout=30
    )
    assert "urgent" in preempted["message"]
    assert status(api, "batch")["phase"] == "Pending"
    assert status(api, "batch")["placements"] == []
    wait_for("batch's workers gone", lambda: not worker_pods(api, "batch"), timeout=60)
    assert raycluster_exists(api, "batch"), "the victim keeps its RayCluster and head"
    wait_for("events on both sides", lambda: "Preempted" in reasons(api, "batch"), timeout=30)
    assert "Preempting" in reasons(api, "urgent")

    delete(api, "gpuclusters", "urgent")
    wait_for("batch Ready again once urgent is gone", lambda: ready(api, "batch"), timeout=180)


def test_a_gpuquota_caps_what_clusters_and_jobs_of_its_namespace_hold(
    api: client.ApiClient,
) -> None:
    create(api, "gpuquotas", "GPUQuota", "team", {"hard": {"gpus": 8}})
    create_cluster(api, "first", a100_workers(1))
    wait_for("first Ready", lambda: ready(api, "first"), timeout=120)
    create_cluster(api, "second", a100_workers(1))
    quota_stall = wait_for(
        "second held back by the quota",
        lambda: stalled_because(api, "second", "QuotaExceeded"),
        timeout=60,
    )
    assert "8 of 8 GPUs in use" in quota_stall["message"]
    assert not raycluster_exists(api, "second")
    template = {"clusterTemplate": a100_workers(1), "entrypoint": "python train.py"}
    create(api, "jobs", "Job", "train", template)
    wait_for(
        "the Job waits on the same quota",
        lambda: "GPUQuota" in (status(api, "train", "jobs").get("message") or ""),
        timeout=60,
    )

    def quota_reported() -> dict[str, Any] | None:
        found = status(api, "team", "gpuquotas")
        used = found.get("used") or {}
        return found if used.get("gpus") == 8 and found.get("waiting") == 2 else None

    quota = wait_for("GPUQuota status with usage and waiting work", quota_reported, timeout=60)
    assert quota["admitted"] == 1
    exhausted = next(c for c in quota["conditions"] if c["type"] == "Exhausted")
    assert exhausted["status"] == "True"

    custom(api).patch_namespaced_custom_object(
        GROUP, VERSION, NS, "gpuquotas", "team", {"spec": {"hard": {"gpus": 16}}}
    )
    wait_for("second admitted under the raised quota", lambda: ready(api, "second"), timeout=120)
    assert status(api, "train", "jobs")["phase"] == "Queued", "no A100 80GB left for the Job"
