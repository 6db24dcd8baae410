"""kopf glue for GPUCluster events: one handler for both reconcilers that care.

The cluster's own reconcile, and the Jobs that run on it or wait for GPUs it gives back.
One handler, not one per module: kopf's cost is per handler invoked, and every status
write we make comes back as an event.
"""

from __future__ import annotations

from typing import Any

import kopf

from gpumesh.api.base import GROUP, VERSION
from gpumesh.operator.handlers import gpucluster, job
from gpumesh.operator.handlers.runtime import RUNTIME
from gpumesh.operator.reconcile_gpucluster import PLURAL


@kopf.on.event(GROUP, VERSION, PLURAL)
async def gpucluster_event(
    type: str | None,
    namespace: str | None,
    name: str,
    meta: kopf.Meta,
    body: kopf.Body,
    **indexes: Any,
) -> None:
    """Listed at start, created, edited, status written or deleted."""
    live = RUNTIME.remember(indexes)
    gpucluster.gpucluster_event(namespace, name, meta)
    job.gpucluster_changed(type, namespace, name, body, live)
