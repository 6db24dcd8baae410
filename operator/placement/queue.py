"""Admission: which pending GPUClusters and Jobs get GPUs now, in what order, and why not.

Order: higher priority first, then older first (then kind, namespace and name, so the
order is total and the pass deterministic).

Backfill with a starvation barrier (Kueue's BestEffortFIFO plus an age limit): a request
that does not fit does not stop the requests behind it, so small work uses capacity a
big request cannot. Once a request has waited ``starvation_seconds`` for capacity it
could have on an idle mesh, it becomes a barrier: later requests may no longer take GPUs
on any node the barrier could use; they wait behind it (or fit elsewhere), so capacity
drains towards it.
Requests blocked by their namespace's GPUQuota or by limits no node meets never become
barriers: nothing other workloads free would help them.

Preemption: a request with preemptionPolicy LowerPriority that lacks capacity may take
GPUs from strictly lower-priority running workloads (see :mod:`.preemption`). What the
victims held is not offered to anyone else in the same pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Final, Literal

from gpumesh.operator.placement.decision import Decision, NodeUsage
from gpumesh.operator.placement.explain import REASON_NO_CAPACITY
from gpumesh.operator.placement.gang import plan_cluster
from gpumesh.operator.placement.index import InventoryIndex, Ledger, as_index
from gpumesh.operator.placement.inventory import NodeOffer
from gpumesh.operator.placement.matching import group_constraints, kind_of
from gpumesh.operator.placement.preemption import Preemption, find_preemption
from gpumesh.operator.placement.quota import QuotaLimit, Usage, gpus_over_quota, price_over_quota
from gpumesh.operator.placement.scoring import Weights
from gpumesh.operator.placement.workload import Request, Running

Outcome = Literal["Admitted", "Preempting", "Queued", "Suspended"]

REASON_ADMITTED: Final = "Admitted"
REASON_PREEMPTING: Final = "Preempting"
REASON_QUOTA: Final = "QuotaExceeded"
REASON_BEHIND: Final = "BehindStarvingRequest"
REASON_SUSPENDED: Final = "Suspended"


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """Tunables of the admission pass."""

    starvation_seconds: float = 600.0
    """How long a request may wait for capacity before later requests wait for it."""
    max_preemption_candidates: int = 64
    """Most running workloads one preemption search tries."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the pass decided for one request, ready for a condition and an event."""

    request: Request
    outcome: Outcome
    reason: str
    explanation: str
    decision: Decision | None = None
    position: int | None = None
    """Place among the requests still queued after this pass; 0 is next."""
    preemptions: tuple[Preemption, ...] = ()


@dataclass(frozen=True)
class AdmissionResult:
    """Every request's verdict, in queue order, and namespace usage after the pass.

    Preempted workloads still count in ``usage`` until they are gone.
    """

    verdicts: tuple[Verdict, ...]
    usage: Mapping[str, Usage] = field(default_factory=dict)

    def outcome_of(self, key: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.request.key == key), None)

    @property
    def admitted(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.outcome == "Admitted")

    @property
    def preemptions(self) -> tuple[Preemption, ...]:
        return tuple(p for v in self.verdicts for p in v.preemptions)


def queue_order(backlog: Sequence[Request]) -> list[Request]:
    """Priority first, then age; the rest only makes the order total."""
    return sorted(backlog, key=lambda r: (-r.priority, r.created, r.kind, r.namespace, r.name))


def admit(
    backlog: Sequence[Request],
    inventory: Sequence[NodeOffer],
    *,
    now: datetime,
    running: Sequence[Running] = (),
    quotas: Mapping[str, QuotaLimit] = {},
    reserved: Mapping[str, int] = {},
    policy: AdmissionPolicy = AdmissionPolicy(),
    weights: Weights | None = None,
) -> AdmissionResult:
    """One admission pass over ``backlog``; pure, and the same inputs give the same result.

    ``inventory`` counts only pods gpumesh does not manage (as for :func:`place_cluster`);
    ``running`` lists admitted gpumesh workloads, whose holdings the pass accounts itself.
    A running workload that is also in the backlog (being rescaled) keeps what it holds
    unless the pass admits its new shape.
    """
    return _Pass(as_index(inventory, weights), running, quotas, reserved, now, policy).run(backlog)


