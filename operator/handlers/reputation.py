"""kopf glue for reputation: every GPUNode's record brought up to date, and written.

GPUNode events (its agent reports every heartbeat; the operator marks it Lost) enqueue the
node; a worker thread accounts the time since its record and writes reputation and record
when :func:`~gpumesh.operator.reputation.step` says so. Each node is looked at again after
``GPUMESH_REPUTATION_REWRITE_SECONDS`` even without events, so a silent node's downtime
is counted too. The formula is in :mod:`gpumesh.operator.reputation`.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any, Final

import kopf
from pydantic import ValidationError

from gpumesh.api.base import GROUP, VERSION
from gpumesh.api.gpunode import GPUNodeStatus
from gpumesh.operator import kube
from gpumesh.operator.reputation import ReputationSettings, step
from gpumesh.operator.settings import SETTINGS
from gpumesh.operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

REPUTATION = ReputationSettings.of(SETTINGS)

_lock = threading.Lock()
_latest: dict[str, dict[str, Any]] = {}
"""Of each GPUNode's status as last delivered, what reputation reads (a cache: the API
holds the record)."""
_READ: Final = ("health", "reputation", "track", "verification")


@kopf.on.event(GROUP, VERSION, "gpunodes")
def reputation_gpunode(type: str | None, name: str, status: kopf.Status, **_: Any) -> None:
    with _lock:
        if type == "DELETED":
            _latest.pop(name, None)
            return
        _latest[name] = {k: status[k] for k in _READ if k in status}
    QUEUE.add(name)


def _update(node: str) -> None:
    with _lock:
        raw = _latest.get(node)
    if raw is None:
        return  # deleted meanwhile
    try:
        status = GPUNodeStatus.model_validate(raw)
    except ValidationError as err:
        log.warning("GPUNode %s: status unreadable, reputation not updated: %s", node, err)
        return
    patch = step(status, datetime.now(UTC), REPUTATION, node)
    if patch is not None:
        kube.shared().patch_cluster_status(GROUP, VERSION, "gpunodes", node, patch)
    QUEUE.add(node, after=REPUTATION.rewrite_after_for(node).total_seconds())


QUEUE: WorkQueue[str] = WorkQueue(_update, workers=1, name="reputation")


@kopf.on.startup()
def start_reputation(**_: Any) -> None:
    QUEUE.start()


@kopf.on.cleanup()
def stop_reputation(**_: Any) -> None:
    QUEUE.stop()
