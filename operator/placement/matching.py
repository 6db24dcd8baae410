"""Hard constraints: which nodes a worker group may use at all, and why others may not.

Every check here is exact; scoring only ranks what passes. :class:`Exclusion` names each
reason so that an explanation can say how many GPUs each constraint excluded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from enum import IntFlag
from functools import lru_cache

from gpumesh.api.base import parse_compute_capability
from gpumesh.api.gpucluster import GPUClusterSpec, GPUSelector, WorkerGroup
from gpumesh.api.gpunode import ACCEPTING_HEALTH
from gpumesh.operator.placement.inventory import NodeOffer
from gpumesh.operator.placement.quantity import cpu_millicores, memory_bytes

_WORD_SEPARATORS = re.compile(r"[\s_-]+")
DEFAULT_CPU_PER_GPU_MILLICORES = 4000
DEFAULT_MEMORY_PER_GPU_BYTES = 16 * 2**30

HardwareKind = tuple[str, int, tuple[int, int]]
"""(GPU product name, memory MiB, compute capability): nodes that are the same hardware."""


@lru_cache(maxsize=4096)
def model_words(text: str) -> frozenset[str]:
    """Lower-case words of a product name or selector entry; '-' and '_' separate words."""
    return frozenset(w for w in _WORD_SEPARATORS.split(text.lower()) if w)


def model_matches(entry: str, product: str) -> bool:
    """Every word of ``entry`` is a whole word of ``product``: 'A10' does not match 'A100'."""
    return model_words(entry) <= model_words(product)


def selector_accepts(selector: GPUSelector, kind: HardwareKind) -> bool:
    """The GPU selector's hardware checks: model, memory and compute capability."""
    product, memory_mib, capability = kind
    if not product:
        return False
    if selector.models and not any(model_matches(m, product) for m in selector.models):
        return False
    if selector.min_memory_mib is not None and memory_mib < selector.min_memory_mib:
        return False
    return not (
        selector.min_compute_capability is not None
        and capability < parse_compute_capability(selector.min_compute_capability)
    )


def kind_of(offer: NodeOffer) -> HardwareKind:
    return (offer.gpu_model, offer.gpu_memory_mib, offer.compute_capability)


class Exclusion(IntFlag):
    """Why a node cannot take a worker of a group; several may hold at once."""

    NONE = 0
    HEALTH = 1
    CORDONED = 2
    REGION = 4
    SUPPLIER = 8
    VERIFIED = 16
    REPUTATION = 32
    PRICE = 64
    WORKER_SIZE = 128
    CPU_MEMORY = 256


# Plain ints: flag arithmetic on IntFlag members is slow in a loop over every node.
_HEALTH, _CORDONED, _REGION, _SUPPLIER, _VERIFIED = (
    int(Exclusion.HEALTH),
    int(Exclusion.CORDONED),
    int(Exclusion.REGION),
    int(Exclusion.SUPPLIER),
    int(Exclusion.VERIFIED),
)
_REPUTATION, _PRICE, _WORKER_SIZE, _CPU_MEMORY = (
    int(Exclusion.REPUTATION),
    int(Exclusion.PRICE),
    int(Exclusion.WORKER_SIZE),
    int(Exclusion.CPU_MEMORY),
)

#: Constraints the renter chose and could relax, in the order explanations list them.
RELAXABLE = (
    Exclusion.PRICE,
    Exclusion.REGION,
    Exclusion.SUPPLIER,
    Exclusion.VERIFIED,
    Exclusion.REPUTATION,
)


@dataclass(frozen=True, slots=True)
class GroupConstraints:
    """One worker group's hard constraints, compiled for fast checks."""

    name: str
    selector: GPUSelector
    gpus_per_worker: int
    cpu_per_worker: int
    memory_per_worker: int
    regions: frozenset[str] | None
    suppliers: frozenset[str] | None
    max_price: Decimal | None
    verified_only: bool
    min_reputation: float | None

    def admits(self, offer: NodeOffer) -> bool:
        """The renter's policy allows this node (hardware and capacity are checked apart)."""
        return not (
            (self.regions is not None and offer.region not in self.regions)
            or (self.suppliers is not None and offer.supplier not in self.suppliers)
            or (self.verified_only and not offer.verified)
            or (self.min_reputation is not None and offer.reputation < self.min_reputation)
            or (self.max_price is not None and offer.price_per_gpu_hour > self.max_price)
        )

    def keeps(self, offer: NodeOffer, health: frozenset[str] = ACCEPTING_HEALTH) -> bool:
        """Running workers may stay: policy and hardware still hold, health is in ``health``.

        Cordons and taints do not count: like Kubernetes, they stop new work only.
        """
        return (
            offer.health in health
            and self.admits(offer)
            and selector_accepts(self.selector, kind_of(offer))
        )

    def exclusions(self, offer: NodeOffer, free_gpus: int, cpu: int, memory: int) -> int:
        """Every reason (:class:`Exclusion` bits) this node cannot take one more worker."""
        found = 0
        if offer.health not in ACCEPTING_HEALTH:
            found |= _HEALTH
        if offer.cordoned or offer.tainted:
            found |= _CORDONED
        if self.regions is not None and offer.region not in self.regions:
            found |= _REGION
        if self.suppliers is not None and offer.supplier not in self.suppliers:
            found |= _SUPPLIER
        if self.verified_only and not offer.verified:
            found |= _VERIFIED
        if self.min_reputation is not None and offer.reputation < self.min_reputation:
            found |= _REPUTATION
        if self.max_price is not None and offer.price_per_gpu_hour > self.max_price:
            found |= _PRICE
        if free_gpus < self.gpus_per_worker:
            found |= _WORKER_SIZE
        elif cpu < self.cpu_per_worker or memory < self.memory_per_worker:
            found |= _CPU_MEMORY
        return found


def group_constraints(spec: GPUClusterSpec, name: str, group: WorkerGroup) -> GroupConstraints:
    """Compile a group's constraints with the cluster-wide placement policy."""
    policy = spec.placement
    gpus = group.gpus_per_worker
    return GroupConstraints(
        name=name,
        selector=group.gpu,
        gpus_per_worker=gpus,
        cpu_per_worker=(
            cpu_millicores(group.cpu_per_worker)
            if group.cpu_per_worker
            else DEFAULT_CPU_PER_GPU_MILLICORES * gpus
        ),
        memory_per_worker=(
            memory_bytes(group.memory_per_worker)
            if group.memory_per_worker
            else DEFAULT_MEMORY_PER_GPU_BYTES * gpus
        ),
        regions=frozenset(policy.regions) or None,
        suppliers=frozenset(policy.suppliers) or None,
        max_price=policy.max_price_per_gpu_hour,
        verified_only=policy.verified_only,
        min_reputation=policy.min_reputation,
    )
