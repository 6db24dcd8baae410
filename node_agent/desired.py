"""What the API objects should say about this node, and the smallest patch to get there.

Pure: each function takes a snapshot plus the object as last read and returns a patch, or
None when the object already says it. The reporter writes only those patches, so a steady
node costs the API server one status write per heartbeat period (30 s) and one Lease
renewal every few seconds, nothing per sweep.

What changes a GPUNode status: health, reasons, identity, versions, proof. What
does not: temperature and power (they ride along with the next heartbeat write) and the
heartbeat itself, refreshed at most every ``heartbeat_s``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

from gpumesh.api.base import Condition, ConditionStatus, ObjectMeta
from gpumesh.api.gpunode import (
    GPUInfo,
    GPUNode,
    GPUNodeSpec,
    GPUNodeStatus,
    Proof,
)
from gpumesh.api.lease import lease_body
from gpumesh.api.nodes import (
    CONDITION_TYPE,
    LABEL_COMPUTE_MAJOR,
    LABEL_COMPUTE_MINOR,
    LABEL_COUNT,
    LABEL_MEMORY,
    LABEL_NODE,
    LABEL_PRODUCT,
    TAINT_KEY,
    lease_name,
)
from gpumesh.node_agent.health import SEVERITY, needs_taint
from gpumesh.node_agent.snapshot import NodeSnapshot

TELEMETRY_FIELDS: Final = frozenset({"temperatureC", "powerW"})
"""Per-GPU fields that change every sweep: written with heartbeats, never a reason to write."""
AGENT_STATUS_FIELDS: Final = (
    "health",
    "gpuCount",
    "gpuModel",
    "gpus",
    "driverVersion",
    "cudaVersion",
    "heartbeatTime",
    "proof",
    "observedGeneration",
)
"""The GPUNode status fields the agent owns; verification, reputation and conditions are the
operator's, and ``mesh`` is shared field by field with the mesh agent and the operator."""


def gfd_product(model: str) -> str:
    """GPU feature discovery's ``nvidia.com/gpu.product`` value: spaces become dashes."""
    value = re.sub(r"\s+", "-", model.strip())
    return re.sub(r"[^A-Za-z0-9._-]", "_", value)[:63].strip("-_.")


# --- GPUNode ---------------------------------------------------------------------------------


def new_gpunode(
    node: str,
    supplier: str,
    region: str,
    price_per_gpu_hour: str,
    *,
    head_capable: bool = False,
    public_endpoint: str | None = None,
) -> dict[str, Any]:
    """A GPUNode for a node whose supplier side has not created one (validated here)."""
    fields: dict[str, Any] = {
        "supplier": supplier,
        "region": region,
        "pricePerGpuHour": price_per_gpu_hour,
        "headCapable": head_capable,
    }
    if public_endpoint is not None:
        fields["publicEndpoint"] = public_endpoint
    spec = GPUNodeSpec.model_validate(fields)
    return GPUNode(metadata=ObjectMeta(name=node), spec=spec).to_api()


def desired_status(
    snapshot: NodeSnapshot,
    *,
    heartbeat: datetime,
    proof: Proof | None = None,
    generation: int | None = None,
) -> GPUNodeStatus:
    """The agent's part of the GPUNode status for a snapshot."""
    gpus = [
        GPUInfo(
            index=g.index,
            uuid=g.identity.uuid,
            model=g.identity.name,
            memory_mib=g.identity.memory_total_mib,
            compute_capability=g.identity.compute_capability,
            pci_bus_id=g.identity.pci_bus_id,
            health=g.health,
            reasons=list(g.reasons[:16]),
            temperature_c=None if g.sample is None else g.sample.temperature_c,
            power_w=None if g.sample is None else g.sample.power_w,
        )
        for g in snapshot.gpus
        if g.identity is not None
    ]
    return GPUNodeStatus(
        health=snapshot.health,
        gpu_count=len(snapshot.gpus),
        gpu_model=snapshot.gpu_model,
        gpus=gpus,
        driver_version=snapshot.driver_version,
        cuda_version=snapshot.cuda_version,
        heartbeat_time=heartbeat,
        proof=proof,
        observed_generation=generation,
    )


