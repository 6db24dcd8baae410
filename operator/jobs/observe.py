"""What the Job reconcile reads from a KubeRay RayJob and a referenced GPUCluster (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

#: RayJob ``status.jobDeploymentStatus`` values (KubeRay v1.6/v1.7).
DEPLOYMENT_NEW: Final = ""
INITIALIZING: Final = "Initializing"
RUNNING: Final = "Running"
COMPLETE: Final = "Complete"
FAILED: Final = "Failed"
VALIDATION_FAILED: Final = "ValidationFailed"
SUSPENDING: Final = "Suspending"
SUSPENDED: Final = "Suspended"
RETRYING: Final = "Retrying"
WAITING: Final = "Waiting"

#: RayJob ``status.jobStatus`` values: the Ray job's own state, from the Ray dashboard.
JOB_NEW: Final = ""
JOB_PENDING: Final = "PENDING"
JOB_RUNNING: Final = "RUNNING"
JOB_STOPPED: Final = "STOPPED"
JOB_SUCCEEDED: Final = "SUCCEEDED"
JOB_FAILED: Final = "FAILED"

#: RayJob ``status.reason`` when its deployment failed.
REASON_APP_FAILED: Final = "AppFailed"
REASON_SUBMISSION_FAILED: Final = "SubmissionFailed"
REASON_DEADLINE: Final = "DeadlineExceeded"
REASON_PRE_RUNNING_DEADLINE: Final = "PreRunningDeadlineExceeded"
REASON_GRACE_EXCEEDED: Final = "JobDeploymentStatusTransitionGracePeriodExceeded"
REASON_VALIDATION: Final = "ValidationFailed"


@dataclass(frozen=True)
class RayJobView:
    """One RayJob as KubeRay last reported it."""

    name: str
    suspend: bool
    deployment_status: str = DEPLOYMENT_NEW
    job_status: str = JOB_NEW
    reason: str = ""
    message: str = ""
    job_id: str | None = None
    cluster_name: str | None = None
    dashboard_url: str | None = None
    end_time: datetime | None = None

    @classmethod
    def from_object(cls, rayjob: Mapping[str, Any]) -> RayJobView:
        status = rayjob.get("status") or {}
        return cls(
            name=str(rayjob["metadata"]["name"]),
            suspend=bool((rayjob.get("spec") or {}).get("suspend")),
            deployment_status=str(status.get("jobDeploymentStatus") or ""),
            job_status=str(status.get("jobStatus") or ""),
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
            job_id=status.get("jobId") or None,
            cluster_name=status.get("rayClusterName") or None,
            dashboard_url=status.get("dashboardURL") or None,
            end_time=_time(status.get("endTime")),
        )

    @property
    def finished(self) -> bool:
        """KubeRay is done with it: no cluster will run for it again."""
        return self.deployment_status in (COMPLETE, FAILED, VALIDATION_FAILED)


@dataclass(frozen=True)
class ClusterView:
    """A GPUCluster a Job names in ``clusterRef``."""

    name: str
    phase: str
    ray_cluster_name: str | None

    @classmethod
    def from_object(cls, gpucluster: Mapping[str, Any]) -> ClusterView:
        status = gpucluster.get("status") or {}
        return cls(
            name=str(gpucluster["metadata"]["name"]),
            phase=str(status.get("phase") or "Pending"),
            ray_cluster_name=status.get("rayClusterName") or None,
        )

    @property
    def ready(self) -> bool:
        return self.phase == "Ready" and self.ray_cluster_name is not None


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None
