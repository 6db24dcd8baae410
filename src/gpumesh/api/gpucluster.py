"""GPUCluster: a renter's request for a Ray cluster on federated supplier GPUs."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from gpumesh.api.base import (
    API_VERSION,
    CEL_KEY,
    LIST_SET,
    ApiModel,
    ComputeCapability,
    Conditions,
    DnsLabel,
    ImageReference,
    Labels,
    NameLimit,
    ObjectMeta,
    Price,
    Priority,
    Quantity,
    RayStartParams,
    StatusModel,
    UnhealthyNodes,
    cel,
    list_map,
)

RAY_VERSION_PATTERN = r"^[0-9]+\.[0-9]+\.[0-9]+$"
DEFAULT_RAY_VERSION = "2.52.0"
PRIMARY_GROUP = "workers"

ShortText = Annotated[str, StringConstraints(min_length=1, max_length=128)]

PreemptionPolicy = Literal["Never", "LowerPriority"]


class GPUSelector(ApiModel):
    """Which GPUs a worker may run on. Empty means any healthy GPU."""

    models: Annotated[list[ShortText], Field(max_length=16, json_schema_extra=LIST_SET)] = Field(
        default_factory=list,
        description=(
            "Accepted GPU models. An entry matches a GPU when every word of it appears in the "
            "GPU's product name, ignoring case, '-' and '_': 'H100' matches 'NVIDIA H100 80GB "
            "HBM3', 'A100 80GB' matches 'NVIDIA A100-SXM4-80GB'. Empty accepts any model."
        ),
    )
    min_memory_mib: int | None = Field(
        default=None, ge=1024, le=1048576, description="Least memory per GPU, in MiB."
    )
    min_compute_capability: ComputeCapability | None = Field(
        default=None, description="Least CUDA compute capability, as major.minor (8.0, 9.0)."
    )


_REPLICA_RULES: list[Any] = [
    cel(
        "self.minReplicas <= self.replicas",
        "replicas must not be below minReplicas",
    ),
    cel(
        "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
        "replicas must not exceed maxReplicas",
    ),
    cel(
        "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
        "minReplicas must not exceed maxReplicas",
    ),
]


class WorkerGroup(ApiModel):
    """A set of identical Ray workers, each holding ``gpusPerWorker`` GPUs of one node."""

    model_config = ConfigDict(json_schema_extra={CEL_KEY: _REPLICA_RULES})

    gpu: GPUSelector = Field(
        default_factory=GPUSelector, description="Which GPUs the workers may run on."
    )
    gpus_per_worker: int = Field(
        default=1, ge=1, le=16, description="GPUs each worker holds; all on one node."
    )
    cpu_per_worker: Quantity | None = Field(
        default=None, description="CPU request and limit per worker; default 4 per GPU."
    )
    memory_per_worker: Quantity | None = Field(
        default=None, description="Memory request and limit per worker; default 16Gi per GPU."
    )
    replicas: int = Field(default=1, ge=0, le=1000, description="Workers wanted now.")
    min_replicas: int = Field(
        default=0, ge=0, le=1000, description="Fewest workers autoscaling may leave."
    )
    max_replicas: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Most workers autoscaling may add; unset means replicas.",
    )
    ray_start_params: RayStartParams = Field(
        default_factory=dict, description="Extra `ray start` parameters for these workers."
    )

    @model_validator(mode="after")
    def _replicas_within_bounds(self) -> WorkerGroup:
        problems = []
        if self.min_replicas > self.replicas:
            problems.append("replicas must not be below minReplicas")
        if self.max_replicas is not None and self.replicas > self.max_replicas:
            problems.append("replicas must not exceed maxReplicas")
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            problems.append("minReplicas must not exceed maxReplicas")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def gpus(self) -> int:
        """GPUs this group holds at its current replica count."""
        return self.replicas * self.gpus_per_worker


class NamedWorkerGroup(WorkerGroup):
    """A further worker group, for clusters that mix GPU kinds."""

    name: Annotated[DnsLabel, StringConstraints(max_length=32)] = Field(
        description="Group name, unique in the cluster; 'workers' is taken by spec.workers."
    )


class HeadSpec(ApiModel):
    """The Ray head: no GPU, placed on a trusted, head-capable node."""

    cpu: Quantity = Field(default="2", description="CPU request and limit of the head.")
    memory: Quantity = Field(default="8Gi", description="Memory request and limit of the head.")
    node_selector: Labels = Field(
        default_factory=dict,
        description="Further labels the head's node must carry, on top of head capability.",
    )
    ray_start_params: RayStartParams = Field(
        default_factory=dict, description="Extra `ray start` parameters for the head."
    )


class PlacementPolicy(ApiModel):
    """Hard constraints and preferences for choosing supplier nodes."""

    regions: Annotated[list[DnsLabel], Field(max_length=32, json_schema_extra=LIST_SET)] = Field(
        default_factory=list, description="Allowed regions; empty allows every region."
    )
    suppliers: Annotated[list[DnsLabel], Field(max_length=32, json_schema_extra=LIST_SET)] = Field(
        default_factory=list, description="Allowed suppliers; empty allows every one."
    )
    max_price_per_gpu_hour: Price | None = Field(
        default=None, description='Highest price per GPU-hour in US dollars, as "2.50".'
    )
    verified_only: bool = Field(
        default=False, description="Use only nodes that passed proof-of-GPU verification."
    )
    min_reputation: float | None = Field(
        default=None, ge=0, le=1, description="Least supplier reputation, from 0 to 1."
    )
    strategy: Literal["Pack", "Spread"] = Field(
        default="Pack",
        description="Pack workers onto few suppliers (less latency) or Spread them (less risk).",
    )
    max_latency_ms: int | None = Field(
        default=None, ge=1, le=10000, description="Highest mesh round trip between chosen nodes."
    )


class FailoverPolicy(ApiModel):
    """What to do with workers on a node whose GPUs fail."""

    mode: Literal["Migrate", "Never"] = Field(
        default="Migrate", description="Migrate workers off failing nodes, or leave them."
    )
    unhealthy_grace_seconds: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="How long a node may stay unhealthy before its workers move.",
    )
    max_migrations: int = Field(
        default=10, ge=0, le=1000, description="Migrations allowed over the cluster's life."
    )


class GPUClusterSpec(ApiModel):
    """What the renter asks for."""

    model_config = ConfigDict(
        json_schema_extra={
            CEL_KEY: [
                cel(
                    "!has(self.additionalWorkerGroups) || "
                    "self.additionalWorkerGroups.all(g, g.name != 'workers')",
                    "additionalWorkerGroups must not use the name 'workers'",
                )
            ]
        }
    )

    ray_version: Annotated[str, StringConstraints(max_length=16, pattern=RAY_VERSION_PATTERN)] = (
        Field(default=DEFAULT_RAY_VERSION, description="Ray version the image runs.")
    )
    image: ImageReference | None = Field(
        default=None, description="Container image; default rayproject/ray:<rayVersion>-gpu."
    )
    head: HeadSpec = Field(default_factory=HeadSpec, description="The Ray head.")
    workers: WorkerGroup = Field(
        description="The main worker group; `kubectl scale` changes its replicas."
    )
    additional_worker_groups: Annotated[
        list[NamedWorkerGroup], Field(max_length=7, json_schema_extra=list_map("name"))
    ] = Field(default_factory=list, description="Further worker groups, for mixed GPU kinds.")
    placement: PlacementPolicy = Field(
        default_factory=PlacementPolicy, description="Where workers may run."
    )
    priority: Priority = Field(
        default=0, description="Higher goes first in the queue and may preempt lower."
    )
    preemption_policy: PreemptionPolicy = Field(
        default="LowerPriority",
        description="Whether this request may preempt lower-priority work to fit.",
    )
    failover: FailoverPolicy = Field(
        default_factory=FailoverPolicy, description="How workers leave failing nodes."
    )
    suspend: bool = Field(default=False, description="Hold the cluster without any workers.")

    @model_validator(mode="after")
    def _group_names_distinct(self) -> GPUClusterSpec:
        names = [g.name for g in self.additional_worker_groups]
        if PRIMARY_GROUP in names:
            raise ValueError("additionalWorkerGroups must not use the name 'workers'")
        if len(set(names)) != len(names):
            raise ValueError("additionalWorkerGroups names must be unique")
        return self

    def worker_groups(self) -> list[tuple[str, WorkerGroup]]:
        """Every group with its name, the primary one first."""
        return [(PRIMARY_GROUP, self.workers)] + [
            (g.name, g) for g in self.additional_worker_groups
        ]

    def container_image(self) -> str:
        """The image to run: the explicit one, else Ray's GPU image for rayVersion."""
        return self.image or f"rayproject/ray:{self.ray_version}-gpu"


