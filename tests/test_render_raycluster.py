"""The RayCluster builder pins each worker group to one supplier node and nothing else."""

from __future__ import annotations

from typing import Any

from gpumesh.api.gpucluster import GPUClusterSpec
from gpumesh.operator.render import labels as names
from gpumesh.operator.render.raycluster import Owner, WorkerSlot, raycluster

OWNER = Owner("gpumesh.io/v1alpha1", "GPUCluster", "train", "uid-1")


def render(spec: dict[str, Any], slots: list[WorkerSlot], head: str | None = "dc-cpu-0") -> Any:
    return raycluster(
        GPUClusterSpec.model_validate(spec),
        slots,
        name="train",
        namespace="team-a",
        owner=OWNER,
        head_node=head,
    )


def test_one_worker_group_per_node_with_exact_gpu_limits() -> None:
    rc = render(
        {"workers": {"gpusPerWorker": 2, "replicas": 3}},
        [WorkerSlot("workers", "node-b", 1), WorkerSlot("workers", "node-a", 2)],
    )
    groups = rc["spec"]["workerGroupSpecs"]
    assert [g["replicas"] for g in groups] == [2, 1]  # sorted by node: a, b
    for group, node in zip(groups, ["node-a", "node-b"], strict=True):
        pod = group["template"]["spec"]
        assert pod["nodeSelector"] == {names.HOSTNAME: node}
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits[names.GPU_RESOURCE] == "2"
        assert limits["cpu"] == "8" and limits["memory"] == "32Gi"
        assert group["template"]["metadata"]["labels"][names.NODE] == node
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_group_names_are_stable_short_and_distinct_per_node() -> None:
    first = names.worker_group_name("workers", "a-very-long-supplier-node-name-0001")
    assert first == names.worker_group_name("workers", "a-very-long-supplier-node-name-0001")
    assert first != names.worker_group_name("workers", "a-very-long-supplier-node-name-0002")
    assert len(first) == len("workers-") + 8


def test_owner_reference_lets_the_garbage_collector_delete_the_raycluster() -> None:
    rc = render({"workers": {}}, [WorkerSlot("workers", "n", 1)])
    (ref,) = rc["metadata"]["ownerReferences"]
    assert ref["uid"] == "uid-1" and ref["controller"] is True and ref["blockOwnerDeletion"]
    assert rc["metadata"]["labels"][names.MANAGED_BY] == names.MANAGER


def test_head_runs_on_the_chosen_head_capable_node_without_gpus() -> None:
    rc = render({"workers": {}, "head": {"nodeSelector": {"tier": "dc"}}}, [], head="dc-cpu-0")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {
        names.HEAD_CAPABLE: "true",
        "tier": "dc",
        names.HOSTNAME: "dc-cpu-0",
    }
    assert names.GPU_RESOURCE not in head["containers"][0]["resources"]["limits"]


def test_workers_tolerate_supplier_taints_but_not_unhealthy_gpus() -> None:
    rc = render({"workers": {}}, [WorkerSlot("workers", "n", 1)])
    keys = {t["key"] for t in rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"]}
    assert "gpumesh.io/supplier" in keys
    assert "gpumesh.io/gpu-unhealthy" not in keys


def test_autoscaling_off_and_suspend_passed_through() -> None:
    rc = render({"workers": {}, "suspend": True}, [WorkerSlot("workers", "n", 1)])
    assert rc["spec"]["enableInTreeAutoscaling"] is False
    assert rc["spec"]["suspend"] is True


def test_draining_slot_keeps_its_group_at_zero() -> None:
    rc = render({"workers": {}}, [WorkerSlot("workers", "old", 0), WorkerSlot("workers", "new", 1)])
    replicas = {
        g["template"]["spec"]["nodeSelector"][names.HOSTNAME]: g["replicas"]
        for g in rc["spec"]["workerGroupSpecs"]
    }
    assert replicas == {"old": 0, "new": 1}


def test_additional_groups_use_their_own_resources_and_image() -> None:
    rc = render(
        {
            "image": "example.org/ray:custom",
            "workers": {},
            "additionalWorkerGroups": [
                {
                    "name": "cheap",
                    "gpusPerWorker": 1,
                    "cpuPerWorker": "6",
                    "memoryPerWorker": "20Gi",
                }
            ],
        },
        [WorkerSlot("cheap", "n1", 2)],
    )
    (group,) = rc["spec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["image"] == "example.org/ray:custom"
    assert container["resources"]["limits"]["cpu"] == "6"
    assert group["template"]["metadata"]["labels"][names.GROUP] == "cheap"


def test_rendering_is_deterministic() -> None:
    slots = [WorkerSlot("workers", "b", 1), WorkerSlot("workers", "a", 1)]
    assert render({"workers": {}}, slots) == render({"workers": {}}, list(reversed(slots)))