def _owned(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: status[k] for k in AGENT_STATUS_FIELDS if k in status}


def _significant(owned: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in owned.items() if k != "heartbeatTime"}
    if "gpus" in out:
        out["gpus"] = [
            {k: v for k, v in gpu.items() if k not in TELEMETRY_FIELDS} for gpu in out["gpus"]
        ]
    return out


def _normalised(status: Mapping[str, Any]) -> dict[str, Any]:
    """Our fields of the server's status in our wire form, so formatting differences are
    no change. Others' fields are left out: one we cannot parse must not make us write."""
    owned = _owned(status)
    try:
        return GPUNodeStatus.model_validate(owned).to_api()
    except ValueError:
        return owned  # our own fields unreadable: certainly different, so rewritten


def status_patch(
    current: Mapping[str, Any] | None,
    snapshot: NodeSnapshot,
    *,
    now: datetime,
    heartbeat_s: float,
    proof: Proof | None = None,
) -> dict[str, Any] | None:
    """A merge patch for the GPUNode status subresource, or None when nothing changed.

    ``proof`` None keeps whatever the object holds (an agent restart must not erase an
    earlier answer). Fields the agent owns but no longer has are set to null.
    """
    obj = current or {}
    generation = (obj.get("metadata") or {}).get("generation")
    status_now = _normalised(obj.get("status") or {})
    if proof is None and "proof" in status_now:
        proof = Proof.model_validate(status_now["proof"])
    wanted = desired_status(snapshot, heartbeat=now, proof=proof, generation=generation).to_api()
    have = _owned(status_now)
    beat = have.get("heartbeatTime")
    fresh = False
    if isinstance(beat, str):
        try:
            age = now - datetime.fromisoformat(beat.replace("Z", "+00:00"))
            fresh = timedelta(0) <= age < timedelta(seconds=heartbeat_s)
        except ValueError:
            fresh = False
    if fresh and _significant(_owned(wanted)) == _significant(have):
        return None
    body: dict[str, Any] = {k: wanted.get(k) for k in AGENT_STATUS_FIELDS}
    if proof is None:
        body.pop("proof")
    return {"status": body}


# --- Node ------------------------------------------------------------------------------------


def desired_labels(snapshot: NodeSnapshot) -> dict[str, str]:
    """GFD-style GPU labels, once a GPU has been seen. Which supplier and region a node
    belongs to is the mesh operator's word (it labels the node when admitting it)."""
    labels: dict[str, str] = {}
    model = snapshot.gpu_model
    if model is not None:
        labels[LABEL_PRODUCT] = gfd_product(model)
        labels[LABEL_COUNT] = str(len(snapshot.gpus))
        memory = snapshot.gpu_memory_mib
        if memory is not None:
            labels[LABEL_MEMORY] = str(memory)
        cc = next((i.compute_capability for i in snapshot.identities if i.name == model), None)
        if cc and "." in cc:
            labels[LABEL_COMPUTE_MAJOR], labels[LABEL_COMPUTE_MINOR] = cc.split(".", 1)
    return labels