class _Pass:
    """One pass: a ledger of what is held, namespace usage, and the barriers raised."""

    def __init__(
        self,
        index: InventoryIndex,
        running: Sequence[Running],
        quotas: Mapping[str, QuotaLimit],
        reserved: Mapping[str, int],
        now: datetime,
        policy: AdmissionPolicy,
    ) -> None:
        self.index = index
        self.quotas = quotas
        self.now = now
        self.policy = policy
        self.ledger = Ledger.of_reserved(reserved)
        self.usage: dict[str, Usage] = {}
        self.running = {w.key: w for w in sorted(running, key=lambda w: w.key)}
        self.preempted: set[str] = set()
        self.barriers: list[_Barrier] = []
        self.barrier_nodes: set[str] = set()
        for workload in self.running.values():
            self.hold(workload.usage())
            self.charge(workload.namespace, workload.gpus, workload.price_per_hour)

    def hold(self, usage: Sequence[NodeUsage], sign: int = 1) -> None:
        for held in usage:
            self.ledger.take(
                held.node, sign * held.gpus, sign * held.cpu_millicores, sign * held.memory_bytes
            )

    def charge(self, namespace: str, gpus: int, price: Decimal) -> None:
        self.usage[namespace] = self.usage.get(namespace, Usage()).plus(gpus, price)

    def run(self, backlog: Sequence[Request]) -> AdmissionResult:
        verdicts = [self.decide(self.with_holdings(r)) for r in queue_order(backlog)]
        position = 0
        numbered = []
        for verdict in verdicts:
            if verdict.outcome == "Queued":
                verdict = _with_position(verdict, position)
                position += 1
            numbered.append(verdict)
        return AdmissionResult(tuple(numbered), dict(sorted(self.usage.items())))

    def with_holdings(self, request: Request) -> Request:
        """A running workload asking again starts from what it holds."""
        held = self.running.get(request.key)
        if held is None or request.current:
            return request
        return Request(
            request.kind,
            request.namespace,
            request.name,
            request.spec,
            request.created,
            request.priority,
            request.preemption_policy,
            held.assignments,
            request.current_head or held.head_node,
            request.keep_unhealthy,
        )

    def decide(self, request: Request) -> Verdict:
        if request.spec.suspend:
            return Verdict(request, "Suspended", REASON_SUSPENDED, "suspended: holds no GPUs")
        own = self.running.get(request.key)
        # Shrinking what already runs never waits: it only gives GPUs back.
        grows = own is None or request.gpus > own.gpus
        # What the request holds now is its own to re-place, and leaves its quota use.
        overlay = self.ledger if own is None else Ledger(base=self.ledger)
        used = self.usage.get(request.namespace, Usage())
        if own is not None:
            for held in own.usage():
                overlay.take(held.node, -held.gpus, -held.cpu_millicores, -held.memory_bytes)
            used = used.plus(-own.gpus, -own.price_per_hour)
        limit = self.quotas.get(request.namespace)
        over = gpus_over_quota(request.namespace, limit, used, request.gpus) if grows else None
        if over:
            return Verdict(request, "Queued", REASON_QUOTA, over)
        decision = plan_cluster(
            request.spec,
            self.index,
            overlay,
            current=request.current,
            current_head=request.current_head,
            avoid=self.wanted_by_barrier if grows and self.barriers else None,
            keep_unhealthy=request.keep_unhealthy,
        )
        if not decision.ok and grows and self.barriers:
            blocker = self.barrier_against(request, overlay)
            if blocker is not None:
                return Verdict(
                    request,
                    "Queued",
                    REASON_BEHIND,
                    f"waiting behind {blocker.kind} {blocker.namespace}/{blocker.name}, "
                    f"which has waited {self.waited(blocker) / 60:.0f} min for the GPUs "
                    "this would take",
                    decision,
                )
        preemptions: tuple[Preemption, ...] = ()
        if not decision.ok and decision.reason == REASON_NO_CAPACITY:
            candidates = [w for k, w in self.running.items() if k not in self.preempted]
            found = find_preemption(
                request, self.index, overlay, candidates, self.policy.max_preemption_candidates
            )
            if found is not None:
                preemptions, decision = found
        if not decision.ok:
            return self.queued(request, decision)
        cheaper = own is not None and decision.price_per_hour <= own.price_per_hour
        over = (
            None
            if cheaper
            else price_over_quota(request.namespace, limit, used, decision.price_per_hour)
        )
        if over:
            return Verdict(request, "Queued", REASON_QUOTA, over, decision)
        self.commit(request, own, decision, preemptions)
        if preemptions:
            return Verdict(
                request,
                "Preempting",
                REASON_PREEMPTING,
                preemptions[0].preemptor_message,
                decision,
                preemptions=preemptions,
            )
        return Verdict(request, "Admitted", REASON_ADMITTED, decision.explanation, decision)

    def wanted_by_barrier(self, offer: NodeOffer) -> bool:
        return offer.name in self.barrier_nodes

    def barrier_against(self, request: Request, ledger: Ledger) -> Request | None:
        """The starving request whose nodes alone would have let ``request`` fit."""
        unhindered = plan_cluster(
            request.spec,
            self.index,
            ledger,
            current=request.current,
            current_head=request.current_head,
            explain=False,
            keep_unhealthy=request.keep_unhealthy,
        )
        if not unhindered.ok:
            return None
        for held in unhindered.usage:
            offer = self.index.by_name[held.node]
            for barrier in self.barriers:
                if held.gpus and barrier.wants(offer):
                    return barrier.request
        return self.barriers[0].request

    def queued(self, request: Request, decision: Decision) -> Verdict:
        text = decision.explanation
        if decision.reason == REASON_NO_CAPACITY and self.waited(request) >= (
            self.policy.starvation_seconds
        ):
            barrier = _Barrier(request, self.index)
            self.barriers.append(barrier)
            self.barrier_nodes |= barrier.nodes(self.index)
            text += "; later requests for the same GPUs now wait for this one"
        return Verdict(request, "Queued", decision.reason, text, decision)

    def commit(
        self,
        request: Request,
        own: Running | None,
        decision: Decision,
        preemptions: tuple[Preemption, ...],
    ) -> None:
        """Book the placement; the GPUs of its victims stay booked for it alone."""
        if own is not None:
            self.hold(own.usage(), sign=-1)
            self.charge(request.namespace, -own.gpus, -own.price_per_hour)
            del self.running[own.key]
        freed: dict[str, list[int]] = {}
        for preemption in preemptions:
            self.preempted.add(preemption.victim.key)
            for held in preemption.victim.usage():
                entry = freed.setdefault(held.node, [0, 0, 0])
                entry[0] += held.gpus
                entry[1] += held.cpu_millicores
                entry[2] += held.memory_bytes
        for held in decision.usage:
            gone = freed.get(held.node, [0, 0, 0])
            self.ledger.take(
                held.node,
                max(0, held.gpus - gone[0]),
                max(0, held.cpu_millicores - gone[1]),
                max(0, held.memory_bytes - gone[2]),
            )
        self.charge(request.namespace, decision.gpus, decision.price_per_hour)

    def waited(self, request: Request) -> float:
        return (self.now - request.created).total_seconds()


class _Barrier:
    """A starving request and the nodes it could use."""

    def __init__(self, request: Request, index: InventoryIndex) -> None:
        self.request = request
        self.groups = [
            (frozenset(index.kinds_for(g.gpu)), group_constraints(request.spec, name, g))
            for name, g in request.spec.worker_groups()
        ]

    def wants(self, offer: NodeOffer) -> bool:
        kind = kind_of(offer)
        return any(kind in kinds and cons.admits(offer) for kinds, cons in self.groups)

    def nodes(self, index: InventoryIndex) -> set[str]:
        """Every node of the inventory the barrier could use."""
        kinds = frozenset().union(*(kinds for kinds, _ in self.groups))
        return {o.name for o in index.nodes_of(sorted(kinds)) if self.wants(o)}


def _with_position(verdict: Verdict, position: int) -> Verdict:
    return Verdict(
        verdict.request,
        verdict.outcome,
        verdict.reason,
        verdict.explanation,
        verdict.decision,
        position,
        verdict.preemptions,
    )
