"""The supply side of placement: one :class:`NodeOffer` per node that may take work.

:func:`build_inventory` joins three raw API lists (GPUNodes, Nodes, Pods) into offers. It
is pure and tolerant: an object that does not parse is left out rather than failing the
whole inventory, because one bad supplier must not stop placement for everyone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from pydantic import ValidationError

from gpumesh.api.base import parse_compute_capability
from gpumesh.api.gpunode import ACCEPTING_HEALTH, GPUHealth, GPUNodeSpec, GPUNodeStatus
from gpumesh.api.nodes import (
    LABEL_COMPUTE_MAJOR,
    LABEL_COMPUTE_MINOR,
    LABEL_HEAD_CAPABLE,
    LABEL_MEMORY,
    LABEL_PRODUCT,
    Admission,
)
from gpumesh.operator.placement.quantity import cpu_millicores, memory_bytes
from gpumesh.operator.proof import is_verified

GPU_RESOURCE: Final = "nvidia.com/gpu"

#: Taints our worker pods tolerate; any other NoSchedule/NoExecute taint closes a node.
OUR_TAINT_PREFIXES: Final = ("gpumesh.io/",)
OUR_TAINT_KEYS: Final = frozenset({GPU_RESOURCE})
CORDON_TAINT: Final = "node.kubernetes.io/unschedulable"

#: Health that keeps running workers while failover waits (grace period, mode Never).
TOLERATED_HEALTH: Final[frozenset[str]] = ACCEPTING_HEALTH | {"NeedsReset", "Unhealthy"}
FINISHED_PHASES: Final = frozenset({"Succeeded", "Failed"})

Health = GPUHealth


@dataclass(frozen=True, slots=True)
class NodeOffer:
    """What one node offers right now. ``gpus_free`` already excludes running pods."""

    name: str
    supplier: str
    region: str
    gpu_model: str
    gpu_memory_mib: int
    compute_capability: tuple[int, int]
    gpus_total: int
    gpus_free: int
    price_per_gpu_hour: Decimal
    verified: bool
    reputation: float
    health: Health
    cordoned: bool = False
    tainted: bool = False
    head_capable: bool = False
    cpu_free_millicores: int = 0
    memory_free_bytes: int = 0
    labels: frozenset[tuple[str, str]] = frozenset()
    #: Mesh round trip in ms to peers, by node name, when the mesh has measured it.
    rtt_ms: Mapping[str, float] = field(default_factory=dict, hash=False)
    #: Every peer the agent measured but left out of ``rtt_ms`` is at least this far.
    rtt_floor_ms: float | None = None

    @property
    def accepts_work(self) -> bool:
        """May receive new workers: healthy enough, not cordoned, no foreign taint."""
        return self.health in ACCEPTING_HEALTH and not self.cordoned and not self.tainted

    def rtt_to(self, other: NodeOffer) -> float | None:
        """Measured round trip between the two nodes; None if neither side measured it.

        Each agent measures on its own, at its own time: when both sides publish the pair,
        the larger figure counts, so the answer does not depend on which side asks.
        """
        mine, theirs = self.rtt_ms.get(other.name), other.rtt_ms.get(self.name)
        if mine is None or theirs is None:
            return theirs if mine is None else mine
        return max(mine, theirs)

    def rtt_floor_to(self, other: NodeOffer) -> float | None:
        """The least round trip two nodes that do not list each other can have, or None
        when neither bounds its list.

        A floor speaks only for the peers its agent had measured when it was written, so
        the smaller of the two floors is taken: it holds as long as either side had
        measured the other, and a node too new to have been measured by one side is not
        pushed away by that side's floor.
        """
        floors = [f for f in (self.rtt_floor_ms, other.rtt_floor_ms) if f is not None]
        return min(floors) if floors else None


@dataclass
class _PodUsage:
    gpus: int = 0
    cpu_millicores: int = 0
    memory_bytes: int = 0


def build_inventory(
    gpunodes: Sequence[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
) -> list[NodeOffer]:
    """Offers for every node that has a GPUNode with known health, sorted by name.

    Nodes without a GPUNode, GPUNodes whose health is Unknown, and objects that do not
    parse are not offered. CPU-only nodes are offered with no GPUs: they can host heads.
    """
    return OfferCache().build(gpunodes, nodes, pods)


class OfferCache:
    """:func:`build_inventory` that parses again only the nodes whose inputs changed.

    Whoever feeds it replaces an object when it changes (kopf's indexes do), so the
    same object means the same input. Building a 1,000-node inventory from scratch
    parses 1,000 GPUNodes; one node's new label should cost one.
    """

    def __init__(self) -> None:
        self._memo: dict[str, tuple[object, object, _PodUsage | None, NodeOffer | None]] = {}

    def build(
        self,
        gpunodes: Sequence[Mapping[str, Any]],
        nodes: Sequence[Mapping[str, Any]],
        pods: Iterable[Mapping[str, Any]],
    ) -> list[NodeOffer]:
        usage = pod_usage(pods)
        node_by_name = {_name(n): n for n in nodes if _name(n)}
        memo: dict[str, tuple[object, object, _PodUsage | None, NodeOffer | None]] = {}
        offers = []
        for raw in gpunodes:
            name = _name(raw)
            node = node_by_name.get(name)
            if node is None:
                continue
            used = usage.get(name)
            seen = self._memo.get(name)
            if seen is not None and seen[0] is raw and seen[1] is node and seen[2] == used:
                offer = seen[3]
            else:
                offer = _offer(raw, node, used or _PodUsage())
            memo[name] = (raw, node, used, offer)
            if offer is not None:
                offers.append(offer)
        self._memo = memo
        return sorted(offers, key=lambda o: o.name)


def pod_usage(pods: Iterable[Mapping[str, Any]]) -> dict[str, _PodUsage]:
    """What bound, unfinished pods hold per node (terminating pods still hold it)."""
    usage: dict[str, _PodUsage] = {}
    for pod in pods:
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in FINISHED_PHASES:
            continue
        held = usage.setdefault(node, _PodUsage())
        gpus, cpu, memory = _pod_requests(spec)
        held.gpus += gpus
        held.cpu_millicores += cpu
        held.memory_bytes += memory
    return usage


def _pod_requests(spec: Mapping[str, Any]) -> tuple[int, int, int]:
    """Effective requests as the scheduler counts them: max(sum of containers, any init)."""
    gpus = cpu = memory = 0
    for container in spec.get("containers") or ():
        more_gpus, more_cpu, more_memory = _container_requests(container)
        gpus, cpu, memory = gpus + more_gpus, cpu + more_cpu, memory + more_memory
    for container in spec.get("initContainers") or ():
        init_gpus, init_cpu, init_memory = _container_requests(container)
        gpus, cpu, memory = max(gpus, init_gpus), max(cpu, init_cpu), max(memory, init_memory)
    overhead = spec.get("overhead") or {}
    cpu += _quantity(overhead.get("cpu"), cpu_millicores)
    memory += _quantity(overhead.get("memory"), memory_bytes)
    return gpus, cpu, memory


def _container_requests(container: Mapping[str, Any]) -> tuple[int, int, int]:
    resources = container.get("resources") or {}
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    # Extended resources and unset requests default to the limit.
    gpus = max(
        _quantity(requests.get(GPU_RESOURCE), memory_bytes),
        _quantity(limits.get(GPU_RESOURCE), memory_bytes),
    )
    cpu = _quantity(requests.get("cpu", limits.get("cpu")), cpu_millicores)
    memory = _quantity(requests.get("memory", limits.get("memory")), memory_bytes)
    return gpus, cpu, memory


def _quantity(value: Any, convert: Callable[[str | int | float], int]) -> int:
    if not isinstance(value, str | int | float):
        return 0
    try:
        return convert(value)
    except ValueError:
        return 0


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


GPU_FIELDS_PLACED_ON = ("index", "uuid", "model", "memoryMib", "computeCapability", "health")


def placement_view(status: Mapping[str, Any]) -> dict[str, Any]:
    """What of a GPUNode's status :func:`_offer` reads. A change anywhere else (the
    heartbeat, temperatures and power, the reputation's record, a challenge under way, a
    condition's time) changes no offer, so it must not rebuild the inventory."""
    verdict = status.get("verification") or {}
    mesh = status.get("mesh") or {}
    return {
        "health": status.get("health"),
        "gpuModel": status.get("gpuModel"),
        "gpus": [{k: gpu.get(k) for k in GPU_FIELDS_PLACED_ON} for gpu in status.get("gpus") or []],
        "verification": {"result": verdict.get("result"), "gpus": verdict.get("gpus")},
        "reputation": status.get("reputation"),
        "mesh": {"rttMs": mesh.get("rttMs"), "rttFloorMs": mesh.get("rttFloorMs")},
    }


def _offer(
    gpunode: Mapping[str, Any], node: Mapping[str, Any], used: _PodUsage
) -> NodeOffer | None:
    try:
        spec = GPUNodeSpec.model_validate(gpunode.get("spec") or {})
        status = GPUNodeStatus.model_validate(gpunode.get("status") or {})
    except ValidationError:
        return None
    health = _node_health(status.health, node)
    if health == "Unknown":
        return None
    admission = Admission.of(node)
    if not admission.admits(spec.supplier):
        return None  # not admitted, or not for the supplier this GPUNode claims
    labels: dict[str, str] = dict((node.get("metadata") or {}).get("labels") or {})
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    gpus_total = _quantity(allocatable.get(GPU_RESOURCE), memory_bytes)
    node_spec = node.get("spec") or {}
    cordoned, tainted = _closed(node_spec)
    return NodeOffer(
        name=_name(gpunode),
        supplier=spec.supplier,
        region=admission.region or spec.region,
        gpu_model=_gpu_model(status, labels),
        gpu_memory_mib=_gpu_memory(status, labels),
        compute_capability=_compute_capability(status, labels),
        gpus_total=gpus_total,
        gpus_free=max(0, gpus_total - used.gpus),
        price_per_gpu_hour=spec.price_per_gpu_hour,
        verified=is_verified(status),
        reputation=status.reputation if status.reputation is not None else 0.0,
        health=health,
        cordoned=cordoned or spec.cordoned,
        tainted=tainted,
        head_capable=labels.get(LABEL_HEAD_CAPABLE) == "true",
        cpu_free_millicores=max(
            0, _quantity(allocatable.get("cpu"), cpu_millicores) - used.cpu_millicores
        ),
        memory_free_bytes=max(
            0, _quantity(allocatable.get("memory"), memory_bytes) - used.memory_bytes
        ),
        labels=frozenset(labels.items()),
        rtt_ms={peer: ms for peer, ms in status.mesh.rtt_ms.items() if ms >= 0}
        if status.mesh
        else {},
        rtt_floor_ms=status.mesh.rtt_floor_ms if status.mesh else None,
    )


def _node_health(reported: Health, node: Mapping[str, Any]) -> Health:
    """The agent's word, except that a node the control plane sees NotReady is Lost."""
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") != "True":
            return "Lost"
    return reported


def _closed(node_spec: Mapping[str, Any]) -> tuple[bool, bool]:
    """(cordoned, tainted): taints we do not tolerate close a node to new work."""
    cordoned = bool(node_spec.get("unschedulable"))
    tainted = False
    for taint in node_spec.get("taints") or []:
        key = str(taint.get("key", ""))
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if key == CORDON_TAINT:
            cordoned = True
        elif key not in OUR_TAINT_KEYS and not key.startswith(OUR_TAINT_PREFIXES):
            tainted = True
    return cordoned, tainted


def _gpu_model(status: GPUNodeStatus, labels: Mapping[str, str]) -> str:
    if status.gpu_model:
        return status.gpu_model
    if status.gpus:
        return status.gpus[0].model
    return labels.get(LABEL_PRODUCT, "")


def _gpu_memory(status: GPUNodeStatus, labels: Mapping[str, str]) -> int:
    text = labels.get(LABEL_MEMORY, "")
    if text.isdigit():
        return int(text)
    return min((g.memory_mib for g in status.gpus), default=0)


def _compute_capability(status: GPUNodeStatus, labels: Mapping[str, str]) -> tuple[int, int]:
    major, minor = labels.get(LABEL_COMPUTE_MAJOR, ""), labels.get(LABEL_COMPUTE_MINOR, "")
    if major.isdigit() and minor.isdigit():
        return int(major), int(minor)
    known = [g.compute_capability for g in status.gpus if g.compute_capability]
    try:
        return min(parse_compute_capability(c) for c in known) if known else (0, 0)
    except ValueError:
        return (0, 0)
