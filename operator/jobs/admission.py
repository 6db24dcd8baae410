"""Jobs in the admission queue, and trouble under the ones that hold GPUs (pure).

Every Job with a cluster template that is neither finished, nor holding its cluster, nor
suspended, nor in a retry's backoff is a :class:`~gpumesh.operator.placement.Request`;
every one holding its cluster is a :class:`~gpumesh.operator.placement.Running` that a
higher-priority request may preempt. GPUClusters queue in the same pass, on the same
terms: priority and age, GPUQuota, preemption both ways.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from gpumesh.api.base import UnhealthyNode
from gpumesh.api.gpucluster import FailoverPolicy, WorkerPlacement
from gpumesh.api.job import JobSpec, JobStatus
from gpumesh.operator.jobs.machine import TERMINAL, JobRef
from gpumesh.operator.placement import (
    AdmissionPolicy,
    AdmissionResult,
    Assignment,
    NodeOffer,
    QuotaLimit,
    Request,
    Running,
    admit,
)
from gpumesh.operator.placement.decision import REASON_NO_HEAD
from gpumesh.operator.placement.explain import REASON_UNSATISFIABLE

#: Queue reasons no amount of waiting fixes: the request itself must change.
STALLED_REASONS: Final = frozenset({REASON_UNSATISFIABLE, REASON_NO_HEAD})
#: Node health that ends a placement at once; the others wait out failover's grace.
LOST: Final = "Lost"
TROUBLED: Final = frozenset({"NeedsReset", "Unhealthy"})


@dataclass(frozen=True)
class JobEntry:
    """One Job as admission sees it."""

    ref: JobRef
    spec: JobSpec
    status: JobStatus

    @property
    def holds_cluster(self) -> bool:
        return self.status.active_since is not None

    def waiting(self, now: datetime) -> bool:
        """Wants GPUs now: a template, not finished, not holding, not held back."""
        s = self.status
        return (
            self.spec.cluster_template is not None
            and s.phase not in TERMINAL
            and s.active_since is None
            and not self.spec.suspend
            and (s.next_attempt_time is None or s.next_attempt_time <= now)
        )

    def request(self) -> Request | None:
        return Request.for_job(self.ref.namespace, self.ref.name, self.spec, self.ref.created)

    def running(self) -> Running | None:
        template = self.spec.cluster_template
        if template is None or not self.holds_cluster or self.status.phase in TERMINAL:
            return None
        return Running(
            "Job",
            self.ref.namespace,
            self.ref.name,
            template,
            self.ref.created,
            assignments(self.status.placements),
            self.status.head_node,
            self.spec.priority,
        )


def assignments(placements: Sequence[WorkerPlacement]) -> tuple[Assignment, ...]:
    """Status placements back into placement's assignments."""
    return tuple(
        Assignment(
            group=p.group,
            node=p.node,
            workers=p.workers,
            gpus_per_worker=p.gpus // p.workers if p.workers else 0,
            supplier=p.supplier,
            region=p.region,
            gpu_model=p.gpu_model,
            price_per_gpu_hour=p.price_per_gpu_hour,
        )
        for p in placements
    )


def placements(chosen: Iterable[Assignment]) -> list[WorkerPlacement]:
    """Placement's assignments as status placements (workers > 0 only)."""
    return [
        WorkerPlacement(
            group=a.group,
            node=a.node,
            supplier=a.supplier,
            region=a.region,
            gpu_model=a.gpu_model,
            workers=a.workers,
            gpus=a.gpus,
            price_per_gpu_hour=a.price_per_gpu_hour,
        )
        for a in chosen
        if a.workers > 0
    ]


def workloads(entries: Iterable[JobEntry], now: datetime) -> tuple[list[Request], list[Running]]:
    """The Jobs waiting for GPUs, and those holding them (that preemption may take)."""
    backlog: list[Request] = []
    running: list[Running] = []
    for entry in entries:
        if entry.waiting(now):
            request = entry.request()
            if request is not None:
                backlog.append(request)
        else:
            held = entry.running()
            if held is not None:
                running.append(held)
    return backlog, running


def admission_pass(
    entries: Iterable[JobEntry],
    offers: Sequence[NodeOffer],
    *,
    now: datetime,
    reserved: Mapping[str, int],
    quotas: Mapping[str, QuotaLimit],
    policy: AdmissionPolicy | None = None,
    others: tuple[Sequence[Request], Sequence[Running]] = ((), ()),
) -> AdmissionResult:
    """One pass over every waiting Job and the ``others`` (GPUClusters), priority first."""
    backlog, running = workloads(entries, now)
    return admit(
        [*others[0], *backlog],
        offers,
        now=now,
        running=[*others[1], *running],
        quotas=quotas,
        reserved=reserved,
        policy=policy or AdmissionPolicy(),
    )


def unhealthy_since(
    remembered: Mapping[str, datetime] | None, listed: Iterable[UnhealthyNode]
) -> Mapping[str, datetime]:
    """Since when a workload's nodes are unhealthy, as ``placement_trouble`` takes it:
    this process's memory when it has one, else (after a restart) what the last status
    lists, so a failover grace runs on rather than over."""
    return remembered if remembered is not None else {n.node: n.since for n in listed}


def unhealthy_nodes(since: Mapping[str, datetime], on: Collection[str]) -> list[UnhealthyNode]:
    """The nodes of ``since`` the workload is still ``on``, as status lists them."""
    return [UnhealthyNode(node=n, since=at) for n, at in sorted(since.items()) if n in on]


@dataclass(frozen=True)
class Trouble:
    """Why a placement cannot go on (None if it can), and when to look again."""

    reason: str | None
    wake_at: datetime | None
    unhealthy_since: dict[str, datetime]
    overdue: tuple[str, ...] = ()
    """Unhealthy nodes past the grace period (Lost ones are in ``reason`` only)."""


def placement_trouble(
    nodes: Iterable[str],
    offers: Mapping[str, NodeOffer],
    known_nodes: frozenset[str],
    failover: FailoverPolicy,
    unhealthy_since: Mapping[str, datetime],
    now: datetime,
) -> Trouble:
    """Nodes under a running attempt that it must leave, following the failover policy.

    A node that is Lost (or whose Kubernetes Node is gone) is left at once. One that
    needs a reset, is unhealthy or stopped reporting is left once it stays so for the
    policy's grace period (never with mode Never); ``unhealthy_since`` remembers since
    when, and the returned copy is the caller's to keep.
    """
    since = dict(unhealthy_since)
    lost: list[str] = []
    failing: list[str] = []
    wake: datetime | None = None
    grace = timedelta(seconds=failover.unhealthy_grace_seconds)
    wanted = sorted(set(nodes))
    for node in wanted:
        offer = offers.get(node)
        if node not in known_nodes or (offer is not None and offer.health == LOST):
            lost.append(node)
            continue
        if offer is not None and offer.health not in TROUBLED:
            since.pop(node, None)
            continue
        if failover.mode == "Never":
            continue
        first = since.setdefault(node, now)
        if now - first >= grace:
            failing.append(node)
        elif wake is None or first + grace < wake:
            wake = first + grace
    for node in list(since):
        if node not in wanted:
            del since[node]
    parts = []
    if lost:
        parts.append(f"node {', '.join(lost)} lost")
    if failing:
        parts.append(
            f"node {', '.join(failing)} unhealthy for over {failover.unhealthy_grace_seconds}s"
        )
    return Trouble("; ".join(parts) or None, wake, since, tuple(failing))
