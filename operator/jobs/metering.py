"""GPU-time metering: GPU-seconds and cost from placements and timestamps (pure).

What a workload is paid for is the ready part of its ``status.placements`` (GPUs per
supplier node at that node's price, and how many of the workers there are ready): a
worker counts from when it is ready until it leaves, not from when it was placed.
``status.metering.meteredUntil`` marks how far that is already counted in ``gpuSeconds``
and ``cost``, so each reconcile adds only the time since, and a reconcile that repeats
(or an operator restart) counts nothing twice. Time is counted in whole seconds; the
fraction waits for the next flush. ``cost`` is rounded to 1/100 cent for people, while
``metering.priceSeconds`` keeps the sum exact so rounding never adds up.

To keep status writes rare, time accumulates unwritten until ``flush_after`` seconds have
passed or the status changes anyway (placements change, phase moves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Final, TypeVar

from gpumesh.api.gpucluster import GPUClusterStatus, Metering, WorkerPlacement
from gpumesh.api.job import JobStatus

SECONDS_PER_HOUR: Final = Decimal(3600)
CENT_HUNDREDTHS: Final = Decimal("0.0001")
_METERED: Final = frozenset({"gpu_seconds", "cost", "metering"})

S = TypeVar("S", GPUClusterStatus, JobStatus)


@dataclass(frozen=True)
class NodeHolding:
    """GPUs one workload held on one supplier node, at the node's price."""

    node: str
    supplier: str
    gpus: int
    price_per_gpu_hour: Decimal

    def gpu_seconds(self, seconds: int) -> int:
        return self.gpus * seconds

    def cost(self, seconds: int | float) -> Decimal:
        """US dollars for ``seconds`` of these GPUs, unrounded."""
        return self.price_per_gpu_hour * self.gpus * Decimal(seconds) / SECONDS_PER_HOUR


@dataclass(frozen=True)
class Flush:
    """The time one metering step counted: ``holdings`` from ``start`` to ``end``."""

    start: datetime
    end: datetime
    holdings: tuple[NodeHolding, ...]

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())


def holdings(placements: Sequence[WorkerPlacement]) -> tuple[NodeHolding, ...]:
    """Per supplier node, the GPUs of ready workers and their price (groups on one node add
    up): a worker is paid for from when it is ready until it leaves."""
    per_node: dict[str, NodeHolding] = {}
    for p in placements:
        seen = per_node.get(p.node)
        ready_gpus = p.gpus * min(p.ready, p.workers) // p.workers if p.workers else 0
        gpus = ready_gpus + (seen.gpus if seen else 0)
        per_node[p.node] = NodeHolding(p.node, p.supplier, gpus, p.price_per_gpu_hour)
    return tuple(h for _, h in sorted(per_node.items()) if h.gpus > 0)


def all_ready(placements: Sequence[WorkerPlacement], ready: bool) -> list[WorkerPlacement]:
    """``placements`` with every worker ready, or none (a Job's own cluster: its workers
    count from when the Ray job runs)."""
    return [p.model_copy(update={"ready": p.workers if ready else 0}) for p in placements]


def rounded_cost(price_seconds: Decimal) -> Decimal:
    """US dollars from the exact sum of price x GPUs x seconds, to 1/100 cent."""
    return (price_seconds / SECONDS_PER_HOUR).quantize(CENT_HUNDREDTHS, rounding=ROUND_HALF_EVEN)


def meter(previous: S, current: S, now: datetime, flush_after: float) -> tuple[S, Flush | None]:
    """``current`` with metering brought up to ``now`` when due, and what was counted.

    ``previous`` is the status as last written: its placements are what was held since
    its ``meteredUntil``. ``current`` is the status this reconcile computed (carrying the
    previous metering fields). When nothing else changed and less than ``flush_after``
    seconds went by, ``current`` comes back as it is, so no write is needed.
    """
    mark = previous.metering
    held = holdings(previous.placements)
    if mark is None:
        if not current.placements:
            return current, None
        start = Metering(metered_until=now)
        return current.model_copy(
            update={"metering": start, "gpu_seconds": previous.gpu_seconds or 0}
        ), None
    seconds = max(0, int((now - mark.metered_until).total_seconds()))
    if seconds == 0:
        return current, None  # nothing to count yet: the mark stays exactly as written
    changed = current.model_dump(exclude=set(_METERED)) != previous.model_dump(
        exclude=set(_METERED)
    )
    if not changed and not (held and seconds >= flush_after):
        return current, None
    end = mark.metered_until + timedelta(seconds=seconds)
    added_price_seconds = sum((h.price_per_gpu_hour * h.gpus * seconds for h in held), Decimal(0))
    price_seconds = mark.price_seconds + added_price_seconds
    gpu_seconds = (previous.gpu_seconds or 0) + sum(h.gpu_seconds(seconds) for h in held)
    cost = rounded_cost(price_seconds) if price_seconds or previous.cost is not None else None
    updated = current.model_copy(
        update={
            "metering": Metering(metered_until=end, price_seconds=price_seconds),
            "gpu_seconds": gpu_seconds,
            "cost": cost,
        }
    )
    flush = Flush(mark.metered_until, end, held) if held and seconds else None
    return updated, flush
