"""The two sides of admission: requests waiting for GPUs and workloads holding them.

A GPUCluster or a Job with a cluster template asks for GPUs; a Job that names an
existing GPUCluster does not (it runs on that cluster's GPUs) and is not a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

from gpumesh.api.gpucluster import GPUClusterSpec, PreemptionPolicy
from gpumesh.api.job import JobSpec
from gpumesh.operator.placement.decision import Assignment, NodeUsage
from gpumesh.operator.placement.matching import group_constraints
from gpumesh.operator.placement.quantity import cpu_millicores, memory_bytes

WorkloadKind = Literal["GPUCluster", "Job"]


def workload_key(kind: str, namespace: str, name: str) -> str:
    """``GPUCluster/team-a/train``: unique across kinds and namespaces."""
    return f"{kind}/{namespace}/{name}"


@dataclass(frozen=True, slots=True)
class Request:
    """A workload waiting for placement (new, or running and wanting a new shape)."""

    kind: WorkloadKind
    namespace: str
    name: str
    spec: GPUClusterSpec
    created: datetime
    priority: int = 0
    preemption_policy: PreemptionPolicy = "LowerPriority"
    current: tuple[Assignment, ...] = ()
    current_head: str | None = None
    keep_unhealthy: bool = False
    """Leave current workers on unhealthy nodes (see :func:`place_cluster`)."""

    @property
    def key(self) -> str:
        return workload_key(self.kind, self.namespace, self.name)

    @property
    def gpus(self) -> int:
        """GPUs the request holds once admitted; none while suspended."""
        if self.spec.suspend:
            return 0
        return sum(g.gpus for _, g in self.spec.worker_groups())

    @classmethod
    def for_cluster(
        cls,
        namespace: str,
        name: str,
        spec: GPUClusterSpec,
        created: datetime,
        current: tuple[Assignment, ...] = (),
        current_head: str | None = None,
    ) -> Request:
        return cls(
            "GPUCluster",
            namespace,
            name,
            spec,
            created,
            spec.priority,
            spec.preemption_policy,
            current,
            current_head,
        )

    @classmethod
    def for_job(cls, namespace: str, name: str, spec: JobSpec, created: datetime) -> Request | None:
        """The Job's own cluster as a request; None for a Job on an existing GPUCluster."""
        if spec.cluster_template is None:
            return None
        template = spec.cluster_template.model_copy(update={"suspend": spec.suspend})
        return cls("Job", namespace, name, template, created, spec.priority, spec.preemption_policy)


@dataclass(frozen=True, slots=True)
class Running:
    """An admitted workload and what it holds; preemption may take it back."""

    kind: WorkloadKind
    namespace: str
    name: str
    spec: GPUClusterSpec
    created: datetime
    assignments: tuple[Assignment, ...]
    head_node: str | None = None
    priority: int = 0

    @property
    def key(self) -> str:
        return workload_key(self.kind, self.namespace, self.name)

    @property
    def gpus(self) -> int:
        return sum(a.gpus for a in self.assignments)

    @property
    def price_per_hour(self) -> Decimal:
        return sum((a.price_per_hour for a in self.assignments), Decimal(0))

    def usage(self) -> tuple[NodeUsage, ...]:
        """GPUs, CPU and memory held per node, the head's included."""
        return holdings(self.spec, self.assignments, self.head_node)


def holdings(
    spec: GPUClusterSpec, assignments: tuple[Assignment, ...], head_node: str | None
) -> tuple[NodeUsage, ...]:
    """Per node, what these assignments and head hold, with the spec's CPU and memory."""
    per_worker = {
        name: group_constraints(spec, name, group) for name, group in spec.worker_groups()
    }
    totals: dict[str, list[int]] = {}
    for a in assignments:
        cons = per_worker.get(a.group)
        cpu = cons.cpu_per_worker if cons else 0
        memory = cons.memory_per_worker if cons else 0
        held = totals.setdefault(a.node, [0, 0, 0])
        held[0] += a.gpus
        held[1] += a.workers * cpu
        held[2] += a.workers * memory
    if head_node is not None:
        held = totals.setdefault(head_node, [0, 0, 0])
        held[1] += cpu_millicores(spec.head.cpu)
        held[2] += memory_bytes(spec.head.memory)
    return tuple(NodeUsage(node, *values) for node, values in sorted(totals.items()))
