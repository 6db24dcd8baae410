"""GPUQuota accounting: what a namespace holds, its limits, and whether a request fits.

Several GPUQuotas in one namespace combine like ResourceQuotas: each limit is the
tightest of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

from gpumesh.api.gpuquota import GPUQuota
from gpumesh.operator.placement.explain import money

_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class QuotaLimit:
    """A namespace's combined limits; None is unlimited."""

    gpus: int | None = None
    price_per_hour: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """GPUs and spend per hour held by a namespace's admitted workloads."""

    gpus: int = 0
    price_per_hour: Decimal = _ZERO

    def plus(self, gpus: int, price_per_hour: Decimal) -> Usage:
        return Usage(self.gpus + gpus, self.price_per_hour + price_per_hour)


def quota_limits(quotas: Iterable[GPUQuota]) -> dict[str, QuotaLimit]:
    """Namespace -> the tightest limits of its GPUQuotas."""
    limits: dict[str, QuotaLimit] = {}
    for quota in quotas:
        namespace = quota.metadata.namespace or "default"
        hard = quota.spec.hard
        seen = limits.get(namespace, QuotaLimit())
        limits[namespace] = QuotaLimit(
            gpus=_tightest(seen.gpus, hard.gpus),
            price_per_hour=_tightest(seen.price_per_hour, hard.price_per_hour),
        )
    return limits


def gpus_over_quota(namespace: str, limit: QuotaLimit | None, used: Usage, gpus: int) -> str | None:
    """Why holding ``gpus`` more would pass the namespace's GPU limit; None if it fits."""
    if limit is None or limit.gpus is None or used.gpus + gpus <= limit.gpus:
        return None
    return (
        f"GPUQuota of namespace {namespace}: {used.gpus} of {limit.gpus} GPUs in use "
        f"and this needs {gpus}"
    )


def price_over_quota(
    namespace: str, limit: QuotaLimit | None, used: Usage, price_per_hour: Decimal
) -> str | None:
    """Why spending ``price_per_hour`` more would pass the price limit; None if it fits."""
    if limit is None or limit.price_per_hour is None:
        return None
    if used.price_per_hour + price_per_hour <= limit.price_per_hour:
        return None
    return (
        f"GPUQuota of namespace {namespace}: {money(used.price_per_hour)}/h of "
        f"{money(limit.price_per_hour)}/h in use and the cheapest placement adds "
        f"{money(price_per_hour)}/h"
    )


_Limit = TypeVar("_Limit", int, Decimal)


def _tightest(a: _Limit | None, b: _Limit | None) -> _Limit | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