# --- status --------------------------------------------------------------------------

GPUClusterPhase = Literal[
    "Pending", "Provisioning", "Ready", "Degraded", "Migrating", "Suspended", "Failed"
]


class WorkerPlacement(StatusModel):
    """Workers of one group on one supplier node."""

    group: str = Field(description="Worker group name.")
    node: str = Field(description="Kubernetes node name.")
    supplier: str = Field(description="Supplier owning the node.")
    region: str = Field(description="Region of the node.")
    gpu_model: str = Field(description="GPU product name.")
    workers: int = Field(ge=0, description="Workers of the group on this node.")
    gpus: int = Field(ge=0, description="GPUs held on this node.")
    price_per_gpu_hour: Price = Field(description="Node's price per GPU-hour.")
    ready: int = Field(
        default=0,
        ge=0,
        description="Of those workers, how many are ready: metering counts only their GPUs.",
    )


EXACT_DECIMAL_PATTERN = r"^[0-9]{1,24}(\.[0-9]{1,12})?$"


def _exact_decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, str) and re.fullmatch(EXACT_DECIMAL_PATTERN, value):
        return Decimal(value)
    raise ValueError('should be a non-negative decimal string such as "4644.0000"')


ExactDecimal = Annotated[
    Decimal,
    BeforeValidator(_exact_decimal),
    PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": EXACT_DECIMAL_PATTERN, "maxLength": 37}),
]
"""A decimal kept exact in a string (no float rounding across reconciles)."""


