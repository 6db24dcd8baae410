"""What placement decides: assignments of workers to nodes, and the decision around them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Final

REASON_PLACED: Final = "Placed"
REASON_SUSPENDED: Final = "Suspended"
REASON_NO_HEAD: Final = "NoHeadNode"


@dataclass(frozen=True, slots=True)
class Assignment:
    """``workers`` workers of ``group`` on ``node``, each holding ``gpus_per_worker`` GPUs."""

    group: str
    node: str
    workers: int
    gpus_per_worker: int
    supplier: str
    region: str
    gpu_model: str
    price_per_gpu_hour: Decimal

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker

    @property
    def price_per_hour(self) -> Decimal:
        return self.gpus * self.price_per_gpu_hour


def with_terms_of(
    assignments: Sequence[Assignment], earlier: Sequence[Assignment]
) -> tuple[Assignment, ...]:
    """``assignments``, where each (group, node) that already held workers keeps the terms
    those workers were placed on.

    Who earns from them (the supplier) and what the renter pays (the price), like the
    region and model they were bought as, are fixed when workers land on a node; a later
    edit of that node's GPUNode changes only what new placements see.
    """
    terms = {(a.group, a.node): a for a in earlier if a.workers}
    kept = []
    for a in assignments:
        t = terms.get((a.group, a.node))
        if t is None:
            kept.append(a)
        else:
            kept.append(
                replace(
                    a,
                    supplier=t.supplier,
                    region=t.region,
                    gpu_model=t.gpu_model,
                    price_per_gpu_hour=t.price_per_gpu_hour,
                )
            )
    return tuple(kept)


@dataclass(frozen=True, slots=True)
class NodeUsage:
    """What a decision holds on one node: worker GPUs, and CPU and memory with the head's."""

    node: str
    gpus: int
    cpu_millicores: int
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one cluster. When not ok, nothing changes: keep what runs."""

    ok: bool
    assignments: tuple[Assignment, ...]
    head_node: str | None
    price_per_hour: Decimal
    explanation: str
    reason: str = REASON_PLACED
    usage: tuple[NodeUsage, ...] = ()

    @property
    def gpus(self) -> int:
        return sum(a.gpus for a in self.assignments)

    @property
    def workers(self) -> int:
        return sum(a.workers for a in self.assignments)
