"""An inventory indexed for placement, and a ledger of what is promised but not yet used.

A decision must not scan 10,000 nodes. The index groups open nodes by hardware kind and
by free GPUs, each group ranked by the part of the score that does not change during a
decision, so a placement reads only nodes of the right hardware with room for a worker,
best first, and stops once it has enough candidates.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, overload

from gpumesh.api.gpucluster import GPUSelector
from gpumesh.operator.placement.inventory import NodeOffer
from gpumesh.operator.placement.matching import HardwareKind, kind_of, selector_accepts
from gpumesh.operator.placement.scoring import DEFAULT_WEIGHTS, Weights, static_score

_Entry = tuple[float, str, NodeOffer]
NOTHING: tuple[int, int, int] = (0, 0, 0)
_SelectorKey = tuple[tuple[str, ...], int | None, str | None]


class Ledger:
    """GPUs, CPU and memory promised per node beyond what the inventory already shows.

    Positive amounts are taken (reservations while pods start, earlier admissions in a
    pass); negative ones are released (workloads about to be preempted). A ledger made
    with ``base`` layers its changes over another, so a trial costs no copy.
    """

    __slots__ = ("_exhausted", "_released", "base", "held")

    def __init__(self, base: Ledger | None = None) -> None:
        self.base = base
        self.held: dict[str, tuple[int, int, int]] = {}
        self._released: set[str] = set()
        # id(ranked list) -> (the list, kept alive so the id stays its own; prefix length)
        self._exhausted: dict[int, tuple[list[NodeOffer], int]] = {}

    @classmethod
    def of_reserved(cls, reserved: Mapping[str, int]) -> Ledger:
        ledger = cls()
        for node, gpus in reserved.items():
            ledger.take(node, gpus)
        return ledger

    def take(self, node: str, gpus: int, cpu: int = 0, memory: int = 0) -> None:
        held_gpus, held_cpu, held_memory = self.held.get(node, NOTHING)
        self.held[node] = (held_gpus + gpus, held_cpu + cpu, held_memory + memory)
        if gpus < 0:
            self._exhausted.clear()
        if held_gpus + gpus < 0:
            self._released.add(node)
        else:
            self._released.discard(node)

    def used(self, node: str) -> tuple[int, int, int]:
        """(GPUs, millicores, bytes) taken on the node, over all layers."""
        own = self.held.get(node, NOTHING)
        if self.base is None:
            return own
        gpus, cpu, memory = self.base.used(node)
        return (own[0] + gpus, own[1] + cpu, own[2] + memory)

    def layers(self) -> list[dict[str, tuple[int, int, int]]]:
        """What each layer holds, this one first."""
        found = []
        ledger: Ledger | None = self
        while ledger is not None:
            found.append(ledger.held)
            ledger = ledger.base
        return found

    def exhausted_prefix(self, ranked: list[NodeOffer], gpus_per_worker: int) -> int:
        """How many leading nodes of ``ranked`` lack room for a worker, per this ledger alone.

        An admission pass places hundreds of requests against one growing ledger; without
        this, each would re-read the nodes the ones before it filled. Kept only on a
        ledger without a base; any release starts it over.
        """
        if self.base is not None:
            return 0
        held = self.held
        if not held:
            return 0
        _, end = self._exhausted.get(id(ranked), (ranked, 0))
        while end < len(ranked):
            offer = ranked[end]
            used = held.get(offer.name)
            if used is None or offer.gpus_free - used[0] >= gpus_per_worker:
                break
            end += 1
        self._exhausted[id(ranked)] = (ranked, end)
        return end

    def released(self) -> set[str]:
        """Nodes where more GPUs are released than taken."""
        names: set[str] = set()
        ledger: Ledger | None = self
        while ledger is not None:
            names |= ledger._released
            ledger = ledger.base
        return {n for n in names if self.used(n)[0] < 0}


class InventoryIndex(Sequence[NodeOffer]):
    """The offers, sorted by name, with lookups placement needs. Immutable once built."""

    def __init__(self, offers: Iterable[NodeOffer], weights: Weights = DEFAULT_WEIGHTS) -> None:
        self._offers = tuple(sorted(offers, key=lambda o: o.name))
        self.by_name = {o.name: o for o in self._offers}
        if len(self.by_name) != len(self._offers):
            raise ValueError("inventory has two offers for the same node")
        self.weights = weights
        self.static = {o.name: static_score(o, weights) for o in self._offers}
        self.has_rtt = any(o.rtt_ms for o in self._offers)
        self._by_kind: dict[HardwareKind, list[NodeOffer]] = defaultdict(list)
        self._open: dict[HardwareKind, dict[int, list[_Entry]]] = defaultdict(dict)
        heads: dict[str, list[NodeOffer]] = defaultdict(list)
        for offer in self._offers:
            if offer.gpus_total > 0 and offer.gpu_model:
                self._by_kind[kind_of(offer)].append(offer)
            if offer.accepts_work and offer.gpus_free > 0 and offer.gpu_model:
                bucket = self._open[kind_of(offer)].setdefault(offer.gpus_free, [])
                bucket.append((-self.static[offer.name], offer.name, offer))
            if offer.head_capable and offer.accepts_work:
                heads[offer.region].append(offer)
        # Classes: nodes of one kind that every policy check treats alike.
        self.classes: list[tuple[NodeOffer, ...]] = []
        self.class_of: dict[str, int] = {}
        self._class_ids: dict[HardwareKind, tuple[int, ...]] = {}
        for kind, members in self._by_kind.items():
            grouped: dict[tuple[object, ...], list[NodeOffer]] = defaultdict(list)
            for offer in members:
                grouped[_policy_class(offer)].append(offer)
            ids = []
            for group in grouped.values():
                ids.append(len(self.classes))
                for offer in group:
                    self.class_of[offer.name] = len(self.classes)
                self.classes.append(tuple(group))
            self._class_ids[kind] = tuple(ids)
        self._capacity_cache: dict[tuple[int, int, int, int], Capacity] = {}
        for buckets in self._open.values():
            for bucket in buckets.values():
                bucket.sort()
        # CPU-only nodes first: a head should not take the CPU that GPU workers need.
        self.heads = {
            region: sorted(nodes, key=lambda o: (o.gpus_total > 0, o.name))
            for region, nodes in sorted(heads.items())
        }
        self._kinds_cache: dict[_SelectorKey, tuple[HardwareKind, ...]] = {}
        self._ranked_cache: dict[tuple[tuple[HardwareKind, ...], int], list[NodeOffer]] = {}
        self._runs_cache: dict[int, tuple[list[NodeOffer], list[int]]] = {}

    def __len__(self) -> int:
        return len(self._offers)

    @overload
    def __getitem__(self, index: int) -> NodeOffer: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[NodeOffer]: ...

    def __getitem__(self, index: int | slice) -> NodeOffer | Sequence[NodeOffer]:
        return self._offers[index]

    def kinds_for(self, selector: GPUSelector) -> tuple[HardwareKind, ...]:
        """Hardware kinds in the inventory that the selector accepts, sorted."""
        key = (
            tuple(sorted(selector.models)),
            selector.min_memory_mib,
            selector.min_compute_capability,
        )
        found = self._kinds_cache.get(key)
        if found is None:
            found = tuple(sorted(k for k in self._by_kind if selector_accepts(selector, k)))
            self._kinds_cache[key] = found
        return found

    def ranked_open(self, kinds: tuple[HardwareKind, ...], gpus_per_worker: int) -> list[NodeOffer]:
        """Open nodes of these kinds with room for a worker, best static score first."""
        key = (kinds, gpus_per_worker)
        ranked = self._ranked_cache.get(key)
        if ranked is None:
            buckets = [
                bucket
                for kind in kinds
                for free, bucket in self._open.get(kind, {}).items()
                if free >= gpus_per_worker
            ]
            ranked = [entry[2] for entry in heapq.merge(*buckets)]
            self._ranked_cache[key] = ranked
        return ranked

    def class_runs(self, ranked: list[NodeOffer]) -> list[int]:
        """For each position of a ranked list, where the run of its class ends.

        Nodes of one class have the same static score, so they sit together: a policy
        that rejects a class skips its whole run in one step.
        """
        cached = self._runs_cache.get(id(ranked))
        if cached is not None and cached[0] is ranked:
            return cached[1]
        ends = [0] * len(ranked)
        end = len(ranked)
        for i in range(len(ranked) - 1, -1, -1):
            if i + 1 < len(ranked) and (
                self.class_of[ranked[i].name] != self.class_of[ranked[i + 1].name]
            ):
                end = i + 1
            ends[i] = end
        self._runs_cache[id(ranked)] = (ranked, ends)
        return ends

    def class_ids(self, kinds: Iterable[HardwareKind]) -> list[int]:
        return [cid for kind in kinds for cid in self._class_ids.get(kind, ())]

    def class_capacity(self, cid: int, per_worker: tuple[int, int, int]) -> Capacity:
        """A class's capacity for workers of this size, ignoring any ledger (cached)."""
        key = (cid, *per_worker)
        found = self._capacity_cache.get(key)
        if found is None:
            total = [0] * 7
            for offer in self.classes[cid]:
                total[0] += offer.gpus_total
                total[1] += offer.gpus_total // per_worker[0]
                free = (offer.gpus_free, offer.cpu_free_millicores, offer.memory_free_bytes)
                for i, value in enumerate(node_capacity(free, per_worker), start=2):
                    total[i] += value
            found = self._capacity_cache[key] = Capacity(*total)
        return found

    def nodes_of(self, kinds: Iterable[HardwareKind]) -> Iterator[NodeOffer]:
        """Every GPU node of these kinds, open or not."""
        for kind in kinds:
            yield from self._by_kind.get(kind, ())

    def gpus_by_model(self) -> dict[str, int]:
        """GPUs in the inventory per product name, for "what the mesh has" messages."""
        totals: dict[str, int] = defaultdict(int)
        for (product, _, _), nodes in self._by_kind.items():
            totals[product] += sum(o.gpus_total for o in nodes)
        return dict(totals)

    def rank_key(self, offer: NodeOffer) -> tuple[float, str]:
        """The order :meth:`ranked_open` uses."""
        return (-self.static[offer.name], offer.name)


