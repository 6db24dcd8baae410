"""Names and labels of the KubeRay objects made for a Job (pure)."""

from __future__ import annotations

import hashlib
import re
from typing import Final

from gpumesh.operator.world import JOB_LABEL

JOB: Final = JOB_LABEL
"""Label on a Job's RayJobs (KubeRay copies it to their RayClusters) and pods."""
ATTEMPT: Final = "gpumesh.io/attempt"
"""Label on a RayJob: which attempt of its Job it runs."""

#: KubeRay refuses longer RayJob names (its RayCluster adds a 6-character suffix).
MAX_RAYJOB_NAME: Final = 47
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def rayjob_name(job: str, attempt: int) -> str:
    """The RayJob of ``attempt`` (1-based): the Job's name, then ``<name>-a2``, ``-a3``...

    A Job name KubeRay would refuse (too long, or not a DNS-1035 label) is shortened and
    made unique with a hash of the full name.
    """
    suffix = "" if attempt <= 1 else f"-a{attempt}"
    base = job
    if len(base) + len(suffix) > MAX_RAYJOB_NAME or not _DNS1035.match(base):
        digest = hashlib.sha256(job.encode()).hexdigest()[:8]
        cleaned = re.sub(r"[^a-z0-9-]", "-", job.lower()).strip("-") or "job"
        if not cleaned[0].isalpha():
            cleaned = f"j{cleaned}"
        room = MAX_RAYJOB_NAME - len(suffix) - len(digest) - 1
        base = f"{cleaned[:room].rstrip('-')}-{digest}"
    return f"{base}{suffix}"
