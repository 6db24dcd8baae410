"""Synthetic inventories for tests, benchmarks and demos: a realistic mesh without a cluster.

The mix follows what GPU marketplaces list: data-centre H100/A100/L40S servers of 8 GPUs
from fewer, larger, mostly verified suppliers; consumer RTX cards in small rigs from many
individuals; prices around public rates; a little of every kind of ill health.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Final

from gpumesh.operator.placement.inventory import Health, NodeOffer


@dataclass(frozen=True)
class GpuKind:
    product: str
    memory_mib: int
    capability: tuple[int, int]
    price: Decimal
    share: float
    data_centre: bool


GPU_KINDS: Final = (
    GpuKind("NVIDIA H100 80GB HBM3", 81559, (9, 0), Decimal("2.49"), 0.18, True),
    GpuKind("NVIDIA H200", 143771, (9, 0), Decimal("3.49"), 0.04, True),
    GpuKind("NVIDIA A100-SXM4-80GB", 81920, (8, 0), Decimal("1.49"), 0.14, True),
    GpuKind("NVIDIA A100-SXM4-40GB", 40960, (8, 0), Decimal("1.09"), 0.06, True),
    GpuKind("NVIDIA L40S", 46068, (8, 9), Decimal("0.99"), 0.08, True),
    GpuKind("NVIDIA L4", 23034, (8, 9), Decimal("0.45"), 0.05, True),
    GpuKind("NVIDIA RTX A6000", 49140, (8, 6), Decimal("0.55"), 0.05, True),
    GpuKind("NVIDIA GeForce RTX 4090", 24564, (8, 9), Decimal("0.39"), 0.25, False),
    GpuKind("NVIDIA GeForce RTX 3090", 24576, (8, 6), Decimal("0.22"), 0.15, False),
)
REGIONS: Final = (
    ("us-east", 0.22),
    ("us-west", 0.15),
    ("us-central", 0.10),
    ("eu-west", 0.15),
    ("eu-central", 0.10),
    ("eu-north", 0.08),
    ("ap-northeast", 0.08),
    ("ap-southeast", 0.07),
    ("sa-east", 0.03),
    ("me-central", 0.02),
)
_HEALTH: Final[tuple[tuple[Health, float], ...]] = (
    ("Healthy", 0.94),
    ("Degraded", 0.03),
    ("NeedsReset", 0.01),
    ("Unhealthy", 0.01),
    ("Lost", 0.01),
)
GIB: Final = 2**30


@dataclass(frozen=True)
class _Supplier:
    name: str
    region: str
    verified: bool
    head_capable: bool
    reputation: float
    price_factor: Decimal


def synthetic_inventory(nodes: int = 10_000, seed: int = 0) -> list[NodeOffer]:
    """``nodes`` GPU nodes averaging 8 GPUs each, sorted by name; same seed, same mesh."""
    rng = random.Random(seed)
    dc_suppliers = [_supplier(rng, f"dc{i:03d}", data_centre=True) for i in range(60)]
    home_suppliers = [_supplier(rng, f"rig{i:04d}", data_centre=False) for i in range(600)]
    offers = []
    consumer = 0
    for i in range(nodes):
        kind = rng.choices(GPU_KINDS, weights=[k.share for k in GPU_KINDS])[0]
        if kind.data_centre:
            # Few large suppliers hold most data-centre nodes.
            supplier = dc_suppliers[min(int(rng.paretovariate(1.2)) - 1, len(dc_suppliers) - 1)]
            gpus = 8
        else:
            supplier = rng.choice(home_suppliers)
            gpus = 4 if consumer % 2 == 0 else 12  # rigs of 4 and 12 average 8
            consumer += 1
        offers.append(_node(rng, f"n{i:05d}-{supplier.name}", kind, supplier, gpus))
    if consumer % 2:  # keep the average at exactly 8 GPUs per node
        last = next(o for o in reversed(offers) if o.gpus_total in (4, 12))
        index = offers.index(last)
        offers[index] = replace(last, gpus_total=8, gpus_free=min(last.gpus_free, 8))
    return sorted(offers, key=lambda o: o.name)


def _supplier(rng: random.Random, name: str, data_centre: bool) -> _Supplier:
    region = rng.choices([r for r, _ in REGIONS], weights=[w for _, w in REGIONS])[0]
    verified = rng.random() < (0.9 if data_centre else 0.4)
    return _Supplier(
        name=name,
        region=region,
        verified=verified,
        head_capable=data_centre and verified and rng.random() < 0.5,
        reputation=round(rng.uniform(0.7, 1.0) if data_centre else rng.uniform(0.2, 1.0), 2),
        price_factor=Decimal(rng.randrange(70, 150)) / 100,
    )


def _node(
    rng: random.Random, name: str, kind: GpuKind, supplier: _Supplier, gpus: int
) -> NodeOffer:
    roll = rng.random()
    free = gpus if roll < 0.35 else rng.randrange(1, gpus) if roll < 0.7 else 0
    health = rng.choices([h for h, _ in _HEALTH], weights=[w for _, w in _HEALTH])[0]
    cores = 192 if kind.data_centre else 32
    used_share = 1 - free / gpus
    return NodeOffer(
        name=name,
        supplier=supplier.name,
        region=supplier.region,
        gpu_model=kind.product,
        gpu_memory_mib=kind.memory_mib,
        compute_capability=kind.capability,
        gpus_total=gpus,
        gpus_free=free,
        price_per_gpu_hour=(kind.price * supplier.price_factor).quantize(Decimal("0.01")),
        verified=supplier.verified,
        reputation=supplier.reputation,
        health=health,
        cordoned=rng.random() < 0.01,
        tainted=rng.random() < 0.005,
        head_capable=supplier.head_capable,
        cpu_free_millicores=int(cores * 1000 * (1 - 0.9 * used_share)),
        memory_free_bytes=int((2048 if kind.data_centre else 256) * GIB * (1 - 0.9 * used_share)),
    )


def make_offer(name: str, **fields: Any) -> NodeOffer:
    """A healthy, verified 8 x H100 node with plenty of CPU; override any field."""
    defaults: dict[str, Any] = {
        "supplier": "acme",
        "region": "eu-west",
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "gpu_memory_mib": 81559,
        "compute_capability": (9, 0),
        "gpus_total": 8,
        "gpus_free": 8,
        "price_per_gpu_hour": Decimal("2.00"),
        "verified": True,
        "reputation": 0.9,
        "health": "Healthy",
        "head_capable": False,
        "cpu_free_millicores": 128_000,
        "memory_free_bytes": 1024 * GIB,
    }
    defaults.update(fields)
    if "gpus_free" not in fields:
        defaults["gpus_free"] = defaults["gpus_total"]
    return NodeOffer(name=name, **defaults)
