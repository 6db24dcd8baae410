"""kopf glue for GPUCluster: every trigger ends in the same idempotent reconcile."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, cast

import kopf

from gpumesh.operator import kube
from gpumesh.operator.handlers.indexes import INVENTORY_VERSION, frozen
from gpumesh.operator.placement import InventoryIndex, build_inventory
from gpumesh.operator.reconcile_gpucluster import (
    GROUP,
    PLURAL,
    VERSION,
    ForeignRayClusterError,
    Reconciler,
    Snapshot,
)
from gpumesh.operator.render import labels as names
from gpumesh.operator.settings import SETTINGS
from gpumesh.operator.world import ClusterKey, trim_node

log = logging.getLogger(__name__)


def _post_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    # kopf reads only apiVersion, kind and metadata of the object; a plain mapping serves.
    kopf.event(cast(kopf.Body, obj), type=type_, reason=reason, message=message[:1024])


_reconciler: Reconciler | None = None


def reconciler() -> Reconciler:
    """The process's reconciler, created on first use so importing needs no cluster."""
    global _reconciler
    if _reconciler is None:
        _reconciler = Reconciler(kube.shared(), _post_event)
    return _reconciler


def _values(index: kopf.Index[Any, Any]) -> list[Any]:
    return [value for store in frozen(index).values() for value in store]


_inventory_lock = threading.Lock()
_inventory: tuple[tuple[int, ...], InventoryIndex] | None = None


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
            offers = build_inventory(
                _values(indexes["gpunode_index"]), _values(indexes["node_index"]), _values(pods)
            )
            _inventory = (key, InventoryIndex(offers))
        return _inventory[1]


def snapshot(indexes: Mapping[str, Any]) -> Snapshot:
    """Freeze the kopf indexes handed to a handler into reconcile input."""
    cluster_pods = indexes["cluster_pod_index"]
    return Snapshot(
        offers=inventory(indexes),
        rayclusters={
            key: store[0] for key, store in frozen(indexes["raycluster_index"]).items() if store
        },
        cluster_pods=frozen(cluster_pods),
    )


def _reconcile(body: Mapping[str, Any], indexes: Mapping[str, Any]) -> None:
    try:
        reconciler().reconcile(body, snapshot(indexes))
    except ForeignRayClusterError as err:
        raise kopf.PermanentError(str(err)) from err


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile_gpucluster(body: kopf.Body, **indexes: Any) -> None:
    """Create, spec change, operator restart."""
    _reconcile(body, indexes)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds, idle=SETTINGS.resync_seconds)
def resync_gpucluster(body: kopf.Body, **indexes: Any) -> None:
    """Periodic resync: retries unplaceable requests and repairs drift."""
    _reconcile(body, indexes)


@kopf.on.event("ray.io", "v1", "rayclusters", labels={names.MANAGED_BY: names.MANAGER})
def raycluster_changed(namespace: str | None, labels: kopf.Labels, **indexes: Any) -> None:
    """KubeRay moved (pods ready, head up): refresh the owner's status at once."""
    owner = labels.get(names.CLUSTER)
    body = _gpucluster_body(indexes, ClusterKey(namespace or "", owner)) if owner else None
    if body is not None:
        _reconcile(body, indexes)


_inventory_fingerprints: dict[str, str] = {}


@kopf.on.event("gpumesh.io", "v1alpha1", "gpunodes")
@kopf.on.event("", "v1", "nodes")
def inventory_changed(name: str, body: kopf.Body, resource: kopf.Resource, **indexes: Any) -> None:
    """Supply changed: give waiting GPUClusters another try now rather than at resync."""
    relevant = (
        repr(trim_node(body))
        if resource.plural == "nodes"
        else repr((dict(body.spec), body.status.get("health"), body.status.get("gpuCount")))
    )
    key = f"{resource.plural}/{name}"
    if _inventory_fingerprints.get(key) == relevant:
        return
    _inventory_fingerprints[key] = relevant
    for store in frozen(indexes["gpucluster_index"]).values():
        for cluster in store:
            if (cluster.get("status") or {}).get("phase", "Pending") == "Pending":
                _reconcile(cluster, indexes)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def gpucluster_deleted(namespace: str | None, name: str, **_: Any) -> None:
    """Release the ledger's GPUs; the garbage collector removes the RayCluster."""
    reconciler().forget(ClusterKey(namespace or "", name))


def _gpucluster_body(indexes: Mapping[str, Any], key: ClusterKey) -> Mapping[str, Any] | None:
    for _ in range(1000):
        try:
            store = indexes["gpucluster_index"].get(key)
            return next(iter(store), None) if store else None
        except RuntimeError:  # the store changed under us on kopf's loop; read again
            continue
    return None
