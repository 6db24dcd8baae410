"""Sentences for Kubernetes conditions and events: what was asked, what is there, what binds.

A renter reading ``kubectl describe`` should learn from one line which of their limits
keeps a cluster pending, how many GPUs each limit excluded, and what relaxing the binding
one would cost. Counts are of free GPUs on nodes of the requested hardware.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from gpumesh.api.base import price_text
from gpumesh.api.gpucluster import PRIMARY_GROUP
from gpumesh.operator.placement.index import InventoryIndex, node_capacity
from gpumesh.operator.placement.inventory import NodeOffer
from gpumesh.operator.placement.matching import (
    RELAXABLE,
    Exclusion,
    GroupConstraints,
    HardwareKind,
)

REASON_NO_CAPACITY: Final = "NoCapacity"
REASON_UNSATISFIABLE: Final = "Unsatisfiable"

Layers = Sequence[Mapping[str, tuple[int, int, int]]]
"""(GPUs, millicores, bytes) taken per node, in layers to add up (ledger, decision)."""

_EXCLUSION_WORDS: Final = {
    Exclusion.HEALTH: "unhealthy",
    Exclusion.CORDONED: "cordoned or tainted",
    Exclusion.REGION: "region",
    Exclusion.SUPPLIER: "supplier",
    Exclusion.VERIFIED: "unverified",
    Exclusion.REPUTATION: "reputation",
    Exclusion.PRICE: "price",
    Exclusion.CPU_MEMORY: "CPU/memory",
}
_RELAX_WORDS: Final = {
    Exclusion.REGION: "the region limit",
    Exclusion.SUPPLIER: "the supplier limit",
    Exclusion.VERIFIED: "verifiedOnly",
    Exclusion.REPUTATION: "minReputation",
}
_POLICY = int(
    Exclusion.HEALTH
    | Exclusion.CORDONED
    | Exclusion.REGION
    | Exclusion.SUPPLIER
    | Exclusion.VERIFIED
    | Exclusion.REPUTATION
    | Exclusion.PRICE
)
_FLAGS = tuple(int(flag) for flag in Exclusion if flag)
_WORKER_SIZE = int(Exclusion.WORKER_SIZE)
_CPU_MEMORY = int(Exclusion.CPU_MEMORY)
_PLENTY = 1 << 62
_RELAXABLE_BITS = frozenset(int(flag) for flag in RELAXABLE)


@dataclass(frozen=True)
class Shortfall:
    """Why a group could not be placed: a condition reason and a sentence."""

    reason: str
    text: str


def money(amount: Decimal) -> str:
    """``Decimal("2.5")`` -> ``"$2.50"``; exact beyond cents when the price is."""
    return f"${price_text(amount)}"


def count(n: int, noun: str) -> str:
    """``count(1, "worker")`` -> ``"1 worker"``, ``count(2, "worker")`` -> ``"2 workers"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def gpu_words(cons: GroupConstraints) -> str:
    """The hardware asked for: 'H100', 'A100 80GB/H100 with >= 40960 MiB', 'any model'."""
    selector = cons.selector
    words = "/".join(sorted(selector.models)) if selector.models else "any model"
    limits = []
    if selector.min_memory_mib is not None:
        limits.append(f">= {selector.min_memory_mib} MiB")
    if selector.min_compute_capability is not None:
        limits.append(f"compute capability >= {selector.min_compute_capability}")
    return words + (" with " + " and ".join(limits) if limits else "")


def describe_ask(cons: GroupConstraints, workers: int, more: int | None = None) -> str:
    """'asked 4 workers x 2 GPUs of H100 at <= $2.00/GPU-h in eu-west'."""
    group = "" if cons.name == PRIMARY_GROUP else f"group {cons.name}: "
    text = (
        f"{group}asked {count(workers, 'worker')} x {count(cons.gpus_per_worker, 'GPU')} "
        f"of {gpu_words(cons)}"
    )
    if more is not None and more != workers:
        text += f" ({more} more than kept)"
    if cons.max_price is not None:
        text += f" at <= {money(cons.max_price)}/GPU-h"
    if cons.regions is not None:
        text += f" in {', '.join(sorted(cons.regions))}"
    if cons.suppliers is not None:
        text += f" from {', '.join(sorted(cons.suppliers))}"
    if cons.verified_only:
        text += ", verified only"
    if cons.min_reputation is not None:
        text += f", reputation >= {cons.min_reputation:g}"
    return text


