"""Job: a Ray program a renter wants run, queued and retried by gpumesh.

Named like batch/v1 Job on purpose (it is *the* job of the mesh); address it as
``jobs.gpumesh.io`` or by its short name ``gjob`` where both kinds exist.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from gpumesh.api.base import (
    API_VERSION,
    CEL_KEY,
    ApiModel,
    Conditions,
    DnsLabel,
    NameLimit,
    ObjectMeta,
    Price,
    Priority,
    StatusModel,
    UnhealthyNodes,
    cel,
)
from gpumesh.api.gpucluster import GPUClusterSpec, Metering, PreemptionPolicy, WorkerPlacement

THIRTY_DAYS = 30 * 24 * 3600
URI_PATTERN = r"^[a-z][a-z0-9+.-]*://[^\s]+$"


class ClusterRef(ApiModel):
    """Names a GPUCluster in the Job's namespace."""

    name: DnsLabel = Field(description="Name of the GPUCluster to run on.")


class JobSpec(ApiModel):
    """The program, where it runs, and how hard to try."""

    model_config = ConfigDict(
        json_schema_extra={
            CEL_KEY: [
                cel(
                    "has(self.clusterRef) != has(self.clusterTemplate)",
                    "exactly one of clusterRef and clusterTemplate must be set",
                ),
            ]
        }
    )

    entrypoint: Annotated[str, StringConstraints(min_length=1, max_length=16384)] = Field(
        description="Shell command the Ray job runs, as `python train.py --epochs 3`."
    )
    runtime_env: dict[str, Any] | None = Field(
        default=None,
        description="Ray runtime environment (pip, env_vars, working_dir...), as Ray reads it.",
    )
    cluster_ref: ClusterRef | None = Field(
        default=None, description="Run on this existing GPUCluster; excludes clusterTemplate."
    )
    cluster_template: GPUClusterSpec | None = Field(
        default=None,
        description="Run on a cluster made for this job and removed after it; excludes clusterRef.",
    )
    priority: Priority = Field(
        default=0, description="Higher goes first in the queue and may preempt lower."
    )
    preemption_policy: PreemptionPolicy = Field(
        default="LowerPriority",
        description="Whether this job may preempt lower-priority work to fit.",
    )
    max_retries: int = Field(
        default=0,
        ge=0,
        le=20,
        description="Retries after the program fails; infrastructure failures do not count.",
    )
    retry_backoff_seconds: int = Field(
        default=30, ge=1, le=3600, description="Wait before the first retry; doubles each time."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=THIRTY_DAYS, description="Fail the job after this long running."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=THIRTY_DAYS, description="Delete the job this long after it ends."
    )
    checkpoint_uri: (
        Annotated[str, StringConstraints(max_length=1024, pattern=URI_PATTERN)] | None
    ) = Field(
        default=None,
        description="Where attempts save and resume training (GPUMESH_CHECKPOINT_URI).",
    )
    suspend: bool = Field(default=False, description="Hold the job; a running one is stopped.")

    @model_validator(mode="after")
    def _one_cluster_source(self) -> JobSpec:
        if (self.cluster_ref is None) == (self.cluster_template is None):
            raise ValueError("exactly one of clusterRef and clusterTemplate must be set")
        return self


JobPhase = Literal[
    "Queued",
    "Admitted",
    "Starting",
    "Running",
    "Succeeded",
    "Failed",
    "Suspended",
    "Migrating",
]


class JobStatus(StatusModel):
    """Where the job stands; computed by the operator."""

    phase: JobPhase = Field(default="Queued", description="Summary for people.")
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this status describes."
    )
    conditions: Conditions = Field(default_factory=list, description="Ready, Stalled, ...")
    queue_position: int | None = Field(
        default=None, ge=0, description="Place in the admission queue; 0 is next."
    )
    attempts: int = Field(default=0, ge=0, description="Attempts started.")
    failed_attempts: int = Field(
        default=0, ge=0, description="Attempts the program failed (count against maxRetries)."
    )
    infrastructure_retries: int = Field(
        default=0, ge=0, description="Attempts lost to node failure (do not count)."
    )
    start_time: datetime | None = Field(default=None, description="When the job first ran.")
    completion_time: datetime | None = Field(default=None, description="When the job ended.")
    ray_job_name: str | None = Field(default=None, description="The KubeRay RayJob.")
    ray_job_id: str | None = Field(default=None, description="The Ray job's submission id.")
    ray_cluster_name: str | None = Field(default=None, description="The RayCluster it runs on.")
    dashboard_url: str | None = Field(default=None, description="Ray dashboard address.")
    placements: Annotated[list[WorkerPlacement], Field(max_length=1000)] = Field(
        default_factory=list,
        description="Supplier nodes the current attempt holds, per worker group; empty when none.",
    )
    head_node: str | None = Field(default=None, description="Node chosen for the Ray head.")
    unhealthy_nodes: UnhealthyNodes = Field(
        default_factory=list,
        description="Nodes under the current attempt unhealthy since when; the attempt "
        "leaves them once failover.unhealthyGraceSeconds passed.",
    )
    gpus: int = Field(default=0, ge=0, description="GPUs held now.")
    price_per_hour: Price | None = Field(default=None, description="US dollars per hour now.")
    active_since: datetime | None = Field(
        default=None,
        description="Since when the current attempt holds its cluster; unset while waiting.",
    )
    active_seconds: float = Field(
        default=0,
        ge=0,
        description=(
            "Seconds attempts held their clusters before activeSince; activeDeadlineSeconds "
            "counts these plus the current stretch (time queued or suspended does not count)."
        ),
    )
    next_attempt_time: datetime | None = Field(
        default=None, description="Retry backoff: the next attempt may not start before this."
    )
    preempted_by: str | None = Field(
        default=None, description="The workload that preempted this job, until it runs again."
    )
    gpu_seconds: float = Field(default=0, ge=0, description="GPU-seconds held so far.")
    cost: Price | None = Field(default=None, description="US dollars spent so far.")
    metering: Metering | None = Field(
        default=None, description="Where GPU-time metering stands (for the operator)."
    )
    message: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        default=None, description="Last noteworthy event, for people."
    )


MAX_NAME_LENGTH = 63
"""A Job's name is the value of the label on its RayJobs, RayClusters and pods."""


class JobMeta(ObjectMeta):
    """A Job's metadata: its name labels everything made for it."""

    name_limit = NameLimit(
        MAX_NAME_LENGTH, "it is the value of the gpumesh.io/job label on its RayJobs and pods"
    )


class Job(ApiModel):
    """A Ray job on the mesh, reconciled into a KubeRay RayJob."""

    api_version: Literal["gpumesh.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["Job"] = "Job"
    metadata: JobMeta = Field(default_factory=JobMeta)
    spec: JobSpec
    status: JobStatus | None = None
