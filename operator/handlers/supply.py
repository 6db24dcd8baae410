"""kopf glue for supply: Nodes and GPUNodes changing what placement can use.

One handler for both kinds of workload: it tells GPUClusters and Jobs, and only when
something placement reads changed (a heartbeat or a kubelet status update does not).
It runs on kopf's event loop: it only compares and enqueues.
"""

from __future__ import annotations

from typing import Any

import kopf

from gpumesh.api.base import GROUP, VERSION
from gpumesh.operator.handlers import gpucluster, job
from gpumesh.operator.handlers.runtime import RUNTIME
from gpumesh.operator.world import trim_node

_fingerprints: dict[str, str] = {}


@kopf.on.event(GROUP, VERSION, "gpunodes")
@kopf.on.event("", "v1", "nodes")
async def supply_changed(
    type: str | None, name: str, body: kopf.Body, resource: kopf.Resource, **indexes: Any
) -> None:
    """Waiting work gets another try now rather than at resync; running work a look.

    A deleted Node or GPUNode always counts: its last state is what the fingerprint has.
    """
    key = f"{resource.plural}/{name}"
    if type == "DELETED":
        _fingerprints.pop(key, None)
    else:
        relevant = (
            repr(trim_node(body))
            if resource.plural == "nodes"
            else repr((dict(body.spec), body.status.get("health"), body.status.get("gpuCount")))
        )
        if _fingerprints.get(key) == relevant:
            return
        _fingerprints[key] = relevant
    RUNTIME.remember(indexes)
    gpucluster.supply_moved(name)
    job.supply_moved(name, indexes)
