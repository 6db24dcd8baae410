"""Gang placement of one GPUCluster: every worker of every group placed, or none.

Placement is incremental: workers already running on nodes that are still acceptable stay
where they are; only the difference to the wanted replica counts is added or removed.
That is what lets ``kubectl scale`` grow a cluster without moving its healthy workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Final, NamedTuple

from gpumesh.api.gpucluster import GPUClusterSpec
from gpumesh.api.gpunode import ACCEPTING_HEALTH
from gpumesh.operator.placement.decision import (
    REASON_NO_HEAD,
    REASON_PLACED,
    REASON_SUSPENDED,
    Assignment,
    Decision,
    NodeUsage,
)
from gpumesh.operator.placement.explain import REASON_NO_CAPACITY, count, explain_group, money
from gpumesh.operator.placement.head import choose_head, head_shortfall
from gpumesh.operator.placement.index import NOTHING, InventoryIndex, Ledger, as_index
from gpumesh.operator.placement.inventory import TOLERATED_HEALTH, NodeOffer
from gpumesh.operator.placement.matching import (
    GroupConstraints,
    HardwareKind,
    group_constraints,
    kind_of,
)
from gpumesh.operator.placement.quantity import cpu_millicores, memory_bytes
from gpumesh.operator.placement.scoring import Weights

#: Most first nodes tried when maxLatencyMs strands a greedy placement.
MAX_LATENCY_ANCHORS: Final = 16

_Free = list[tuple[NodeOffer, tuple[int, int, int], int]]
"""Candidates with their free (GPUs, millicores, bytes) and the workers that fit."""

#: Fewest candidates a group considers before it stops reading the index; more than
#: the nodes it needs, so locality and strategy have something to choose from.
MIN_CANDIDATES: Final = 16


def place_cluster(
    spec: GPUClusterSpec,
    inventory: Sequence[NodeOffer],
    *,
    current: Sequence[Assignment] = (),
    reserved: Mapping[str, int] = {},
    current_head: str | None = None,
    weights: Weights | None = None,
    keep_unhealthy: bool = False,
) -> Decision:
    """Place every worker group and the head of ``spec``, all or nothing.

    ``inventory`` is fastest as an :class:`InventoryIndex` built once and reused; a plain
    sequence is indexed on each call. Its ``gpus_free`` must still include what this
    cluster holds (build it from pods gpumesh does not manage): each ``current`` assignment
    on a still-acceptable node is kept and takes its GPUs again, so a node that lost GPUs
    keeps only the workers that still fit. ``reserved`` maps node -> GPUs held by or
    promised to other gpumesh workloads. ``keep_unhealthy`` leaves current workers on
    NeedsReset or Unhealthy nodes (failover mode Never, or still within its grace period);
    workers on Lost or vanished nodes always move. Same inputs, same decision.
    """
    return plan_cluster(
        spec,
        as_index(inventory, weights),
        Ledger.of_reserved(reserved),
        current=current,
        current_head=current_head,
        keep_unhealthy=keep_unhealthy,
    )


def plan_cluster(
    spec: GPUClusterSpec,
    index: InventoryIndex,
    ledger: Ledger,
    *,
    current: Sequence[Assignment] = (),
    current_head: str | None = None,
    avoid: Callable[[NodeOffer], bool] | None = None,
    explain: bool = True,
    keep_unhealthy: bool = False,
) -> Decision:
    """:func:`place_cluster` against a ledger the caller keeps (the admission pass).

    ``avoid`` keeps new workers off the nodes it accepts (kept workers stay). Trials
    whose failure nobody reads pass ``explain=False`` and skip the costly explanation.
    """
    if spec.suspend:
        return Decision(True, (), None, Decimal(0), "suspended: holds no workers", REASON_SUSPENDED)
    planner = _Planner(spec, index, ledger, avoid, explain)
    planner.keep_health = TOLERATED_HEALTH if keep_unhealthy else ACCEPTING_HEALTH
    return planner.run(current, current_head)


class _Snapshot(NamedTuple):
    held: dict[str, tuple[int, int, int]]
    workers: dict[tuple[str, str], int]
    node_workers: dict[str, int]
    region_workers: dict[str, int]
    supplier_workers: dict[str, int]
    total_workers: int
    chosen: dict[str, NodeOffer]
    added_workers: int


class _Planner:
    """Working state of one decision; thrown away unless the whole gang fits."""

    def __init__(
        self,
        spec: GPUClusterSpec,
        index: InventoryIndex,
        ledger: Ledger,
        avoid: Callable[[NodeOffer], bool] | None = None,
        explain: bool = True,
    ) -> None:
        self.spec = spec
        self.avoid = avoid
        self.explain = explain
        self.index = index
        self.ledger = ledger
        self.weights = index.weights
        self.pack = spec.placement.strategy == "Pack"
        self.max_latency = spec.placement.max_latency_ms
        self.check_latency = self.max_latency is not None and index.has_rtt
        self.groups = [
            (group, group_constraints(spec, name, group)) for name, group in spec.worker_groups()
        ]
        self.held: dict[str, tuple[int, int, int]] = {}
        self.workers: dict[tuple[str, str], int] = {}
        self.node_workers: dict[str, int] = {}
        self.region_workers: dict[str, int] = {}
        self.supplier_workers: dict[str, int] = {}
        self.total_workers = 0
        self.chosen: dict[str, NodeOffer] = {}
        self.kept_workers = self.added_workers = self.removed_workers = 0
        self.notes: list[str] = []
        self.keep_health = ACCEPTING_HEALTH

    # --- capacity -------------------------------------------------------------------

    def free_of(self, offer: NodeOffer) -> tuple[int, int, int]:
        """(GPUs, millicores, bytes) still free on a node for this decision."""
        used = self.ledger.used(offer.name)
        held = self.held.get(offer.name, NOTHING)
        return (
            offer.gpus_free - used[0] - held[0],
            offer.cpu_free_millicores - used[1] - held[1],
            offer.memory_free_bytes - used[2] - held[2],
        )

    # --- bookkeeping ----------------------------------------------------------------

    def record(self, cons: GroupConstraints, offer: NodeOffer, workers: int) -> None:
        """Put (or, with negative ``workers``, take) workers of a group on a node."""
        key = (cons.name, offer.name)
        self.workers[key] = self.workers.get(key, 0) + workers
        if not self.workers[key]:
            del self.workers[key]
        self.hold(
            offer.name,
            workers * cons.gpus_per_worker,
            workers * cons.cpu_per_worker,
            workers * cons.memory_per_worker,
        )
        self.node_workers[offer.name] = self.node_workers.get(offer.name, 0) + workers
        if self.node_workers[offer.name]:
            self.chosen[offer.name] = offer
        else:
            del self.node_workers[offer.name]
            self.chosen.pop(offer.name, None)
        self.region_workers[offer.region] = self.region_workers.get(offer.region, 0) + workers
        self.supplier_workers[offer.supplier] = (
            self.supplier_workers.get(offer.supplier, 0) + workers
        )
        self.total_workers += workers

    def hold(self, node: str, gpus: int, cpu: int, memory: int) -> None:
        held = self.held.get(node, NOTHING)
        self.held[node] = (held[0] + gpus, held[1] + cpu, held[2] + memory)

    def snapshot(self) -> _Snapshot:
        return _Snapshot(
            dict(self.held),
            dict(self.workers),
            dict(self.node_workers),
            dict(self.region_workers),
            dict(self.supplier_workers),
            self.total_workers,
            dict(self.chosen),
            self.added_workers,
        )

    def restore(self, saved: _Snapshot) -> None:
        """Back to ``saved``; copies, so the same snapshot can be restored again."""
        self.held = dict(saved.held)
        self.workers = dict(saved.workers)
        self.node_workers = dict(saved.node_workers)
        self.region_workers = dict(saved.region_workers)
        self.supplier_workers = dict(saved.supplier_workers)
        self.total_workers = saved.total_workers
        self.chosen = dict(saved.chosen)
        self.added_workers = saved.added_workers

    # --- the decision ---------------------------------------------------------------

    def run(self, current: Sequence[Assignment], current_head: str | None) -> Decision:
        self.keep_current(current)
        for group, cons in self.groups:
            have = sum(w for (g, _), w in self.workers.items() if g == cons.name)
            if have > group.replicas:
                self.scale_down(cons, have - group.replicas)
        # Big workers first: they have the fewest nodes to choose from.
        for group, cons in sorted(self.groups, key=lambda gc: -gc[1].gpus_per_worker):
            have = sum(w for (g, _), w in self.workers.items() if g == cons.name)
            if have < group.replicas and not self.add(cons, group.replicas - have):
                if not self.explain:
                    return Decision(False, (), None, Decimal(0), "", REASON_NO_CAPACITY)
                shortfall = explain_group(
                    cons,
                    group.replicas,
                    group.replicas - have,
                    self.index,
                    [*self.ledger.layers(), self.held],
                    self.max_latency,
                )
                return Decision(False, (), None, Decimal(0), shortfall.text, shortfall.reason)
        head = self.choose_head(current_head)
        if head is None:
            text = head_shortfall(self.spec.head, self.index)
            return Decision(False, (), None, Decimal(0), text, REASON_NO_HEAD)
        return self.decision(head)

    def keep_current(self, current: Sequence[Assignment]) -> None:
        by_group = {cons.name: cons for _, cons in self.groups}
        for a in sorted(current, key=lambda a: (a.group, a.node)):
            cons = by_group.get(a.group)
            offer = self.index.by_name.get(a.node)
            if cons is None or cons.gpus_per_worker != a.gpus_per_worker:
                self.notes.append(
                    f"replaced {count(a.workers, 'worker')} of changed group {a.group}"
                )
            elif offer is None:
                self.notes.append(f"moved {count(a.workers, 'worker')} off {a.node} (gone)")
            elif not cons.keeps(offer, self.keep_health):
                why = offer.health if offer.health not in ACCEPTING_HEALTH else "no longer allowed"
                self.notes.append(f"moved {count(a.workers, 'worker')} off {a.node} ({why})")
            else:
                keep = min(a.workers, self.free_of(offer)[0] // a.gpus_per_worker)
                if keep < a.workers:
                    self.notes.append(
                        f"moved {count(a.workers - keep, 'worker')} off {a.node} "
                        "(GPUs no longer free)"
                    )
                if keep > 0:
                    self.record(cons, offer, keep)
                    self.kept_workers += keep

    def scale_down(self, cons: GroupConstraints, surplus: int) -> None:
        """Remove workers from the least attractive nodes first (closed, then low score)."""
        held = [self.index.by_name[node] for (g, node) in sorted(self.workers) if g == cons.name]
        held.sort(
            key=lambda o: (
                o.accepts_work,
                self.index.static[o.name],
                self.workers[(cons.name, o.name)],
                o.name,
            )
        )
        for offer in held:
            if not surplus:
                break
            take = min(surplus, self.workers[(cons.name, offer.name)])
            self.record(cons, offer, -take)
            self.kept_workers -= take
            self.removed_workers += take
            surplus -= take

    def add(self, cons: GroupConstraints, need: int) -> bool:
        """Place ``need`` more workers of a group; first among the best candidates only."""
        saved = self.snapshot()
        candidates, exhaustive = self.candidates(cons, need, limited=True)
        if self.greedy(cons, need, candidates):
            return True
        if not exhaustive:
            self.restore(saved)
            candidates, _ = self.candidates(cons, need, limited=False)
            if self.greedy(cons, need, candidates):
                return True
        if self.check_latency:
            # A greedy first pick can strand the rest beyond maxLatencyMs: try other anchors.
            for first in range(1, min(len(candidates), MAX_LATENCY_ANCHORS)):
                self.restore(saved)
                if self.greedy(cons, need, candidates, first=first):
                    return True
        self.restore(saved)  # explain from the state before this group, not a failed try
        return False

    def candidates(self, cons: GroupConstraints, need: int, limited: bool) -> tuple[_Free, bool]:
        """Nodes that pass every hard constraint and fit a worker, best first, with room.

        Returns whether the list holds every such node. A limited read stops once the
        candidates could hold twice the workers needed.
        """
        index = self.index
        kinds = index.kinds_for(cons.selector)
        ranked = index.ranked_open(kinds, cons.gpus_per_worker)
        released = self.ledger.released()
        start = 0
        if released:
            ranked = self.with_released(ranked, released, kinds, cons)
            run_ends = list(range(1, len(ranked) + 1))
        else:
            start = self.ledger.exhausted_prefix(ranked, cons.gpus_per_worker)
            run_ends = index.class_runs(ranked)
        found: _Free = []
        capacity = 0
        complete = True
        avoid = self.avoid
        class_of = index.class_of
        # Nodes of a class share every attribute the policy reads: judge each class once,
        # and skip the rest of a rejected class's run.
        admitted: dict[int, bool] = {}
        position, end = start, len(ranked)
        while position < end:
            offer = ranked[position]
            cid = class_of[offer.name]
            allowed = admitted.get(cid)
            if allowed is None:
                allowed = admitted[cid] = cons.admits(offer)
            if not allowed:
                position = run_ends[position]
                continue
            position += 1
            if avoid is not None and avoid(offer):
                continue
            free = self.free_of(offer)
            fit = _workers_fitting(free, cons)
            if fit <= 0:
                continue
            found.append((offer, free, fit))
            capacity += fit
            if limited and capacity >= 2 * need and len(found) >= MIN_CANDIDATES:
                complete = False
                break
        if not complete:
            # Nodes the group already uses are always candidates: locality favours them.
            listed = {o.name for o, _, _ in found}
            for g, node in sorted(self.workers):
                offer = index.by_name[node]
                if g != cons.name or node in listed or not offer.accepts_work:
                    continue
                free = self.free_of(offer)
                fit = _workers_fitting(free, cons)
                if fit > 0 and (avoid is None or not avoid(offer)):
                    found.append((offer, free, fit))
                    listed.add(node)
        return found, complete

    def with_released(
        self,
        ranked: Sequence[NodeOffer],
        released: set[str],
        kinds: tuple[HardwareKind, ...],
        cons: GroupConstraints,
    ) -> list[NodeOffer]:
        """Add nodes that only have room because a preemption releases GPUs on them."""
        index = self.index
        extra = [
            offer
            for offer in (index.by_name[n] for n in released if n in index.by_name)
            if offer.accepts_work
            and offer.gpus_free < cons.gpus_per_worker
            and kind_of(offer) in kinds
        ]
        return sorted([*ranked, *extra], key=index.rank_key)

    def greedy(
        self, cons: GroupConstraints, need: int, candidates: _Free, first: int | None = None
    ) -> bool:
        """Repeatedly give the best-scoring candidate as many workers as it should take.

        Only this group's own placements change free room during the loop, so each
        candidate's room is read once and updated locally.
        """
        weights = self.weights
        static = self.index.static
        gpus_per_worker = cons.gpus_per_worker
        offers = [offer for offer, _, _ in candidates]
        rooms = [free for _, free, _ in candidates]
        fits = [fit for _, _, fit in candidates]
        base_scores = [static[offer.name] for offer in offers]
        idle_weights = [weights.fragmentation / max(o.gpus_total, 1) for o in offers]
        locality, strategy = weights.locality, weights.strategy
        pack = self.pack
        step_cap = need
        if not pack:
            step_cap = max(1, math.ceil(need / (len({o.supplier for o in offers}) or 1)))
        remaining = need
        while remaining > 0:
            best = -1
            best_score = -math.inf
            best_take = 0
            total = self.total_workers
            for i, fit in enumerate(fits):
                if fit <= 0 or (first is not None and i != first):
                    continue
                offer = offers[i]
                worst_rtt = self.worst_rtt(offer) if self.check_latency else 0.0
                if worst_rtt < 0:
                    continue
                take = min(fit, remaining, step_cap)
                # Best fit first: GPUs the placement would leave idle on the node cost.
                score = base_scores[i] - idle_weights[i] * (rooms[i][0] - take * gpus_per_worker)
                if total:
                    score += locality * self.region_workers.get(offer.region, 0) / total
                    share = self.supplier_workers.get(offer.supplier, 0) / total
                    score += strategy * share if pack else -strategy * share
                if pack:
                    score += strategy * take / remaining
                if worst_rtt and self.max_latency:
                    score -= weights.latency * worst_rtt / self.max_latency
                if score > best_score or (
                    score == best_score and best >= 0 and offer.name < offers[best].name
                ):
                    best, best_score, best_take = i, score, take
            if best < 0:
                return False
            first = None
            self.record(cons, offers[best], best_take)
            gpus, cpu, memory = rooms[best]
            rooms[best] = (
                gpus - best_take * gpus_per_worker,
                cpu - best_take * cons.cpu_per_worker,
                memory - best_take * cons.memory_per_worker,
            )
            fits[best] = _workers_fitting(rooms[best], cons)
            self.added_workers += best_take
            remaining -= best_take
        return True

    def worst_rtt(self, offer: NodeOffer) -> float:
        """Worst known round trip to chosen nodes; -1 when one exceeds maxLatencyMs."""
        worst = 0.0
        limit = self.max_latency or 0
        for other in self.chosen.values():
            if other.name == offer.name:
                continue
            rtt = offer.rtt_to(other)
            if rtt is None:  # listed by neither: at least the floor, if one is published
                floor = offer.rtt_floor_to(other)
                if floor is not None and floor > limit:
                    return -1.0
                continue
            if rtt > limit:
                return -1.0
            worst = max(worst, rtt)
        return worst

    # --- head -----------------------------------------------------------------------

    def choose_head(self, current_head: str | None) -> NodeOffer | None:
        head = self.spec.head
        chosen = choose_head(head, self.index, self.free_of, self.region_workers, current_head)
        if chosen is not None:
            self.hold(chosen.name, 0, cpu_millicores(head.cpu), memory_bytes(head.memory))
        return chosen

    # --- result ---------------------------------------------------------------------

    def decision(self, head: NodeOffer) -> Decision:
        order = {cons.name: i for i, (_, cons) in enumerate(self.groups)}
        gpw = {cons.name: cons.gpus_per_worker for _, cons in self.groups}
        assignments = []
        for (group, node), workers in sorted(
            self.workers.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
        ):
            offer = self.index.by_name[node]
            assignments.append(
                Assignment(
                    group=group,
                    node=node,
                    workers=workers,
                    gpus_per_worker=gpw[group],
                    supplier=offer.supplier,
                    region=offer.region,
                    gpu_model=offer.gpu_model,
                    price_per_gpu_hour=offer.price_per_gpu_hour,
                )
            )
        price = sum((a.price_per_hour for a in assignments), Decimal(0))
        gpus = sum(a.gpus for a in assignments)
        suppliers = len({a.supplier for a in assignments})
        text = (
            f"placed {count(self.total_workers, 'worker')} ({count(gpus, 'GPU')}) on "
            f"{count(len(self.chosen), 'node')} "
            f"of {count(suppliers, 'supplier')} at {money(price)}/h; head on {head.name}"
        )
        if self.kept_workers or self.removed_workers:
            text += (
                f"; kept {self.kept_workers}, added {self.added_workers}, "
                f"removed {self.removed_workers}"
            )
        if self.notes:
            text += "; " + "; ".join(self.notes)
        usage = tuple(
            NodeUsage(node, *held) for node, held in sorted(self.held.items()) if any(held)
        )
        return Decision(True, tuple(assignments), head.name, price, text, REASON_PLACED, usage)


def _workers_fitting(free: tuple[int, int, int], cons: GroupConstraints) -> int:
    gpus, cpu, memory = free
    fit = gpus // cons.gpus_per_worker
    if cons.cpu_per_worker:
        fit = min(fit, cpu // cons.cpu_per_worker)
    if cons.memory_per_worker:
        fit = min(fit, memory // cons.memory_per_worker)
    return fit