def _taints_with(current: Sequence[Mapping[str, Any]], wanted: bool) -> list[dict[str, Any]] | None:
    ours = [t for t in current if t.get("key") == TAINT_KEY]
    others = [dict(t) for t in current if t.get("key") != TAINT_KEY]
    taint = {"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}
    if wanted:
        if len(ours) == 1 and {k: ours[0].get(k) for k in taint} == taint:
            return None
        return [*others, taint]
    return others if ours else None


def node_patch(node: Mapping[str, Any], snapshot: NodeSnapshot) -> dict[str, Any] | None:
    """A merge patch for labels and the gpu-unhealthy taint, or None.

    Taints are a list without a merge key, so the patch carries the whole list and the
    node's resourceVersion: a concurrent writer makes it fail with 409 instead of being
    overwritten, and the reporter reads again and retries.
    """
    meta = node.get("metadata") or {}
    current_labels: Mapping[str, str] = meta.get("labels") or {}
    wanted = desired_labels(snapshot)
    changed = {k: v for k, v in wanted.items() if current_labels.get(k) != v}
    taints = _taints_with(
        (node.get("spec") or {}).get("taints") or [],
        needs_taint(g.health for g in snapshot.gpus),
    )
    if not changed and taints is None:
        return None
    patch: dict[str, Any] = {"metadata": {"resourceVersion": meta.get("resourceVersion")}}
    if changed:
        patch["metadata"]["labels"] = changed
    if taints is not None:
        patch["spec"] = {"taints": taints}
    return patch


_CONDITION_STATUS: Final[dict[str, ConditionStatus]] = {
    "Healthy": "True",
    "Degraded": "True",
    "Unknown": "Unknown",
}


def desired_condition(snapshot: NodeSnapshot) -> Condition:
    """The Node's GPUHealthy condition (True for Healthy and Degraded nodes)."""
    health = snapshot.health
    bad = [g for g in snapshot.gpus if g.health != "Healthy"]
    bad.sort(key=lambda g: (-SEVERITY[g.health], g.index))
    status: ConditionStatus
    if not snapshot.nvml_ok and not snapshot.gpus:
        status, reason = "Unknown", "NVMLUnavailable"
        message = f"NVML unavailable: {snapshot.nvml_error or 'not initialised'}"
    elif not snapshot.gpus:
        status, reason, message = "Unknown", "NoGPUs", "NVML answers but reports no GPU"
    else:
        status = _CONDITION_STATUS.get(health, "False")
        reason = "AllGPUsHealthy" if health == "Healthy" else f"GPU{health}"
        if not bad:
            message = f"all {len(snapshot.gpus)} GPUs healthy"
        else:
            message = "; ".join(
                f"GPU {g.index} {g.health}: {', '.join(g.reasons[:2]) or 'no detail'}" for g in bad
            )
    return Condition(type=CONDITION_TYPE, status=status, reason=reason, message=message[:1024])


def condition_patch(
    node: Mapping[str, Any], snapshot: NodeSnapshot, *, now: datetime
) -> dict[str, Any] | None:
    """A strategic-merge patch for the Node status condition, or None when unchanged.

    Node conditions merge by type, so this touches only GPUHealthy; kubelet's (or kwok's)
    Ready condition is left alone. lastTransitionTime moves only when the status flips.
    """
    wanted = desired_condition(snapshot)
    conditions = (node.get("status") or {}).get("conditions") or []
    have = next((c for c in conditions if c.get("type") == CONDITION_TYPE), None)
    if have is not None and all(
        have.get(k, "") == getattr(wanted, k) for k in ("status", "reason", "message")
    ):
        return None
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    transition = stamp
    if have is not None and have.get("status") == wanted.status:
        transition = have.get("lastTransitionTime") or stamp
    body = {
        "type": CONDITION_TYPE,
        "status": wanted.status,
        "reason": wanted.reason,
        "message": wanted.message,
        "lastHeartbeatTime": stamp,
        "lastTransitionTime": transition,
    }
    return {"status": {"conditions": [body]}}


# --- Lease -----------------------------------------------------------------------------------


def agent_lease_body(
    node: str,
    namespace: str,
    *,
    holder: str,
    duration_s: int,
    now: datetime,
    current: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``node``'s agent heartbeat Lease, renewed at ``now``."""
    return lease_body(
        lease_name(node),
        namespace,
        holder=holder,
        duration_s=duration_s,
        now=now,
        labels={"app.kubernetes.io/name": "gpumesh-agent", LABEL_NODE: node},
        current=current,
    )
