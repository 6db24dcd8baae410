"""Job on the real control plane: queue, admission, RayJob and RayCluster on kwok GPUs.

The operator and one node agent per fleet node run as the shipped programs
(:func:`~testbed.testing.operated_mesh`).

kwok pods do not run Ray, and KubeRay learns a Ray job's fate from the Ray dashboard,
which fake pods do not serve. So:

* the operator runs with ``GPUMESH_RAYJOB_SUBMISSION_MODE=InteractiveMode``: KubeRay
  builds the cluster and then waits (``Waiting``) instead of dialling a dashboard that is
  not there (its address would need a DNS lookup, and no test may send a packet off
  this machine);
* tests that need Ray's verdict write the RayJob status the way KubeRay writes it
  (``jobDeploymentStatus``, ``jobStatus``, ``reason`` on the status subresource), with
  ``dashboardURL`` on a closed loopback port, so whatever KubeRay then asks the
  dashboard (its deletion finalizer, its Running poll) fails at once on this machine.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from testbed.ports import free_port
from testbed.testing import (
    KubeTarget,
    OperatedMesh,
    find_custom,
    operated_mesh,
    wait_for,
)

pytestmark = pytest.mark.e2e

FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
NS = "e2e-job"
GROUP, VERSION = "gpumesh.io", "v1alpha1"
RAY = ("ray.io", "v1")
LOOPBACK_DASHBOARD = "127.0.0.1:1"
MERGE = "application/merge-patch+json"


@dataclass
class JobMesh:
    """The operated mesh, and the operator's metrics endpoint (GPU time, cost)."""

    world: OperatedMesh
    metrics_port: int

    @property
    def api(self) -> client.ApiClient:
        api: client.ApiClient = self.world.api
        return api

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
            return text


@pytest.fixture(scope="module")
def running_mesh(kube: KubeTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobMesh]:
    if kube.fleet is None:
        pytest.skip("this cluster has no simulated fleet for agents to play")
    tmp = tmp_path_factory.mktemp("job-mesh")
    metrics_port = free_port()
    env = {
        "GPUMESH_RESYNC_SECONDS": 5,
        "GPUMESH_RAYJOB_SUBMISSION_MODE": "InteractiveMode",
        "GPUMESH_METER_FLUSH_SECONDS": 2,
    }
    args = [f"--metrics-port={metrics_port}", "--metrics-host=127.0.0.1"]
    with operated_mesh(kube, tmp, FLEET, (NS,), operator_env=env, operator_args=args) as world:
        try:
            yield JobMesh(world, metrics_port)
        finally:
            with contextlib.suppress(Exception):
                clean_namespace(kube.api)


@pytest.fixture
def api(running_mesh: JobMesh) -> Iterator[client.ApiClient]:
    """The API, with every Job of the test (and what it made) gone afterwards."""
    yield running_mesh.api
    clean_namespace(running_mesh.api)


# --- helpers -------------------------------------------------------------------------------


def custom(api: client.ApiClient) -> Any:
    return client.CustomObjectsApi(api)


def create_job(api: client.ApiClient, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Job", "metadata": {"name": name}}
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, NS, "jobs", {**body, "spec": {"entrypoint": "python train.py", **spec}}
    )