def explain_group(
    cons: GroupConstraints,
    replicas: int,
    need: int,
    index: InventoryIndex,
    layers: Layers,
    max_latency_ms: int | None,
) -> Shortfall:
    """Why ``need`` more of ``replicas`` workers do not fit, and the cheapest way they would."""
    ask = describe_ask(cons, replicas, need)
    kinds = index.kinds_for(cons.selector)
    if not kinds:
        have = sorted(index.gpus_by_model().items(), key=lambda kv: (-kv[1], kv[0]))[:4]
        listing = ", ".join(f"{n} {model}" for model, n in have) or "no GPUs at all"
        return Shortfall(
            REASON_UNSATISFIABLE, f"{ask}: no GPU in the mesh matches; it has {listing}"
        )
    tally = _Tally(cons)
    for representative, capacity in _capacity_by_class(cons, index, kinds, layers):
        tally.add_class(representative, capacity)
    label = "/".join(sorted(cons.selector.models)) + " " if cons.selector.models else ""
    parts = [ask]
    if tally.free == 0:
        parts.append(f"all {tally.total} {label}GPUs are in use")
    elif tally.excluded.get(int(Exclusion.PRICE), 0) == tally.free:
        parts.append(f"{tally.free} {label}GPUs are free but all cost more")
    else:
        parts.append(f"{tally.free} {label}GPUs are free on {count(tally.nodes, 'node')}")
        excluded = [
            f"{_EXCLUSION_WORDS[Exclusion(flag)]} {gpus}"
            for flag, gpus in sorted(tally.excluded.items(), key=lambda kv: (-kv[1], kv[0]))
            if Exclusion(flag) in _EXCLUSION_WORDS and gpus
        ]
        small = tally.excluded.get(int(Exclusion.WORKER_SIZE), 0)
        if small:
            excluded.append(f"{small} on nodes with fewer than {cons.gpus_per_worker} free")
        if excluded:
            parts.append("excluded: " + ", ".join(excluded))
        parts.append(f"{count(tally.fitting, 'worker')} fit within every limit")
    parts += _relaxations(tally, need)
    if tally.fitting >= need:
        parts.append(
            f"no {count(need, 'such worker')} {'is' if need == 1 else 'are'} within "
            f"{max_latency_ms} ms of each other"
            if max_latency_ms is not None
            else "the cluster's other groups took the nodes that fit"
        )
    if tally.idle_capacity < replicas:
        if tally.idle_capacity:
            parts.append(f"even an idle mesh fits only {count(tally.idle_capacity, 'such worker')}")
        return Shortfall(REASON_UNSATISFIABLE, "; ".join(parts))
    return Shortfall(REASON_NO_CAPACITY, "; ".join(parts))


def explain_head(cpu: str, memory: str, selector: dict[str, str], candidates: int) -> str:
    """Why no node can host the Ray head."""
    labels = "".join(f", {k}={v}" for k, v in sorted(selector.items()))
    where = f"all {candidates} are busy" if candidates else "the mesh has none"
    return (
        f"no head-capable, healthy node{labels} has {cpu} CPU and {memory} memory "
        f"free for the Ray head; {where}"
    )


def _relaxations(tally: _Tally, need: int) -> list[str]:
    """What relaxing a single limit would achieve, cheapest price first."""
    if tally.fitting >= need:
        return []
    found: list[str] = []
    dropped: list[str] = []
    for flag in RELAXABLE:
        extra = sorted(tally.only.get(flag, []))
        if tally.fitting + sum(w for _, w in extra) < need:
            continue
        if flag is Exclusion.PRICE:
            have = tally.fitting
            for price, workers in extra:
                have += workers
                if have >= need:
                    found.append(f"cheapest fit at {money(price)}/GPU-h")
                    break
        else:
            dropped.append(_RELAX_WORDS[flag])
    if dropped:
        found.append(f"dropping {' or '.join(dropped)} alone would fit")
    return found


def _capacity_by_class(
    cons: GroupConstraints,
    index: InventoryIndex,
    kinds: Sequence[HardwareKind],
    layers: Layers,
) -> list[tuple[NodeOffer, Sequence[int]]]:
    """Each class's capacity: cached figures, corrected for the nodes a ledger touched."""
    per_worker = (
        cons.gpus_per_worker,
        max(cons.cpu_per_worker, 1),
        max(cons.memory_per_worker, 1),
    )
    ids = index.class_ids(kinds)
    capacity = {cid: list(index.class_capacity(cid, per_worker)) for cid in ids}
    touched: set[str] = set()
    for layer in layers:
        touched.update(layer)
    for name in sorted(touched):
        cid = index.class_of.get(name)
        if cid not in capacity:
            continue
        offer = index.by_name[name]
        gpus, cpu, memory = offer.gpus_free, offer.cpu_free_millicores, offer.memory_free_bytes
        before = node_capacity((gpus, cpu, memory), per_worker)
        for layer in layers:
            used = layer.get(name)
            if used is not None:
                gpus, cpu, memory = gpus - used[0], cpu - used[1], memory - used[2]
        after = node_capacity((gpus, cpu, memory), per_worker)
        figures = capacity[cid]
        for i in range(5):
            figures[2 + i] += after[i] - before[i]
    return [(index.classes[cid][0], capacity[cid]) for cid in ids]


class _Tally:
    """Counts over the requested hardware: free GPUs, exclusions, workers that fit.

    Nodes come in classes that share every attribute a policy reads (supplier, region,
    price, ...), so each policy check runs once per class.
    """

    def __init__(self, cons: GroupConstraints) -> None:
        self.cons = cons
        self.total = 0
        self.free = 0
        self.nodes = 0
        self.fitting = 0
        self.idle_capacity = 0
        self.excluded: dict[int, int] = {}
        self.only: dict[Exclusion, list[tuple[Decimal, int]]] = {}

    def add_class(self, representative: NodeOffer, capacity: Sequence[int]) -> None:
        total, idle, nodes, free, workers, too_small, short_of_cpu = capacity
        policy = self.cons.exclusions(representative, _PLENTY, _PLENTY, _PLENTY) & _POLICY
        self.total += total
        self.nodes += nodes
        self.free += free
        for flag, gpus in ((_WORKER_SIZE, too_small), (_CPU_MEMORY, short_of_cpu)):
            if gpus:
                self.excluded[flag] = self.excluded.get(flag, 0) + gpus
        for flag in _FLAGS:
            if policy & flag and free:
                self.excluded[flag] = self.excluded.get(flag, 0) + free
        if not policy:
            self.idle_capacity += idle
            self.fitting += workers
        elif policy in _RELAXABLE_BITS and workers:
            entry = (representative.price_per_gpu_hour, workers)
            self.only.setdefault(Exclusion(policy), []).append(entry)