class Metering(StatusModel):
    """Bookkeeping that counts GPU time exactly once, across reconciles and restarts."""

    metered_until: datetime = Field(
        description="GPU time before this instant is counted in gpuSeconds and cost."
    )
    price_seconds: ExactDecimal = Field(
        default=Decimal(0),
        description=(
            "Sum of price per GPU-hour x GPUs x seconds held, unrounded; cost is this / 3600."
        ),
    )


class HeadStatus(StatusModel):
    """Where the Ray head runs and how to reach it."""

    node: str | None = Field(default=None, description="Node running the head.")
    service_name: str | None = Field(default=None, description="Service in front of the head.")
    dashboard_url: str | None = Field(default=None, description="Ray dashboard address.")


class GPUClusterStatus(StatusModel):
    """What gpumesh observed and did; computed, never hand-written."""

    phase: GPUClusterPhase = Field(default="Pending", description="Summary for people.")
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this status describes."
    )
    conditions: Conditions = Field(
        default_factory=list, description="Ready, Reconciling, Stalled, Degraded."
    )
    ray_cluster_name: str | None = Field(default=None, description="The KubeRay RayCluster.")
    placements: Annotated[list[WorkerPlacement], Field(max_length=1000)] = Field(
        default_factory=list, description="Chosen supplier nodes, per worker group."
    )
    desired_workers: int = Field(default=0, ge=0, description="Workers asked for, all groups.")
    ready_workers: int = Field(default=0, ge=0, description="Workers ready, all groups.")
    worker_replicas: int = Field(
        default=0, ge=0, description="Ready workers of the main group (the scale subresource)."
    )
    selector: str | None = Field(
        default=None, description="Label selector of the main group's pods (for autoscalers)."
    )
    gpus: int = Field(default=0, ge=0, description="GPUs held.")
    price_per_hour: Price | None = Field(default=None, description="US dollars per hour now.")
    gpu_seconds: float | None = Field(default=None, ge=0, description="GPU-seconds used so far.")
    cost: Price | None = Field(default=None, description="US dollars spent so far.")
    metering: Metering | None = Field(
        default=None, description="Where GPU-time metering stands (for the operator)."
    )
    head: HeadStatus | None = Field(
        default=None,
        description="The Ray head, once it was ready: its node, Service and dashboard.",
    )
    queue_position: int | None = Field(
        default=None,
        ge=0,
        description="Place in the admission queue while workers wait for GPUs; 0 is next.",
    )
    migrations: int = Field(default=0, ge=0, description="Migrations so far.")
    unhealthy_nodes: UnhealthyNodes = Field(
        default_factory=list,
        description="Nodes under it unhealthy since when; workers leave them once "
        "failover.unhealthyGraceSeconds passed.",
    )
    last_scheduled_time: datetime | None = Field(
        default=None, description="When placement last changed."
    )


MAX_NAME_LENGTH = 53
"""KubeRay's limit on RayCluster names (its longest Service suffix, '-serve-svc', must still
fit 63 characters); a GPUCluster's RayCluster takes the GPUCluster's name."""


class GPUClusterMeta(ObjectMeta):
    """A GPUCluster's metadata: its name becomes the RayCluster's and its Services'."""

    name_limit = NameLimit(
        MAX_NAME_LENGTH,
        "the RayCluster, its Services and its pods' labels are named after it",
        dns1035=True,
    )


class GPUCluster(ApiModel):
    """A Ray cluster on supplier GPUs, reconciled into a KubeRay RayCluster."""

    api_version: Literal["gpumesh.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["GPUCluster"] = "GPUCluster"
    metadata: GPUClusterMeta = Field(default_factory=GPUClusterMeta)
    spec: GPUClusterSpec
    status: GPUClusterStatus | None = None
