"""kopf glue for agent liveness: a GPUNode whose agent's Lease lapsed is marked Lost.

Lease events (through :mod:`.leases`) only note when each agent's Lease lapses. One
worker thread wakes at that time, re-reads the Lease (renewals may just be late through
the watch), and writes the GPUNode's health if the Lease really lapsed. The rules are in
:mod:`gpumesh.operator.liveness`. A restarted operator learns every Lease again from
kopf's initial listing, so a Lease that lapsed while it was down is marked at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import kopf

from gpumesh.api.base import GROUP, VERSION
from gpumesh.operator import kube
from gpumesh.operator.handlers.runtime import RUNTIME, entries
from gpumesh.operator.liveness import lapses_at, lost_patch
from gpumesh.operator.mesh.publish import LEASE_PREFIX
from gpumesh.operator.mesh.state import lease_node
from gpumesh.operator.settings import SETTINGS
from gpumesh.operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

#: A handler has not run yet (kopf's context unknown): look again after this long.
NOT_STARTED_RETRY_S = 1.0

_lock = threading.Lock()
_lapses: dict[str, float] = {}
"""node -> when its agent's Lease lapses (Unix time), as the watch last showed it."""


def lease_changed(type: str | None, body: Mapping[str, Any]) -> None:
    """An agent renewed, created or deleted its Lease: look when it would lapse.

    A deleted Lease keeps the time it had left: an agent that restarts may delete and
    recreate it, and must not make its node Lost for that.
    """
    node = lease_node(body)
    if node is None:
        return
    with _lock:
        if type == "DELETED":
            at = _lapses.get(node)
        else:
            at = lapses_at(body)
            if at is not None:
                _lapses[node] = at
    if at is not None:
        QUEUE.add(node, after=max(0.0, at - time.time()))


def _check(node: str) -> None:
    if RUNTIME.run(_check_in_context, node) is None:
        QUEUE.add(node, after=NOT_STARTED_RETRY_S)


def _check_in_context(node: str) -> bool:
    with _lock:
        at = _lapses.get(node)
    now = time.time()
    if at is None:
        return True
    if at > now:
        QUEUE.add(node, after=at - now)  # renewed since this wake-up was asked for
        return True
    k = kube.shared()
    lease = k.get_lease(SETTINGS.namespace, f"{LEASE_PREFIX}{node}")
    fresh = lapses_at(lease) if lease is not None else None
    if fresh is not None and fresh > now:
        with _lock:
            _lapses[node] = max(fresh, _lapses.get(node, fresh))
        QUEUE.add(node, after=fresh - now)
        return True
    found = entries(RUNTIME.index("gpunode_index"), node)
    gpunode: Mapping[str, Any] = found[0] if found else {}
    patch = lost_patch((gpunode.get("status") or {}).get("health"), lease, now)
    if (
        found
        and patch is not None
        and k.patch_cluster_status(GROUP, VERSION, "gpunodes", node, patch)
    ):
        log.warning("GPUNode %s: its agent's Lease lapsed; marked Lost", node)
        kopf.event(
            cast(
                kopf.Body,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "GPUNode",
                    "metadata": gpunode["metadata"],
                },
            ),
            type="Warning",
            reason="AgentLost",
            message=(
                f"the agent's Lease {SETTINGS.namespace}/{LEASE_PREFIX}{node} "
                f"{'is gone' if lease is None else 'lapsed'}: no GPU health is known, so "
                "the node is Lost until the agent reports again"
            ),
        )
    if lease is None:
        with _lock:
            _lapses.pop(node, None)  # gone for good: nothing left to watch
    return True


QUEUE: WorkQueue[str] = WorkQueue(_check, workers=1, name="agent-liveness")


@kopf.on.startup()
def start_liveness(**_: Any) -> None:
    QUEUE.start()


@kopf.on.cleanup()
def stop_liveness(**_: Any) -> None:
    QUEUE.stop()
