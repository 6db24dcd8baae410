"""kopf glue for agent liveness: a GPUNode whose agent stopped renewing its Lease is Lost.

Lease events (through :mod:`.leases`) feed :class:`~gpumesh.operator.liveness.AgentLiveness`
and ask for a look when the new deadline passes. One worker thread then re-reads the Lease
(a renewal may just be late through the watch) and writes the GPUNode's health if the agent
is really silent. The rules are in :mod:`gpumesh.operator.liveness`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import kopf

from gpumesh.api.base import GROUP, VERSION
from gpumesh.api.nodes import lease_name
from gpumesh.operator import kube
from gpumesh.operator.handlers.runtime import RUNTIME, entries
from gpumesh.operator.liveness import AgentLiveness
from gpumesh.operator.mesh.publish import lease_node
from gpumesh.operator.settings import SETTINGS
from gpumesh.operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

#: A handler has not run yet (kopf's context unknown): look again after this long.
NOT_STARTED_RETRY_S = 1.0

_lock = threading.Lock()
_liveness = AgentLiveness()


def lease_changed(type: str | None, body: Mapping[str, Any]) -> None:
    """An agent renewed, created or deleted its Lease: look again at its deadline.

    A deleted Lease keeps the deadline it had: an agent that restarts may delete and
    recreate it, and must not make its node Lost for that.
    """
    node = lease_node(body)
    if node is None:
        return
    now = time.time()
    with _lock:
        deadline = (
            _liveness.deadline(node) if type == "DELETED" else _liveness.observe(node, body, now)
        )
    if deadline is not None:
        QUEUE.add(node, after=max(0.0, deadline - now))


def _check(node: str) -> None:
    if RUNTIME.run(_check_in_context, node) is None:
        QUEUE.add(node, after=NOT_STARTED_RETRY_S)


def _check_in_context(node: str) -> bool:
    now = time.time()
    with _lock:
        deadline = _liveness.deadline(node)
    if deadline is None:
        return True
    if deadline > now:
        QUEUE.add(node, after=deadline - now)  # renewed since this look was asked for
        return True
    k = kube.shared()
    lease = k.get_lease(SETTINGS.namespace, lease_name(node))
    found = entries(RUNTIME.index("gpunode_index"), node)
    gpunode: Mapping[str, Any] = found[0] if found else {}
    health = (gpunode.get("status") or {}).get("health") if found else None
    with _lock:
        verdict = _liveness.verdict(node, lease, health, time.time())
        if lease is None and verdict.recheck_at is None:
            _liveness.forget(node)  # gone for good: nothing left to watch
    if verdict.recheck_at is not None:
        QUEUE.add(node, after=max(0.0, verdict.recheck_at - time.time()))
    if verdict.held_back or verdict.patch is not None:
        _note_hold(verdict.held_back, node)  # only verdicts that weighed the silence
    if verdict.patch is None:
        return True
    if not k.patch_cluster_status(GROUP, VERSION, "gpunodes", node, verdict.patch):
        return True
    log.warning("GPUNode %s: its agent stopped renewing its Lease; marked Lost", node)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUNode", "metadata": gpunode["metadata"]}
    kopf.event(
        cast(kopf.Body, body),
        type="Warning",
        reason="AgentLost",
        message=(
            f"the agent's Lease {SETTINGS.namespace}/{lease_name(node)} "
            f"{'is gone' if lease is None else 'was not renewed in time'}: no GPU health is "
            "known, so the node is Lost until the agent reports again"
        ),
    )
    return True


_holding = False


def _note_hold(held_back: bool, node: str) -> None:
    """Say once when marking stops because most agents are silent, and once when it
    resumes (every silent node is looked at again each Lease duration meanwhile)."""
    global _holding
    if held_back and not _holding:
        log.warning(
            "most agents are silent at once (%s among them): marking none Lost while it "
            "lasts; the trouble looks like ours (the API server or this operator's network)",
            node,
        )
    elif not held_back and _holding:
        log.warning("fewer than half of the agents are silent now: marking resumes")
    _holding = held_back


QUEUE: WorkQueue[str] = WorkQueue(_check, workers=1, name="agent-liveness")


@kopf.on.startup()
def start_liveness(**_: Any) -> None:
    QUEUE.start()


@kopf.on.cleanup()
def stop_liveness(**_: Any) -> None:
    QUEUE.stop()
