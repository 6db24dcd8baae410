"""The RayJob builder: suspended template while queued, placed cluster once admitted,
a cluster selector for a referenced GPUCluster, and the attempt's environment."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gpumesh.api.job import JobSpec
from gpumesh.operator.render import labels as names
from gpumesh.operator.render.raycluster import Owner, WorkerSlot
from gpumesh.operator.render.rayjob import rayjob

OWNER = Owner("gpumesh.io/v1alpha1", "Job", "train", "uid-1")
TEMPLATE: dict[str, Any] = {
    "entrypoint": "python train.py",
    "runtimeEnv": {"pip": ["torch"], "env_vars": {"NCCL_DEBUG": "WARN"}},
    "clusterTemplate": {"workers": {"gpusPerWorker": 2, "replicas": 3}, "suspend": True},
    "checkpointUri": "s3://bucket/train/",
    "maxRetries": 3,
    "activeDeadlineSeconds": 600,
}


def render(spec: dict[str, Any], **kwargs: Any) -> Any:
    return rayjob(
        JobSpec.model_validate(spec),
        name=kwargs.pop("name", "train"),
        namespace="team-a",
        owner=OWNER,
        attempt=kwargs.pop("attempt", 1),
        **kwargs,
    )


def test_a_queued_attempt_is_suspended_with_no_workers() -> None:
    manifest = render(TEMPLATE)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    meta = manifest["metadata"]
    assert meta["name"] == "train" and meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "gpumesh.io/job": "train",
        "gpumesh.io/attempt": "1",
        names.MANAGED_BY: names.MANAGER,
    }
    assert meta["ownerReferences"] == [OWNER.reference()]
    spec = manifest["spec"]
    assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["workerGroupSpecs"] == []
    assert spec["rayClusterSpec"]["suspend"] is False  # the template's own flag is not KubeRay's
    assert spec["submissionMode"] == "K8sJobMode"
    # retries and deadlines are gpumesh's, never KubeRay's
    for field in ("backoffLimit", "activeDeadlineSeconds", "clusterSelector"):
        assert field not in spec


def test_an_admitted_attempt_carries_the_placed_cluster() -> None:
    slots = [WorkerSlot("workers", "node-b", 1), WorkerSlot("workers", "node-a", 2)]
    manifest = render(TEMPLATE, suspend=False, slots=slots, head_node="head-0", name="train-a2")
    spec = manifest["spec"]
    assert spec["suspend"] is False
    cluster = spec["rayClusterSpec"]
    pinned = {
        g["template"]["spec"]["nodeSelector"][names.HOSTNAME]: g["replicas"]
        for g in cluster["workerGroupSpecs"]
    }
    assert pinned == {"node-a": 2, "node-b": 1}
    head = cluster["headGroupSpec"]["template"]
    assert head["spec"]["nodeSelector"][names.HOSTNAME] == "head-0"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert labels["gpumesh.io/job"] == "train"
        assert labels[names.CLUSTER] == "train-a2"
    limits = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert limits["limits"][names.GPU_RESOURCE] == "2"


def test_each_attempt_gets_its_number_and_the_checkpoint_in_its_environment() -> None:
    env = yaml.safe_load(render(TEMPLATE, attempt=3)["spec"]["runtimeEnvYAML"])
    assert env == {
        "pip": ["torch"],
        "env_vars": {
            "NCCL_DEBUG": "WARN",
            "GPUMESH_ATTEMPT": "3",
            "GPUMESH_CHECKPOINT_URI": "s3://bucket/train/",
        },
    }
    bare = {"entrypoint": "x", "clusterRef": {"name": "shared"}}
    env = yaml.safe_load(render(bare, ray_cluster="shared")["spec"]["runtimeEnvYAML"])
    assert env == {"env_vars": {"GPUMESH_ATTEMPT": "1"}}


def test_a_job_on_a_gpucluster_selects_its_raycluster_and_is_never_suspended() -> None:
    spec = {"entrypoint": "python eval.py", "clusterRef": {"name": "shared"}}
    manifest = render(spec, ray_cluster="shared", submission_mode="InteractiveMode")
    body = manifest["spec"]
    assert body["clusterSelector"] == {"ray.io/cluster": "shared"}
    assert "suspend" not in body and "rayClusterSpec" not in body
    assert "shutdownAfterJobFinishes" not in body  # never tear down a shared cluster
    assert body["submissionMode"] == "InteractiveMode"
    with pytest.raises(ValueError, match="RayCluster"):
        render(spec)
