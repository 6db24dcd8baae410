"""Why an attempt ended, and when the next one may start (pure).

Program failures count against ``spec.maxRetries`` and wait an exponential backoff.
Infrastructure failures (lost nodes or cluster, preemption, a Ray job nobody could
observe to its end) do not: the job did nothing wrong, so the next attempt starts as soon
as GPUs allow, and they are counted apart in ``status.infrastructureRetries``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from gpumesh.backoff import backoff_delay
from gpumesh.operator.jobs.observe import (
    COMPLETE,
    JOB_STOPPED,
    REASON_DEADLINE,
    REASON_GRACE_EXCEEDED,
    REASON_PRE_RUNNING_DEADLINE,
    VALIDATION_FAILED,
    RayJobView,
)

#: Longest wait between attempts, however many failed (as far as doubling goes).
MAX_BACKOFF_SECONDS: Final = 6 * 3600

FailureKind = Literal["Program", "Infrastructure", "Permanent"]

#: KubeRay reasons meaning the cluster, not the program, let the attempt down.
_INFRASTRUCTURE_REASONS: Final = frozenset({REASON_GRACE_EXCEEDED, REASON_PRE_RUNNING_DEADLINE})


@dataclass(frozen=True)
class Failure:
    """How an attempt failed: the kind decides retries; reason and message are for people."""

    kind: FailureKind
    reason: str
    message: str


def backoff_seconds(base: int, failures: int) -> int:
    """Wait before the attempt after ``failures`` program failures: base, 2x, 4x ... capped."""
    return int(backoff_delay(failures, base, max(MAX_BACKOFF_SECONDS, base)))


def classify(view: RayJobView, infrastructure_trouble: str | None) -> Failure:
    """Why the finished, unsuccessful RayJob ``view`` failed.

    ``infrastructure_trouble`` says what went wrong under the attempt meanwhile (a node of
    its cluster lost, the referenced GPUCluster not Ready), or None; when set, the
    failure is the infrastructure's whatever the Ray job reported, since a program whose
    node vanished fails through no fault of its own.
    """
    said = view.message or view.reason or view.job_status or view.deployment_status
    if view.deployment_status == VALIDATION_FAILED:
        return Failure("Permanent", "InvalidRayJob", f"KubeRay rejected the RayJob: {said}")
    if view.deployment_status == COMPLETE and view.job_status == JOB_STOPPED:
        return Failure("Permanent", "Stopped", "the Ray job was stopped")
    if view.reason == REASON_DEADLINE:
        return Failure("Permanent", "DeadlineExceeded", f"KubeRay: {said}")
    if infrastructure_trouble is not None:
        return Failure("Infrastructure", "InfrastructureFailure", infrastructure_trouble)
    if view.reason in _INFRASTRUCTURE_REASONS:
        return Failure("Infrastructure", "InfrastructureFailure", f"KubeRay: {said}")
    return Failure("Program", view.reason or "AppFailed", f"the Ray job failed: {said}")