class Capacity(NamedTuple):
    """What a set of nodes offers workers of one size."""

    total: int
    """GPUs, used or not."""
    idle: int
    """Workers that would fit were every GPU free."""
    nodes: int
    """Nodes with a free GPU."""
    free: int
    """Free GPUs."""
    workers: int
    """Workers that fit now."""
    too_small: int
    """Free GPUs on nodes with fewer free than a worker needs."""
    short_of_cpu: int
    """Free GPUs on nodes without the CPU or memory for a worker."""


def node_capacity(
    free: tuple[int, int, int], per_worker: tuple[int, int, int]
) -> tuple[int, int, int, int, int]:
    """(has free GPUs, free GPUs, workers, too-small GPUs, short-of-CPU GPUs) of a node."""
    gpus, cpu, memory = free
    if gpus <= 0:
        return (0, 0, 0, 0, 0)
    if gpus < per_worker[0]:
        return (1, gpus, 0, gpus, 0)
    workers = min(gpus // per_worker[0], cpu // per_worker[1], memory // per_worker[2])
    if workers <= 0:
        return (1, gpus, 0, 0, gpus)
    return (1, gpus, workers, 0, 0)


def _policy_class(offer: NodeOffer) -> tuple[object, ...]:
    """Everything :meth:`GroupConstraints.exclusions` reads about a node but capacity."""
    return (
        offer.health,
        offer.cordoned,
        offer.tainted,
        offer.region,
        offer.supplier,
        offer.verified,
        offer.reputation,
        offer.price_per_gpu_hour,
    )


def as_index(inventory: Sequence[NodeOffer], weights: Weights | None = None) -> InventoryIndex:
    """Reuse an index built with the same weights; index anything else once."""
    if isinstance(inventory, InventoryIndex) and weights in (None, inventory.weights):
        return inventory
    return InventoryIndex(inventory, weights or DEFAULT_WEIGHTS)