def job(api: client.ApiClient, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = get(api, GROUP, VERSION, "jobs", name)
    return found


def job_status(api: client.ApiClient, name: str) -> dict[str, Any]:
    found = job(api, name)
    assert found is not None, f"Job {name} is gone"
    status: dict[str, Any] = found.get("status") or {}
    return status


def get(api: client.ApiClient, group: str, version: str, plural: str, name: str) -> Any:
    return find_custom(api, group, version, NS, plural, name)


def rayjob(api: client.ApiClient, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = get(api, *RAY, "rayjobs", name)
    return found


def rayclusters(api: client.ApiClient, job_name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = custom(api).list_namespaced_custom_object(
        *RAY, NS, "rayclusters", label_selector=f"gpumesh.io/job={job_name}"
    )["items"]
    return items


def pods(api: client.ApiClient, job_name: str) -> list[Any]:
    found: Any = client.CoreV1Api(api).list_namespaced_pod(
        NS, label_selector=f"gpumesh.io/job={job_name}"
    )
    return [p for p in found.items if p.metadata.deletion_timestamp is None]


def resumed_rayjob(api: client.ApiClient, name: str) -> dict[str, Any] | None:
    found = rayjob(api, name)
    return found if found is not None and not found["spec"]["suspend"] else None


def phase_is(api: client.ApiClient, name: str, *phases: str) -> dict[str, Any] | None:
    status = job_status(api, name)
    return status if status.get("phase") in phases else None


def kuberay_says(api: client.ApiClient, name: str, *deployments: str) -> dict[str, Any] | None:
    found = rayjob(api, name)
    status = (found or {}).get("status") or {}
    return found if status.get("jobDeploymentStatus") in deployments else None


def drive(api: client.ApiClient, name: str, deployment: str, job_status_: str, **more: str) -> None:
    """Write a RayJob status as KubeRay does once the Ray dashboard answers (see above).

    KubeRay stamps ``endTime`` when a RayJob finishes and counts its
    ``ttlSecondsAfterFinished`` (then deletes the cluster) from it, so this does too.
    """
    status = {
        "jobDeploymentStatus": deployment,
        "jobStatus": job_status_,
        "dashboardURL": LOOPBACK_DASHBOARD,
        **more,
    }
    if deployment in ("Complete", "Failed"):
        status["endTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    custom(api).patch_namespaced_custom_object_status(
        *RAY, NS, "rayjobs", name, {"status": status}, _content_type=MERGE
    )


def pin_dashboards(api: client.ApiClient) -> None:
    """Point every RayJob's dashboard at a closed loopback port before it is deleted."""
    items = custom(api).list_namespaced_custom_object(*RAY, NS, "rayjobs")["items"]
    for item in items:
        if (item.get("status") or {}).get("dashboardURL") not in (None, "", LOOPBACK_DASHBOARD):
            with contextlib.suppress(ApiException):
                custom(api).patch_namespaced_custom_object_status(
                    *RAY,
                    NS,
                    "rayjobs",
                    item["metadata"]["name"],
                    {"status": {"dashboardURL": LOOPBACK_DASHBOARD}},
                    _content_type=MERGE,
                )


def delete_job(api: client.ApiClient, name: str) -> None:
    pin_dashboards(api)
    with contextlib.suppress(ApiException):
        custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, "jobs", name)


def clean_namespace(api: client.ApiClient) -> None:
    for item in custom(api).list_namespaced_custom_object(GROUP, VERSION, NS, "jobs")["items"]:
        delete_job(api, item["metadata"]["name"])
    for item in custom(api).list_namespaced_custom_object(GROUP, VERSION, NS, "gpuclusters")[
        "items"
    ]:
        with contextlib.suppress(ApiException):
            custom(api).delete_namespaced_custom_object(
                GROUP, VERSION, NS, "gpuclusters", item["metadata"]["name"]
            )

    def nothing_left() -> bool:
        pin_dashboards(api)
        left = [
            custom(api).list_namespaced_custom_object(g, v, NS, p)["items"]
            for g, v, p in (
                (GROUP, VERSION, "jobs"),
                (*RAY, "rayjobs"),
                (*RAY, "rayclusters"),
            )
        ]
        all_pods: Any = client.CoreV1Api(api).list_namespaced_pod(NS)
        gpu_pods = [
            p
            for p in all_pods.items
            if p.metadata.labels and "gpumesh.io/cluster" in p.metadata.labels
        ]
        return not any(left) and not gpu_pods

    wait_for(
        "the namespace emptied of Jobs, RayJobs, RayClusters and pods", nothing_left, timeout=120
    )


def worker_nodes(api: client.ApiClient, job_name: str) -> dict[str, int]:
    """Running, Ready worker pods per node."""
    nodes: dict[str, int] = {}
    for pod in pods(api, job_name):
        if pod.metadata.labels.get("gpumesh.io/group") == "head":
            continue
        ready_ = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        if pod.status.phase == "Running" and ready_:
            nodes[pod.spec.node_name] = nodes.get(pod.spec.node_name, 0) + 1
    return nodes


def placed(status: dict[str, Any]) -> dict[str, int]:
    return {p["node"]: p["workers"] for p in status.get("placements") or []}


def events(api: client.ApiClient, name: str) -> list[str]:
    found: Any = client.CoreV1Api(api).list_namespaced_event(
        NS, field_selector=f"involvedObject.name={name},involvedObject.kind=Job"
    )
    return [str(e.reason) for e in found.items]


def posted(api: client.ApiClient, name: str, *reasons: str) -> bool:
    """Events go out asynchronously: wait for them with this."""
    return set(reasons) <= set(events(api, name))


A100 = {"models": ["A100 80GB"]}
ALL_A100 = {
    "workers": {"gpu": A100, "gpusPerWorker": 8, "replicas": 2},
    "placement": {"verifiedOnly": True},
}
HALF_A100 = {"workers": {"gpu": A100, "gpusPerWorker": 8, "replicas": 1}}


# --- tests ----------------------------------------------------------------------------------


def test_a_template_job_queues_is_admitted_and_runs_on_the_placed_nodes(
    api: client.ApiClient, running_mesh: JobMesh
) -> None:
    create_job(api, "first", {"clusterTemplate": ALL_A100})
    wait_for("first admitted", lambda: phase_is(api, "first", "Admitted", "Starting"), timeout=60)

    create_job(api, "second", {"clusterTemplate": HALF_A100, "checkpointUri": "s3://b/second/"})
    queued = wait_for(
        "second queued behind first",
        lambda: (s := phase_is(api, "second", "Queued")) and s.get("queuePosition") == 0 and s,
        timeout=60,
    )
    assert "A100" in queued["message"]
    suspended = wait_for("second's RayJob", lambda: rayjob(api, "second"), timeout=30)
    assert suspended["spec"]["suspend"] is True
    assert suspended["spec"]["shutdownAfterJobFinishes"] is True
    assert suspended["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpumesh-operator"
    assert suspended["metadata"]["ownerReferences"][0]["kind"] == "Job"
    assert not rayclusters(api, "second")

    # first finishes (as KubeRay reports it); second gets the GPUs.
    wait_for("first's cluster up", lambda: kuberay_says(api, "first", "Waiting"), timeout=90)
    drive(api, "first", "Complete", "SUCCEEDED")
    wait_for("first Succeeded", lambda: phase_is(api, "first", "Succeeded"), timeout=60)
    status = wait_for(
        "second admitted", lambda: phase_is(api, "second", "Admitted", "Starting"), timeout=60
    )
    nodes = placed(status)
    assert sum(nodes.values()) == 1
    assert all(n.startswith("nordic-a100-") and "40g" not in n for n in nodes)

    resumed = wait_for("second's RayJob resumed", lambda: resumed_rayjob(api, "second"), timeout=30)
    pinned = {
        g["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"]: g["replicas"]
        for g in resumed["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    }
    assert pinned == nodes
    env = yaml.safe_load(resumed["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env == {"GPUMESH_ATTEMPT": "1", "GPUMESH_CHECKPOINT_URI": "s3://b/second/"}

    wait_for("second's cluster up", lambda: kuberay_says(api, "second", "Waiting"), timeout=90)
    clusters = rayclusters(api, "second")
    assert len(clusters) == 1
    assert wait_for("workers Running", lambda: worker_nodes(api, "second") == nodes, timeout=60)
    status = wait_for(
        "second Starting with its dashboard",
        lambda: (st := phase_is(api, "second", "Starting")) and st.get("dashboardUrl") and st,
        timeout=30,
    )
    assert status["rayClusterName"] == clusters[0]["metadata"]["name"]
    assert status["dashboardUrl"].startswith("http://")
    assert status.get("gpuSeconds", 0) == 0  # placed and starting, not running: not paid yet

    drive(api, "second", "Running", "RUNNING", jobId="raysubmit_e2e")
    status = wait_for("second Running", lambda: phase_is(api, "second", "Running"), timeout=30)
    assert status["rayJobId"] == "raysubmit_e2e"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}

    # Metering: status and Prometheus, per supplier node.
    metered = wait_for(
        "GPU time metered",
        lambda: (s := job_status(api, "second")).get("gpuSeconds", 0) >= 8 and s,
        timeout=30,
    )
    assert metered["cost"] and metered["metering"]["meteredUntil"]
    node = next(iter(nodes))
    text = running_mesh.metrics()
    series = [
        line
        for line in text.splitlines()
        if line.startswith("gpumesh_gpu_seconds_total{")
        and 'name="second"' in line
        and f'node="{node}"' in line
    ]
    assert series and 'supplier="nordic-dc"' in series[0] and 'kind="Job"' in series[0]
    assert float(series[0].rsplit(" ", 1)[1]) > 0
    assert "gpumesh_cost_usd_total{" in text
    wait_for("events", lambda: posted(api, "second", "Queued", "Admitted"), timeout=30)


def test_a_job_on_an_existing_gpucluster_targets_its_raycluster(
    api: client.ApiClient, running_mesh: JobMesh
) -> None:
    cluster = {"workers": {"gpu": A100, "gpusPerWorker": 2, "replicas": 1}}
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUCluster", "metadata": {"name": "pool"}}
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, NS, "gpuclusters", {**body, "spec": cluster}
    )
    create_job(api, "eval", {"clusterRef": {"name": "pool"}})
    made = wait_for(
        "the RayJob once the GPUCluster is Ready", lambda: rayjob(api, "eval"), timeout=120
    )
    gc = get(api, GROUP, VERSION, "gpuclusters", "pool")
    assert gc["status"]["phase"] == "Ready"
    assert made["spec"]["clusterSelector"] == {"ray.io/cluster": gc["status"]["rayClusterName"]}
    assert "suspend" not in made["spec"] or made["spec"]["suspend"] is False
    assert "rayClusterSpec" not in made["spec"]
    wait_for("KubeRay on the cluster", lambda: kuberay_says(api, "eval", "Waiting"), timeout=60)
    wait_for("eval Starting", lambda: phase_is(api, "eval", "Starting"), timeout=30)
    assert job_status(api, "eval")["rayClusterName"] == gc["status"]["rayClusterName"]

    drive(api, "eval", "Complete", "SUCCEEDED")
    wait_for("eval Succeeded", lambda: phase_is(api, "eval", "Succeeded"), timeout=30)
    time.sleep(2)
    assert get(api, *RAY, "rayclusters", gc["status"]["rayClusterName"]) is not None
    assert job_status(api, "eval").get("gpuSeconds", 0) == 0  # the GPUCluster is metered
    metered = wait_for(
        "the GPUCluster's GPU time metered",
        lambda: (
            (st := get(api, GROUP, VERSION, "gpuclusters", "pool")["status"]).get("gpuSeconds", 0)
            >= 2
            and st
        ),
        timeout=30,
    )
    assert metered["cost"] and metered["metering"]["priceSeconds"]
    lines = running_mesh.metrics().splitlines()
    assert any(
        line.startswith("gpumesh_cost_usd_total{")
        and 'kind="GPUCluster"' in line
        and 'name="pool"' in line
        and 'supplier="nordic-dc"' in line
        for line in lines
    )


def test_program_failures_use_retries_infrastructure_failures_do_not(
    api: client.ApiClient,
) -> None:
    spec = {
        "clusterTemplate": HALF_A100,
        "maxRetries": 1,
        "retryBackoffSeconds": 2,
        "checkpointUri": "s3://b/flaky/",
    }
    create_job(api, "flaky", spec)
    wait_for("attempt 1 up", lambda: kuberay_says(api, "flaky", "Waiting"), timeout=90)
    drive(
        api,
        "flaky",
        "Failed",
        "RUNNING",
        reason="JobDeploymentStatusTransitionGracePeriodExceeded",
        message="submitter finished but the Ray job never ended",
    )
    lost = wait_for(
        "attempt 1 lost to infrastructure",
        lambda: (s := job_status(api, "flaky")).get("attempts") == 2 and s,
        timeout=30,
    )
    assert lost["infrastructureRetries"] == 1 and lost.get("failedAttempts", 0) == 0

    wait_for("attempt 2 up", lambda: kuberay_says(api, "flaky-a2", "Waiting"), timeout=90)
    second = rayjob(api, "flaky-a2")
    assert second is not None
    env = yaml.safe_load(second["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["GPUMESH_ATTEMPT"] == "2" and env["GPUMESH_CHECKPOINT_URI"] == "s3://b/flaky/"
    drive(api, "flaky-a2", "Failed", "FAILED", reason="AppFailed", message="exit code 1")
    retry = wait_for(
        "a retry after backoff",
        lambda: (s := job_status(api, "flaky")).get("attempts") == 3 and s,
        timeout=30,
    )
    assert retry["failedAttempts"] == 1 and retry["nextAttemptTime"]
    wait_for("attempt 3 up", lambda: kuberay_says(api, "flaky-a3", "Waiting"), timeout=90)
    drive(api, "flaky-a3", "Failed", "FAILED", reason="AppFailed", message="exit code 1")
    end = wait_for("retries exhausted", lambda: phase_is(api, "flaky", "Failed"), timeout=30)
    assert end["failedAttempts"] == 2 and end["infrastructureRetries"] == 1
    stalled = {c["type"]: c for c in end["conditions"]}["Stalled"]
    assert stalled["status"] == "True" and stalled["reason"] == "RetriesExhausted"
    reasons = ("InfrastructureFailure", "AttemptFailed", "RetriesExhausted")
    wait_for("events", lambda: posted(api, "flaky", *reasons), timeout=30)
    wait_for("its clusters removed", lambda: not rayclusters(api, "flaky"), timeout=60)


def test_the_active_deadline_fails_the_job_and_stops_its_cluster(api: client.ApiClient) -> None:
    create_job(api, "slow", {"clusterTemplate": HALF_A100, "activeDeadlineSeconds": 8})
    wait_for("slow up", lambda: kuberay_says(api, "slow", "Waiting"), timeout=90)
    drive(api, "slow", "Running", "RUNNING")
    status = wait_for("deadline", lambda: phase_is(api, "slow", "Failed"), timeout=40)
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Stalled"] == "DeadlineExceeded"
    assert 8 <= status["activeSeconds"] < 30
    suspended = rayjob(api, "slow")
    assert suspended is not None and suspended["spec"]["suspend"] is True
    wait_for("KubeRay tore the cluster down", lambda: not rayclusters(api, "slow"), timeout=60)
    wait_for("event", lambda: posted(api, "slow", "DeadlineExceeded"), timeout=30)


def test_a_finished_job_is_deleted_after_its_ttl(api: client.ApiClient) -> None:
    create_job(api, "short", {"clusterTemplate": HALF_A100, "ttlSecondsAfterFinished": 3})
    wait_for("short up", lambda: kuberay_says(api, "short", "Waiting"), timeout=90)
    drive(api, "short", "Complete", "SUCCEEDED")
    done = wait_for("short Succeeded", lambda: phase_is(api, "short", "Succeeded"), timeout=30)
    assert done["completionTime"]
    wait_for("the Job deleted by its TTL", lambda: job(api, "short") is None, timeout=30)
    wait_for("its RayJob collected", lambda: rayjob(api, "short") is None, timeout=60)


def test_a_higher_priority_job_preempts_and_the_victim_resumes_later(
    api: client.ApiClient,
) -> None:
    create_job(api, "batch", {"clusterTemplate": ALL_A100, "priority": 0})
    wait_for("batch up", lambda: kuberay_says(api, "batch", "Waiting"), timeout=90)
    drive(api, "batch", "Running", "RUNNING")
    wait_for("batch Running", lambda: phase_is(api, "batch", "Running"), timeout=30)
    first_cluster = rayclusters(api, "batch")[0]["metadata"]["name"]

    create_job(api, "urgent", {"clusterTemplate": ALL_A100, "priority": 100})
    victim = wait_for("batch preempted", lambda: phase_is(api, "batch", "Suspended"), timeout=60)
    assert victim["preemptedBy"] == f"Job/{NS}/urgent"
    assert victim["infrastructureRetries"] == 1 and victim.get("failedAttempts", 0) == 0
    assert (rayjob(api, "batch") or {})["spec"]["suspend"] is True
    wait_for("urgent admitted", lambda: phase_is(api, "urgent", "Admitted", "Starting"), timeout=60)
    wait_for("events on both sides", lambda: posted(api, "batch", "Preempted"), timeout=30)
    wait_for("events on both sides", lambda: posted(api, "urgent", "Preempting"), timeout=30)
    wait_for("KubeRay suspended batch", lambda: kuberay_says(api, "batch", "Suspended"), timeout=60)
    wait_for(
        "urgent's workers Running",
        lambda: sum(worker_nodes(api, "urgent").values()) == 2,
        timeout=90,
    )

    wait_for("urgent up", lambda: kuberay_says(api, "urgent", "Waiting"), timeout=60)
    drive(api, "urgent", "Complete", "SUCCEEDED")
    back = wait_for(
        "batch resumed", lambda: phase_is(api, "batch", "Admitted", "Starting"), timeout=90
    )
    assert "preemptedBy" not in back and back["attempts"] == 1
    wait_for("event", lambda: posted(api, "batch", "Resumed"), timeout=30)
    wait_for("batch's new cluster", lambda: kuberay_says(api, "batch", "Waiting"), timeout=120)
    clusters = [c["metadata"]["name"] for c in rayclusters(api, "batch")]
    assert clusters and first_cluster not in clusters
    assert wait_for(
        "batch's workers Running again",
        lambda: worker_nodes(api, "batch") == placed(job_status(api, "batch")),
        timeout=90,
    )


def test_deleting_a_job_removes_its_rayjob_cluster_and_pods_and_frees_its_gpus(
    api: client.ApiClient,
) -> None:
    create_job(api, "hog", {"clusterTemplate": ALL_A100})
    wait_for("hog up", lambda: kuberay_says(api, "hog", "Waiting"), timeout=90)
    assert wait_for("hog's pods", lambda: len(pods(api, "hog")) == 3, timeout=60)
    create_job(api, "next", {"clusterTemplate": HALF_A100})
    wait_for("next waits", lambda: phase_is(api, "next", "Queued"), timeout=30)

    delete_job(api, "hog")
    wait_for("hog gone", lambda: job(api, "hog") is None, timeout=60)
    wait_for("its RayJob gone", lambda: rayjob(api, "hog") is None, timeout=60)
    wait_for("its RayCluster gone", lambda: not rayclusters(api, "hog"), timeout=60)
    wait_for("its pods gone", lambda: not pods(api, "hog"), timeout=60)
    wait_for("next admitted", lambda: phase_is(api, "next", "Admitted", "Starting"), timeout=60)
