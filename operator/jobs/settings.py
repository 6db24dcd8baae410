"""Job-lifecycle settings, read once from the environment.

Kept apart from :mod:`gpumesh.operator.settings` only while that module has another
owner; fold them together when convenient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gpumesh.operator.render.rayjob import SubmissionMode

SUBMISSION_MODES: tuple[SubmissionMode, ...] = (
    "K8sJobMode",
    "HTTPMode",
    "InteractiveMode",
    "SidecarMode",
)


@dataclass(frozen=True)
class JobSettings:
    """What a deployment may tune about Jobs and metering."""

    submission_mode: SubmissionMode = "K8sJobMode"
    """How KubeRay submits each attempt. InteractiveMode leaves submission to someone
    else; the e2e tests use it because fake pods serve no Ray dashboard to submit to."""
    meter_flush_seconds: float = 60.0
    """Most seconds of GPU time counted but not yet written into a status."""

    @classmethod
    def from_env(cls) -> JobSettings:
        env = os.environ
        mode = env.get("GPUMESH_RAYJOB_SUBMISSION_MODE", cls.submission_mode)
        if mode not in SUBMISSION_MODES:
            raise ValueError(
                f"GPUMESH_RAYJOB_SUBMISSION_MODE={mode!r}: use one of {', '.join(SUBMISSION_MODES)}"
            )
        return cls(
            submission_mode=mode,
            meter_flush_seconds=float(
                env.get("GPUMESH_METER_FLUSH_SECONDS", cls.meter_flush_seconds)
            ),
        )


JOB_SETTINGS = JobSettings.from_env()
