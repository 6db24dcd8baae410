"""Report diffing (pure): snapshot + object as read -> the smallest patch, or None."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpumesh.api.gpunode import GPUNodeStatus, Proof
from gpumesh.api.lease import lease_body, lease_expiry, lease_terms
from gpumesh.api.nodes import CONDITION_TYPE, TAINT_KEY, agent_may_set
from gpumesh.api.patch import apply_merge_patch
from gpumesh.node_agent.desired import (
    agent_lease_body,
    condition_patch,
    desired_labels,
    gfd_product,
    new_gpunode,
    node_patch,
    status_patch,
)
from gpumesh.node_agent.nvml.types import DeviceIdentity, DeviceSample
from gpumesh.node_agent.snapshot import GpuSnapshot, NodeSnapshot

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def gpu(index: int, health: Any = "Healthy", temp: int = 50, **more: Any) -> GpuSnapshot:
    ident = DeviceIdentity(
        index=index,
        uuid=f"GPU-0000000{index}-0000-0000-0000-000000000000",
        name="NVIDIA H100 80GB HBM3",
        memory_total_mib=81559,
        pci_bus_id=f"00000000:1{index}:00.0",
        compute_capability="9.0",
    )
    sample = DeviceSample(index=index, temperature_c=temp, power_w=300.0)
    reasons = () if health == "Healthy" else (f"why {health}",)
    return GpuSnapshot(
        index=index, identity=ident, sample=sample, health=health, reasons=reasons, **more
    )


def snap(*gpus: GpuSnapshot, health: Any = None) -> NodeSnapshot:
    from gpumesh.node_agent.health import node_health

    gpus = gpus or (gpu(0), gpu(1))
    return NodeSnapshot(
        node="n1",
        taken_at=NOW,
        monotonic=0.0,
        health=health or node_health(g.health for g in gpus),
        gpus=gpus,
        nvml_ok=True,
        driver_version="550.90.07",
        cuda_version="12.4",
    )


def applied(obj: dict[str, Any], patch: dict[str, Any] | None) -> dict[str, Any]:
    assert patch is not None
    result: dict[str, Any] = apply_merge_patch(obj, patch)
    return result


def gpunode(**status: Any) -> dict[str, Any]:
    obj = new_gpunode("n1", "acme", "eu-west", "2.10")
    obj["metadata"]["generation"] = 3
    if status:
        obj["status"] = status
    return obj


# --- GPUNode status ---------------------------------------------------------------------------


def test_first_status_has_identity_health_versions_and_heartbeat() -> None:
    patch = status_patch(gpunode(), snap(), now=NOW, heartbeat_s=30)
    assert patch is not None
    status = GPUNodeStatus.model_validate(patch["status"])
    assert status.health == "Healthy"
    assert (status.gpu_count, status.gpu_model) == (2, "NVIDIA H100 80GB HBM3")
    assert (status.driver_version, status.cuda_version) == ("550.90.07", "12.4")
    assert status.heartbeat_time == NOW
    assert status.observed_generation == 3
    assert status.gpus[1].pci_bus_id == "00000000:11:00.0"
    assert status.gpus[1].temperature_c == 50
    assert "verification" not in patch["status"]  # nothing to say, nothing erased


def test_unchanged_status_is_not_written() -> None:
    obj = applied(gpunode(), status_patch(gpunode(), snap(), now=NOW, heartbeat_s=30))
    later = NOW + timedelta(seconds=29)
    assert status_patch(obj, snap(), now=later, heartbeat_s=30) is None


def test_temperature_and_power_alone_are_no_reason_to_write() -> None:
    obj = applied(gpunode(), status_patch(gpunode(), snap(), now=NOW, heartbeat_s=30))
    warmer = snap(gpu(0, temp=77), gpu(1, temp=80))
    assert status_patch(obj, warmer, now=NOW + timedelta(seconds=5), heartbeat_s=30) is None
    beat = status_patch(obj, warmer, now=NOW + timedelta(seconds=30), heartbeat_s=30)
    assert beat is not None
    assert beat["status"]["gpus"][1]["temperatureC"] == 80  # rides along with the heartbeat


def test_a_health_change_is_written_at_once() -> None:
    obj = applied(gpunode(), status_patch(gpunode(), snap(), now=NOW, heartbeat_s=30))
    patch = status_patch(obj, snap(gpu(0), gpu(1, "Lost")), now=NOW, heartbeat_s=30)
    assert patch is not None
    assert patch["status"]["health"] == "Lost"
    assert patch["status"]["gpus"][1]["reasons"] == ["why Lost"]


def test_an_agent_back_after_the_operator_marked_its_node_lost_writes_its_own_health() -> None:
    obj = applied(gpunode(), status_patch(gpunode(), snap(), now=NOW, heartbeat_s=30))
    marked = applied(obj, {"status": {"health": "Lost"}})  # its Lease lapsed meanwhile
    patch = status_patch(marked, snap(), now=NOW + timedelta(seconds=1), heartbeat_s=30)
    assert patch is not None
    assert patch["status"]["health"] == "Healthy"


def test_fields_the_agent_no_longer_has_are_nulled_and_others_left_alone() -> None:
    obj = applied(gpunode(), status_patch(gpunode(), snap(), now=NOW, heartbeat_s=30))
    obj["status"]["reputation"] = 0.9
    obj["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    down = replace(snap(), driver_version=None)
    patch = status_patch(obj, down, now=NOW, heartbeat_s=30)
    assert patch is not None
    assert patch["status"]["driverVersion"] is None
    after = applied(obj, patch)
    assert "driverVersion" not in after["status"]
    assert after["status"]["reputation"] == 0.9
    assert after["status"]["conditions"] == [{"type": "Ready", "status": "True"}]


def test_the_proof_is_kept_across_restarts_and_written_when_new() -> None:
    proof = Proof(challenge_id="ab" * 8, roots=["0" * 64], engine="numpy")
    first = status_patch(gpunode(), snap(), now=NOW, heartbeat_s=30, proof=proof)
    obj = applied(gpunode(), first)
    assert obj["status"]["proof"]["roots"] == ["0" * 64]
    assert "verification" not in obj["status"]  # the operator's verdict, never the agent's
    # A restarted agent knows no result: the earlier proof stays, and nothing is written.
    assert status_patch(obj, snap(), now=NOW, heartbeat_s=30) is None
    newer = proof.model_copy(update={"challenge_id": "cd" * 8})
    patch = status_patch(obj, snap(), now=NOW, heartbeat_s=30, proof=newer)
    assert patch is not None
    assert patch["status"]["proof"]["challengeId"] == "cd" * 8


def test_an_unreadable_status_counts_as_changed() -> None:
    obj = gpunode(health="Sideways", heartbeatTime=NOW.isoformat())
    assert status_patch(obj, snap(), now=NOW, heartbeat_s=30) is not None


def test_others_fields_that_do_not_parse_are_no_reason_to_write() -> None:
    obj = applied(gpunode(), status_patch(gpunode(), snap(), now=NOW, heartbeat_s=30))
    obj["status"]["reputation"] = "very good"  # not ours, and not valid either
    obj["status"]["conditions"] = [{"type": "Ready"}]
    assert status_patch(obj, snap(), now=NOW + timedelta(seconds=1), heartbeat_s=30) is None


def test_new_gpunode_is_validated() -> None:
    obj = new_gpunode("n1", "acme", "eu-west", "2.10")
    assert obj["spec"] == {
        "supplier": "acme",
        "region": "eu-west",
        "pricePerGpuHour": "2.10",
        "headCapable": False,
        "cordoned": False,
        "meshRelay": True,
    }
    head = new_gpunode(
        "n1", "acme", "eu-west", "2.10", head_capable=True, public_endpoint="198.51.100.1:51820"
    )
    assert head["spec"]["headCapable"] is True
    assert head["spec"]["publicEndpoint"] == "198.51.100.1:51820"
    with pytest.raises(ValueError, match="decimal string"):
        new_gpunode("n1", "acme", "eu-west", "cheap")


# --- Node labels and taint -------------------------------------------------------------------


def node(labels: dict[str, str] | None = None, taints: list[Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "n1", "resourceVersion": "7", "labels": labels or {}}
    }
    if taints is not None:
        obj["spec"] = {"taints": taints}
    return obj


def test_gfd_product_label() -> None:
    assert gfd_product("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert gfd_product("NVIDIA A100-SXM4-80GB") == "NVIDIA-A100-SXM4-80GB"
    assert gfd_product(" NVIDIA GeForce RTX 4090 (rev a) ") == "NVIDIA-GeForce-RTX-4090-_rev-a"


def test_labels_gfd_style_and_never_the_mesh_operators() -> None:
    assert desired_labels(snap()) == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.count": "2",
        "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0",
    }
    assert all(agent_may_set(key) for key in desired_labels(snap()))
    nothing_seen = replace(snap(), gpus=())
    assert desired_labels(nothing_seen) == {}


def test_node_patch_sets_only_changed_labels_with_a_precondition() -> None:
    current = node(labels={"nvidia.com/gpu.count": "2", "kubernetes.io/hostname": "n1"})
    patch = node_patch(current, snap())
    assert patch is not None
    assert patch["metadata"]["resourceVersion"] == "7"
    assert "nvidia.com/gpu.count" not in patch["metadata"]["labels"]
    assert patch["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert "spec" not in patch
    assert node_patch(applied(current, patch), snap()) is None


@pytest.mark.parametrize("bad", ["Lost", "Unhealthy"])
def test_taint_while_a_gpu_is_unhealthy_or_lost_and_removed_on_recovery(bad: str) -> None:
    others = [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]
    labelled = applied(node(), node_patch(node(), snap()))
    current = applied(labelled, {"spec": {"taints": others}})
    sick = snap(gpu(0), gpu(1, bad))
    patch = node_patch(current, sick)
    assert patch is not None
    assert patch["spec"]["taints"] == [
        *others,
        {"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"},
    ]
    tainted = applied(current, patch)
    assert node_patch(tainted, sick) is None
    healed = node_patch(tainted, snap())
    assert healed is not None
    assert healed["spec"]["taints"] == others


@pytest.mark.parametrize("mild", ["Degraded", "NeedsReset", "Unknown"])
def test_milder_states_do_not_taint(mild: str) -> None:
    current = applied(node(), node_patch(node(), snap()))
    assert node_patch(current, snap(gpu(0), gpu(1, mild))) is None


# --- Node condition ----------------------------------------------------------------------------


def test_condition_written_on_change_only_with_a_stable_transition_time() -> None:
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True"}]}
    current: dict[str, Any] = {"status": status}
    patch = condition_patch(current, snap(), now=NOW)
    assert patch is not None
    (cond,) = patch["status"]["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == (
        CONDITION_TYPE,
        "True",
        "AllGPUsHealthy",
    )
    assert cond["message"] == "all 2 GPUs healthy"
    status["conditions"].append(cond)
    assert condition_patch(current, snap(), now=NOW + timedelta(minutes=5)) is None
    degraded = condition_patch(current, snap(gpu(0), gpu(1, "Degraded")), now=NOW + timedelta(1))
    assert degraded is not None
    (d,) = degraded["status"]["conditions"]
    assert (d["status"], d["reason"]) == ("True", "GPUDegraded")
    assert d["lastTransitionTime"] == cond["lastTransitionTime"]  # still True
    lost = condition_patch(
        current, snap(gpu(0, "Lost"), gpu(1, "Degraded")), now=NOW + timedelta(2)
    )
    assert lost is not None
    (x,) = lost["status"]["conditions"]
    assert (x["status"], x["reason"]) == ("False", "GPULost")
    assert x["message"] == "GPU 0 Lost: why Lost; GPU 1 Degraded: why Degraded"
    assert x["lastTransitionTime"] != cond["lastTransitionTime"]


def test_condition_when_nvml_finds_no_gpu() -> None:
    empty = replace(snap(), gpus=(), health="Unknown")
    patch = condition_patch({}, empty, now=NOW)
    assert patch is not None
    (cond,) = patch["status"]["conditions"]
    assert (cond["status"], cond["reason"]) == ("Unknown", "NoGPUs")


def test_condition_when_nvml_never_came_up() -> None:
    down = replace(snap(), gpus=(), nvml_ok=False, nvml_error="Driver Not Loaded", health="Unknown")
    patch = condition_patch({}, down, now=NOW)
    assert patch is not None
    (cond,) = patch["status"]["conditions"]
    assert (cond["status"], cond["reason"]) == ("Unknown", "NVMLUnavailable")


# --- Lease -------------------------------------------------------------------------------------


def test_lease_renewal_keeps_acquire_time_for_the_same_holder() -> None:
    first = agent_lease_body("n1", "gpumesh-system", holder="n1", duration_s=40, now=NOW)
    assert first["metadata"]["name"] == "gpumesh-agent-n1"
    assert first["spec"]["renewTime"] == "2026-05-01T12:00:00.000000Z"
    first["metadata"]["resourceVersion"] = "5"
    later = NOW + timedelta(seconds=10)
    renewed = agent_lease_body(
        "n1", "gpumesh-system", holder="n1", duration_s=40, now=later, current=first
    )
    assert renewed["spec"]["acquireTime"] == first["spec"]["acquireTime"]
    assert renewed["spec"]["renewTime"] == "2026-05-01T12:00:10.000000Z"
    assert renewed["metadata"]["resourceVersion"] == "5"


def test_a_lease_without_a_read_keeps_the_acquire_time_it_is_given() -> None:
    started = NOW - timedelta(hours=1)
    body = lease_body("op", "ns", holder="op", duration_s=90, now=NOW, acquired=started)
    assert body["spec"]["acquireTime"] == started.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert "resourceVersion" not in body["metadata"]
    assert lease_terms(body) == (body["spec"]["renewTime"], 90)
    assert lease_expiry(body) == NOW + timedelta(seconds=90)
