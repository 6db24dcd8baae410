"""kopf glue for GPUCluster: every trigger puts the cluster's key on one work queue.

Workers take keys off the queue and run the one idempotent reconcile; a burst of events
for a cluster (its status written, KubeRay moving pods) becomes one reconcile. The same
queue carries admission passes (key ``None``), coalesced: a thousand creations in a
second cost a handful of passes. Handlers only record and enqueue, so they run on kopf's
event loop (``async``, no thread hop per event) and never wait for an API round trip.

The GPUCluster is watched with a plain event handler rather than create/update handlers:
the reconcile compares the world with the spec each time, so kopf need not remember the
last handled spec in an annotation (one write and one event fewer per change).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException

from gpumesh.api.base import GROUP, VERSION
from gpumesh.operator import kube
from gpumesh.operator.handlers.indexes import INVENTORY_VERSION
from gpumesh.operator.handlers.runtime import RUNTIME, entries, frozen
from gpumesh.operator.placement import InventoryIndex, OfferCache
from gpumesh.operator.progress import ProgressLine
from gpumesh.operator.reconcile_gpucluster import (
    Reconciler,
)
from gpumesh.operator.render import labels as names
from gpumesh.operator.settings import SETTINGS
from gpumesh.operator.workqueue import WorkQueue
from gpumesh.operator.world import (
    ClusterKey,
    committed_gpus,
    pod_selector,
    trim_pod,
    trim_raycluster,
    workload_key,
)

log = logging.getLogger(__name__)

#: Lets a burst of triggers share one admission pass.
PASS_DELAY = 0.05

Obj = Mapping[str, Any]


def _post_event(obj: Obj, type_: str, reason: str, message: str) -> None:
    # kopf reads only apiVersion, kind and metadata of the object; a plain mapping serves.
    body = {
        "apiVersion": obj.get("apiVersion") or f"{GROUP}/{VERSION}",
        "kind": obj.get("kind") or "GPUCluster",
        "metadata": obj["metadata"],
    }
    kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message[:1024])


class IndexWorld:
    """The reconciler's view of the cluster: kopf's live indexes, read from any thread."""

    def gpucluster(self, key: ClusterKey) -> Obj | None:
        found = entries(RUNTIME.index("gpucluster_index"), key)
        return found[0] if found else None

    def gpuclusters(self) -> Sequence[Obj]:
        return [s[0] for s in frozen(RUNTIME.index("gpucluster_index")).values() if s]

    def raycluster(self, key: ClusterKey) -> Obj | None:
        found = entries(RUNTIME.index("raycluster_index"), key)
        return found[0] if found else None

    def foreign_raycluster(self, key: ClusterKey) -> bool:
        return bool(entries(RUNTIME.index("foreign_raycluster_index"), (key.namespace, key.name)))

    def pods(self, key: ClusterKey) -> Sequence[Obj]:
        """The workload's pods, listed when a reconcile needs them (rarely: see
        :func:`~gpumesh.operator.handlers.lifecycle.configure`, pods are not watched)."""
        pods = kube.shared().list_pods(key.namespace, pod_selector(key))
        return [trim_pod(p) for p in pods]

    def offers(self) -> InventoryIndex:
        return inventory(RUNTIME.indexes or {})

    def gpuquotas(self) -> Sequence[Obj]:
        return [q for s in frozen(RUNTIME.index("gpuquota_index")).values() for q in s]


_inventory_lock = threading.Lock()
_inventory: tuple[tuple[int, ...], InventoryIndex] | None = None
_offers = OfferCache()


def inventory(indexes: Mapping[str, Any]) -> InventoryIndex:
    """The placement inventory, rebuilt only when an input really changed.

    Building it reads every node, so sharing one build between reconciles is what keeps
    a reconcile cheap when a thousand GPUClusters share a thousand nodes.
    """
    global _inventory
    pods = indexes["foreign_gpu_pod_index"]
    key = (
        INVENTORY_VERSION.value,
        len(indexes["node_index"]),
        len(indexes["gpunode_index"]),
        sum(len(store) for store in frozen(pods).values()),
    )
    with _inventory_lock:
        if _inventory is None or _inventory[0] != key:
            offers = _offers.build(
                _values(indexes["gpunode_index"]), _values(indexes["node_index"]), _values(pods)
            )
            _inventory = (key, InventoryIndex(offers))
        return _inventory[1]


def _values(index: kopf.Index[Any, Any]) -> list[Any]:
    return [value for store in frozen(index).values() for value in store]


# --- the work queue and the reconciler -------------------------------------------------------


def _process(key: ClusterKey | None) -> None:
    RUNTIME.run(_process_in_context, key)


def _process_in_context(key: ClusterKey | None) -> None:
    if key is None:
        reconciler().admission_pass()
        return
    try:
        if reconciler().reconcile(key):
            # Resync: look again after a while even if no event comes (repairs drift).
            # Events in between do not postpone it; the earliest time asked for wins.
            QUEUE.add(key, after=SETTINGS.resync_seconds)
    except ApiException as err:
        if err.status == 403 and "being terminated" in str(err.body or ""):
            return  # the namespace goes, and the cluster with it
        raise


QUEUE: WorkQueue[ClusterKey | None] = WorkQueue(
    _process, workers=SETTINGS.max_workers, name="gpucluster"
)
PROGRESS: ProgressLine[ClusterKey] = ProgressLine(
    SETTINGS.status_progress_per_second, SETTINGS.status_progress_burst
)


def _request_pass(after: float = PASS_DELAY) -> None:
    QUEUE.add(None, after=max(after, PASS_DELAY))


_reconciler: Reconciler | None = None
_reconciler_lock = threading.Lock()


def reconciler() -> Reconciler:
    """The process's reconciler, created on first use so importing needs no cluster."""
    global _reconciler
    with _reconciler_lock:
        if _reconciler is None:
            _reconciler = Reconciler(
                kube.shared(),
                _post_event,
                IndexWorld(),
                wake=QUEUE.add,
                request_pass=_request_pass,
                retry_after=SETTINGS.resync_seconds,
                status_interval=SETTINGS.status_interval_seconds,
                progress=PROGRESS,
            )
        return _reconciler


