"""Operator start-up settings and liveness.

The leader renews its Lease every second (operator/leader.py) and also watches it: when
renewals stop arriving through the watch, the watch stream has gone silent (a known
failure behind load balancers) and /healthz fails so that Kubernetes restarts us.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from gpumesh.operator import heap
from gpumesh.operator.render import labels as names
from gpumesh.operator.settings import SETTINGS

log = logging.getLogger(__name__)

LEADER_LEASE = "gpumesh-operator"
"""The Lease the replicas elect their leader on; its renewals are the leader's heartbeat."""


class JobsOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base (the last handled spec) for the one kind that needs it: Jobs.

    kopf deep-copies every event's whole object to build a diff base, status included,
    whatever the resource. Only the Job handlers (create, update, resume, a timer) read
    it; every other resource here is watched by event handlers and indexes that never
    do. At 1,000 RayClusters those copies were the largest share of the operator's CPU,
    so for everything but Jobs the essence is empty (and nothing is ever stored).
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        if _is_job(body):
            return super().build(body=body, extra_fields=extra_fields)
        return cast(kopf.BodyEssence, {})


def _is_job(body: Mapping[str, Any]) -> bool:
    return body.get("kind") == "Job" and str(body.get("apiVersion", "")).startswith("gpumesh.io/")


_last_heartbeat_seen = time.monotonic()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """gpumesh-owned storage names, watch timeouts, and the pool for sync handlers."""
    settings.persistence.finalizer = "gpumesh.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gpumesh.io")
    settings.persistence.diffbase_storage = JobsOnlyDiffBase(
        prefix="gpumesh.io", key="last-handled-configuration"
    )
    settings.watching.server_timeout = SETTINGS.watch_server_timeout
    settings.watching.client_timeout = SETTINGS.watch_server_timeout + 30
    settings.watching.connect_timeout = 10
    settings.watching.inactivity_timeout = SETTINGS.watch_server_timeout + 60
    # RayClusters are watched whole (not only gpumesh's): the names of the others are
    # indexed so a GPUCluster never takes over a RayCluster it does not own.
    # Our heartbeat and the agents' heartbeats (the mesh handler) live in our namespace.
    settings.watching.field_selectors["coordination.k8s.io", "leases"] = (
        f"metadata.namespace={SETTINGS.namespace}"
    )
    watch_pods_of_others(settings)
    settings.execution.max_workers = SETTINGS.max_workers
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "gpumesh-operator"
    settings.posting.event_name_prefix = "gpumesh-"


def watch_pods_of_others(settings: kopf.OperatorSettings) -> None:
    """Stream only pods gpumesh did not create, and only while they may hold GPUs.

    Placement must count GPUs that others' pods hold; gpumesh's own pods are known
    from the RayClusters (their count of ready workers, the nodes we pinned), so their
    events, most of a busy mesh's pod traffic, never reach the operator. A pod that
    finishes or gains our label stops matching and arrives as deleted.
    """
    pods = ("", "v1", "pods")
    settings.watching.label_selectors[pods] = f"!{names.CLUSTER}"
    settings.watching.field_selectors[pods] = "status.phase!=Succeeded,status.phase!=Failed"


@kopf.on.event("coordination.k8s.io", "v1", "leases", field="metadata.name", value=LEADER_LEASE)
async def heartbeat_seen(**_: Any) -> None:
    global _last_heartbeat_seen
    _last_heartbeat_seen = time.monotonic()
    # kopf runs no handler before every indexed resource is listed: the first heartbeat
    # back means the long-lived copies are in, and can be frozen (see operator/heap.py).
    if heap.freeze_listed():
        log.info("garbage collector: %d objects listed at start frozen", gc.get_freeze_count())


def watch_health() -> tuple[bool, str]:
    """Unhealthy when the leader's own renewals have not come back through a watch for
    too long (the leader's /healthz)."""
    silent = time.monotonic() - _last_heartbeat_seen
    if silent > SETTINGS.liveness_stale_seconds:
        return False, f"leader; no Lease renewal seen through the watch for {silent:.0f} s"
    return True, f"leader; Lease renewal seen through the watch {silent:.0f} s ago"
