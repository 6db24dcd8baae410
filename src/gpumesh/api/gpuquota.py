"""GPUQuota: hard limits on what one namespace's GPUClusters and Jobs may hold at once.

Like a ResourceQuota, but counted in what renters buy here: GPUs and US dollars per hour.
Admission never lets a namespace pass a limit; what does not fit waits in the queue. With
several GPUQuotas in a namespace, every one of them holds.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field

from gpumesh.api.base import (
    API_VERSION,
    ApiModel,
    Conditions,
    ObjectMeta,
    Price,
    StatusModel,
)

MAX_QUOTA_GPUS = 1_000_000


class GPUQuotaLimits(ApiModel):
    """Upper bounds; an unset field is not limited."""

    gpus: int | None = Field(
        default=None,
        ge=0,
        le=MAX_QUOTA_GPUS,
        description="Most GPUs the namespace's workloads may hold at once.",
    )
    price_per_hour: Price | None = Field(
        default=None,
        description='Most US dollars per hour the namespace may spend at once, as "120.00".',
    )


class GPUQuotaSpec(ApiModel):
    """The limits for the GPUQuota's namespace."""

    hard: GPUQuotaLimits = Field(
        default_factory=GPUQuotaLimits,
        description="Hard limits: admission queues any workload that would pass one.",
    )


class GPUQuotaUsage(StatusModel):
    """What admitted workloads of the namespace hold now."""

    gpus: int = Field(default=0, ge=0, description="GPUs held by admitted workloads.")
    price_per_hour: Price = Field(
        default=Decimal(0), description="US dollars per hour of the GPUs they hold."
    )


class GPUQuotaStatus(StatusModel):
    """Usage against the limits, computed by the operator on each admission pass."""

    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this status describes."
    )
    conditions: Conditions = Field(
        default_factory=list, description="Ready; Exhausted while a workload waits on it."
    )
    used: GPUQuotaUsage = Field(
        default_factory=GPUQuotaUsage, description="What admitted workloads hold."
    )
    admitted: int = Field(default=0, ge=0, description="Workloads holding part of the quota.")
    waiting: int = Field(default=0, ge=0, description="Workloads queued because of this quota.")


class GPUQuota(ApiModel):
    """Hard limits on GPUs and spend per hour for a namespace."""

    api_version: Literal["gpumesh.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["GPUQuota"] = "GPUQuota"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: GPUQuotaSpec = Field(default_factory=GPUQuotaSpec)
    status: GPUQuotaStatus | None = None
