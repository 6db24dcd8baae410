"""Preemption: the fewest lower-priority workloads whose GPUs let a request fit.

Only workloads of strictly lower priority are ever taken, and only when the request's
policy is LowerPriority. Candidates are tried lowest priority first; the search returns
a single victim when one is enough, else an irreducible set: every victim in it is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpumesh.operator.placement.decision import Decision
from gpumesh.operator.placement.explain import count
from gpumesh.operator.placement.gang import plan_cluster
from gpumesh.operator.placement.index import InventoryIndex, Ledger
from gpumesh.operator.placement.matching import group_constraints, kind_of
from gpumesh.operator.placement.workload import Request, Running

#: Most candidates a search considers: each costs one trial placement.
MAX_CANDIDATES = 64


@dataclass(frozen=True, slots=True)
class Preemption:
    """One workload to stop for another, with the event text for each side."""

    victim: Running
    preemptor: str
    victim_message: str
    preemptor_message: str


def find_preemption(
    request: Request,
    index: InventoryIndex,
    ledger: Ledger,
    running: Sequence[Running],
    limit: int = MAX_CANDIDATES,
) -> tuple[tuple[Preemption, ...], Decision] | None:
    """Victims whose release lets ``request`` fit, and the placement it then gets."""
    if request.preemption_policy != "LowerPriority":
        return None
    candidates = _candidates(request, index, running)[:limit]
    if not candidates:
        return None

    def trial(victims: Sequence[Running]) -> Decision:
        overlay = Ledger(base=ledger)
        for victim in victims:
            for held in victim.usage():
                overlay.take(held.node, -held.gpus, -held.cpu_millicores, -held.memory_bytes)
        return plan_cluster(
            request.spec,
            index,
            overlay,
            current=request.current,
            current_head=request.current_head,
            explain=False,
            keep_unhealthy=request.keep_unhealthy,
        )

    if not trial(candidates).ok:
        return None
    for victim in candidates:
        decision = trial([victim])
        if decision.ok:
            return _preemptions(request, [victim], decision), decision
    chosen: list[Running] = []
    for victim in candidates:
        chosen.append(victim)
        decision = trial(chosen)
        if decision.ok:
            break
    for victim in list(chosen):
        fewer = [v for v in chosen if v is not victim]
        smaller = trial(fewer)
        if smaller.ok:
            chosen, decision = fewer, smaller
    return _preemptions(request, chosen, decision), decision


def _candidates(
    request: Request, index: InventoryIndex, running: Sequence[Running]
) -> list[Running]:
    """Lower-priority workloads holding GPUs the request could use, best victims first.

    Lowest priority first; then those holding the most usable GPUs (fewer victims);
    then the youngest (least work lost).
    """
    groups = [
        (index.kinds_for(g.gpu), group_constraints(request.spec, name, g))
        for name, g in request.spec.worker_groups()
    ]
    scored = []
    for workload in running:
        if workload.priority >= request.priority or workload.key == request.key:
            continue
        usable = 0
        for a in workload.assignments:
            offer = index.by_name.get(a.node)
            if offer is None or not offer.accepts_work:
                continue
            if any(kind_of(offer) in kinds and cons.admits(offer) for kinds, cons in groups):
                usable += a.gpus
        if usable:
            scored.append(
                (workload.priority, -usable, -workload.created.timestamp(), workload.key, workload)
            )
    return [entry[-1] for entry in sorted(scored, key=lambda e: e[:4])]


def _preemptions(
    request: Request, victims: Sequence[Running], decision: Decision
) -> tuple[Preemption, ...]:
    names = ", ".join(f"{v.kind} {v.namespace}/{v.name}" for v in victims)
    who = f"{request.kind} {request.namespace}/{request.name}"
    out = []
    for victim in victims:
        nodes = sorted({a.node for a in victim.assignments})
        shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        out.append(
            Preemption(
                victim=victim,
                preemptor=request.key,
                victim_message=(
                    f"preempted by {who} (priority {request.priority} > {victim.priority}) "
                    f"to free {count(victim.gpus, 'GPU')} on {shown}"
                ),
                preemptor_message=(
                    f"preempting {count(len(victims), 'lower-priority workload')} ({names}) "
                    f"to fit: {decision.explanation}"
                ),
            )
        )
    return tuple(out)
