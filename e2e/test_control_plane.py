"""The local control plane is a real cluster: kwok GPU nodes, KubeRay, service accounts.

These are the facts every other e2e test builds on, so they check them end to end with
the real components rather than trusting the harness: kwok reports the fleet's nodes,
kube-scheduler binds KubeRay's pods onto GPU nodes, and the controller-manager's token
controllers make service accounts usable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from testbed.fleet import node_labels
from testbed.testing import KubeTarget, wait_for

pytestmark = pytest.mark.e2e

RAY_IMAGE = "rayproject/ray:2.52.0"  # never pulled: kwok only pretends to run it


def _plain(kube: KubeTarget, obj: object) -> dict[str, Any]:
    """The object as the API server's JSON: simpler to assert on than the client models."""
    data: dict[str, Any] = kube.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    return data


def _ready(obj: dict[str, Any]) -> bool:
    conditions = obj.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture
def namespace(kube: KubeTarget) -> Iterator[str]:
    """A fresh namespace, deleted afterwards; waits until it is gone, so leaks show."""
    core = client.CoreV1Api(kube.api)
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for(f"namespace {name} to be deleted", gone, timeout=90)


def test_fleet_nodes_ready_with_gpu_capacity_and_labels(kube: KubeTarget) -> None:
    if kube.fleet is None:
        pytest.skip("external cluster: no simulated fleet applied")
    core = client.CoreV1Api(kube.api)
    for supplier, spec in kube.fleet.nodes():
        node = _plain(kube, core.read_node(spec.name))
        assert _ready(node), f"{spec.name} not Ready"
        capacity, allocatable = node["status"]["capacity"], node["status"]["allocatable"]
        if spec.gpu_count:
            assert capacity["nvidia.com/gpu"] == str(spec.gpu_count)
            assert allocatable["nvidia.com/gpu"] == str(spec.gpu_count)
        else:
            assert "nvidia.com/gpu" not in capacity
        labels = node["metadata"]["labels"]
        for key, value in node_labels(supplier, spec).items():
            assert labels.get(key) == value, f"{spec.name}: label {key}"
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    h100 = _plain(kube, core.read_node("atlas-h100-0"))["metadata"]["labels"]
    assert h100["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert h100["nvidia.com/gpu.compute.major"] == "9"
    assert h100["nvidia.com/gpu.compute.minor"] == "0"


def _raycluster(name: str, workers: int) -> dict[str, Any]:
    """A plain KubeRay RayCluster: CPU head on a head-capable node, 1-GPU workers."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name},
        "spec": {
            "rayVersion": "2.52.0",
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {
                    "spec": {
                        "nodeSelector": {"gpumesh.io/head-capable": "true"},
                        "containers": [
                            {
                                "name": "ray-head",
                                "image": RAY_IMAGE,
                                "resources": {"limits": {"cpu": "2", "memory": "4Gi"}},
                            }
                        ],
                    }
                },
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu",
                    "replicas": workers,
                    "minReplicas": workers,
                    "maxReplicas": workers,
                    "rayStartParams": {},
                    "template": {
                        "spec": {
                            "nodeSelector": {"nvidia.com/gpu.present": "true"},
                            "containers": [
                                {
                                    "name": "ray-worker",
                                    "image": RAY_IMAGE,
                                    "resources": {
                                        "limits": {
                                            "cpu": "4",
                                            "memory": "16Gi",
                                            "nvidia.com/gpu": "1",
                                        }
                                    },
                                }
                            ],
                        }
                    },
                }
            ],
        },
    }


def test_kuberay_raycluster_pods_run_on_kwok_gpu_nodes(kube: KubeTarget, namespace: str) -> None:
    if kube.fleet is None:
        pytest.skip("external cluster: no simulated fleet applied")
    core = client.CoreV1Api(kube.api)
    custom = client.CustomObjectsApi(kube.api)
    workers = 2
    custom.create_namespaced_custom_object(
        "ray.io", "v1", namespace, "rayclusters", _raycluster("rc", workers)
    )

    def running_pods() -> list[dict[str, Any]] | None:
        listed = core.list_namespaced_pod(namespace, label_selector="ray.io/cluster=rc")
        pods = _plain(kube, listed)["items"]
        ok = [
            p
            for p in pods
            if p["status"].get("phase") == "Running" and _ready(p) and p["spec"].get("nodeName")
        ]
        return ok if len(ok) == workers + 1 else None

    pods = wait_for("KubeRay head and workers Running", running_pods, timeout=90)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        by_type.setdefault(pod["metadata"]["labels"]["ray.io/node-type"], []).append(pod)
    assert len(by_type["head"]) == 1
    assert len(by_type["worker"]) == workers

    head_node = _plain(kube, core.read_node(by_type["head"][0]["spec"]["nodeName"]))
    assert head_node["metadata"]["labels"]["gpumesh.io/head-capable"] == "true"
    for pod in by_type["worker"]:
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        node = _plain(kube, core.read_node(pod["spec"]["nodeName"]))
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
        assert node["metadata"]["labels"]["type"] == "kwok"
        assert pod["status"].get("podIP"), "kwok assigns a pod IP from its CIDR"

    def ready_status() -> dict[str, Any] | None:
        rc = cast(
            dict[str, Any],
            custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters", "rc"),
        )
        status: dict[str, Any] = rc.get("status") or {}
        return status if status.get("readyWorkerReplicas") == workers else None

    status = wait_for("RayCluster to count its ready workers", ready_status, timeout=60)
    assert status.get("state") == "ready"


def test_service_account_token_flow(kube: KubeTarget, namespace: str) -> None:
    core = client.CoreV1Api(kube.api)
    wait_for(
        "the default ServiceAccount (serviceaccount controller)",
        lambda: (
            core.list_namespaced_service_account(
                namespace, field_selector="metadata.name=default"
            ).items
        ),
    )
    wait_for(
        "kube-root-ca.crt (root-ca-cert-publisher)",
        lambda: (
            core.list_namespaced_config_map(
                namespace, field_selector="metadata.name=kube-root-ca.crt"
            ).items
        ),
    )
    created = core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="sa-probe"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
        ),
    )
    pod = _plain(kube, created)
    # ServiceAccount admission filled in the account and its projected token volume.
    assert pod["spec"]["serviceAccountName"] == "default"
    assert any(v["name"].startswith("kube-api-access-") for v in pod["spec"]["volumes"])

    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    issued = _plain(
        kube, core.create_namespaced_service_account_token("default", namespace, request)
    )
    review = client.AuthenticationV1Api(kube.api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=issued["status"]["token"]))
    )
    result = _plain(kube, review)["status"]
    assert result["authenticated"] is True
    assert result["user"]["username"] == f"system:serviceaccount:{namespace}:default"