# --- handlers ----------------------------------------------------------------------------


@kopf.on.startup()
def start_gpuclusters(**_: Any) -> None:
    QUEUE.start()
    PROGRESS.start(QUEUE.add)


@kopf.on.cleanup()
def stop_gpuclusters(**_: Any) -> None:
    PROGRESS.stop()
    QUEUE.stop()


def gpucluster_event(namespace: str | None, name: str, meta: kopf.Meta) -> None:
    """Listed at start, created, edited, status written or deleted: reconcile it.

    Called by the one GPUCluster event handler (:mod:`.clusters`). A deleted cluster's
    reconcile finds it gone and releases what it held. No kopf timer either (a timer
    makes kopf put a finalizer on every cluster, so none could be deleted while the
    operator is down): each reconcile asks for the next resync itself.
    """
    key = ClusterKey(namespace or "", name)
    if not reconciler().is_own_write(key, meta.get("resourceVersion"), raycluster=False):
        QUEUE.add(key)


@kopf.on.event("ray.io", "v1", "rayclusters", labels={names.MANAGED_BY: names.MANAGER})
async def raycluster_changed(
    type: str | None,
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    body: kopf.Body,
    **indexes: Any,
) -> None:
    """KubeRay moved (pods ready, head up): book what it holds, refresh the owner."""
    RUNTIME.remember(indexes)
    key = workload_key(namespace or "", name, labels)
    clusters = reconciler()
    if type == "DELETED":
        freed = clusters.holdings.observe(key, None)
        if key.kind == "GPUCluster":
            clusters.raycluster_gone(key)
        own_echo = False
    else:
        freed = clusters.holdings.observe(key, committed_gpus(trim_raycluster(body)))
        own_echo = clusters.is_own_write(key, body.metadata.get("resourceVersion"), raycluster=True)
    if freed:
        clusters.gpus_given_back()
    if key.kind == "GPUCluster" and not own_echo:  # an echo of our apply: nothing new
        QUEUE.add(key)


def supply_moved(node: str) -> None:
    """Supply changed on ``node``: waiting clusters get a pass; clusters on it a look."""
    _request_pass()
    for cluster in reconciler().clusters_on(node):
        QUEUE.add(cluster)
