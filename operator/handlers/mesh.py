"""kopf glue for the WireGuard mesh: GPUNodes and agent Leases in, status and catalogue out.

All mesh logic lives in :class:`gpumesh.operator.mesh.state.MeshState` (pure). Here:

- at start-up, read the catalogue ConfigMap (its ledger keeps every node's addresses
  across restarts), list GPUNodes and the agents' Leases, and plan them in one go, so a
  restarting operator never publishes a half-built catalogue (which would make agents
  drop peers);
- on each GPUNode or agent Lease event, feed the planner under one lock (cheap: O(log N)
  per event, no API call in the handler);
- one ``mesh-publisher`` thread lapses expired Leases (they produce no event), then writes
  what changed: each GPUNode's ``status.mesh`` where it differs, the ConfigMap only when
  its data differs. Bursts of events coalesce into one catalogue write.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from gpumesh.api.base import GROUP, VERSION
from gpumesh.operator import kube
from gpumesh.operator.mesh import MeshConfig, MeshConfigError
from gpumesh.operator.mesh.publish import LEASE_PREFIX
from gpumesh.operator.mesh.state import MeshState, Writes
from gpumesh.operator.settings import SETTINGS, OperatorSettings

log = logging.getLogger(__name__)

GPUNODES = "gpunodes"
COALESCE_S = 0.02
"""After a wake-up, wait this long so a burst of events becomes one catalogue write."""
IDLE_S = 5.0
BACKOFF_MAX_S = 30.0

_lock = threading.Lock()
_state: MeshState | None = None
_wake = threading.Event()
_stop = threading.Event()


def mesh_config(settings: OperatorSettings) -> MeshConfig:
    return MeshConfig(
        overlay_cidr=settings.mesh_overlay_cidr,
        pod_cidr=settings.mesh_pod_cidr,
        pod_prefix=settings.mesh_pod_prefix,
        cooldown_s=settings.mesh_cooldown_seconds,
    )


def parse_selector(text: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> labels a GPUNode must carry to join the mesh (equality only)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"mesh node selector: {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def selected(labels: Any, selector: dict[str, str]) -> bool:
    return all((labels or {}).get(k) == v for k, v in selector.items())


def is_agent_lease(name: str | None, namespace: str | None, **_: Any) -> bool:
    return (
        namespace == SETTINGS.namespace and isinstance(name, str) and name.startswith(LEASE_PREFIX)
    )


def _now() -> datetime:
    return datetime.now(UTC)


# --- start and stop ----------------------------------------------------------------------


@kopf.on.startup()
def start_mesh(**_: Any) -> None:
    """Plan the whole mesh once, then start the publisher."""
    global _state
    if not SETTINGS.mesh:
        log.info("mesh planning is off (GPUMESH_MESH)")
        return
    try:
        config = mesh_config(SETTINGS)
        selector = parse_selector(SETTINGS.mesh_node_selector)
    except (MeshConfigError, ValueError) as err:
        raise kopf.PermanentError(f"mesh settings: {err}") from err
    k = kube.shared()
    published = k.get_configmap(SETTINGS.namespace, SETTINGS.mesh_catalogue)
    gpunodes = [
        g
        for g in k.list_cluster_custom(GROUP, VERSION, GPUNODES)
        if selected((g.get("metadata") or {}).get("labels"), selector)
    ]
    leases = k.list_leases(SETTINGS.namespace)
    state = MeshState(config, SETTINGS.namespace, SETTINGS.mesh_catalogue, published=published)
    state.sync(gpunodes, leases, _now())
    with _lock:
        _state = state
    _stop.clear()
    threading.Thread(target=_publish_loop, name="mesh-publisher", daemon=True).start()
    log.info(
        "mesh: %d GPUNodes, %d members, catalogue %s/%s",
        len(gpunodes),
        len(state.planner.entries),
        SETTINGS.namespace,
        SETTINGS.mesh_catalogue,
    )


@kopf.on.cleanup()
def stop_mesh(**_: Any) -> None:
    _stop.set()
    _wake.set()


# --- events ------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, GPUNODES)
def mesh_gpunode(
    type: str | None, name: str, body: kopf.Body, labels: kopf.Labels, **_: Any
) -> None:
    """A GPUNode appeared, changed or went (its key, endpoint, relays' observations)."""
    state = _state
    if state is None:
        return
    gone = type == "DELETED" or not selected(labels, parse_selector(SETTINGS.mesh_node_selector))
    with _lock:
        if gone:
            state.gpunode_deleted(name, _now())
        else:
            state.gpunode(body, _now())
    _wake.set()


@kopf.on.event("coordination.k8s.io", "v1", "leases", when=is_agent_lease)
def mesh_lease(type: str | None, body: kopf.Body, **_: Any) -> None:
    """An agent renewed (or dropped) its heartbeat Lease."""
    state = _state
    if state is None:
        return
    with _lock:
        if type == "DELETED":
            state.lease_deleted(body, _now())
        else:
            state.lease(body, _now())
    _wake.set()


# --- the publisher -----------------------------------------------------------------------


def _publish_loop() -> None:
    backoff = 0.0
    while not _stop.is_set():
        state = _state
        if state is None:
            return
        with _lock:
            state.expire(_now(), _read_lease)
            writes = state.take_writes()
            errors, state.errors[:] = list(state.errors), []
            upcoming = state.next_expiry()
        for error in errors:
            log.warning("mesh: %s", error)
        ok = _write(state, writes)
        backoff = 0.0 if ok else min(max(backoff * 2, 0.5), BACKOFF_MAX_S)
        wait = IDLE_S if upcoming is None else upcoming - time.time() + 0.01
        wait = max(backoff, min(max(wait, 0.0), IDLE_S))
        if _wake.wait(wait) and not _stop.is_set():
            _stop.wait(COALESCE_S)
        _wake.clear()


def _read_lease(node: str) -> dict[str, Any] | None:
    """The agent's Lease as the API has it now (the watch may lag behind)."""
    return kube.shared().get_lease(SETTINGS.namespace, f"{LEASE_PREFIX}{node}")


def _write(state: MeshState, writes: Writes) -> bool:
    """Send ``writes``; give back to ``state`` whatever failed. True if all landed."""
    if not writes:
        return True
    k = kube.shared()
    failed: list[str] = []
    configmap_failed = False
    if writes.configmap is not None:
        try:
            k.apply_configmap(writes.configmap)
            log.info(
                "mesh: published catalogue generation %s (%d members)",
                writes.configmap["metadata"]["annotations"]["gpumesh.io/mesh-generation"],
                len(state.planner.entries),
            )
        except ApiException as err:
            configmap_failed = True
            log.warning("mesh: catalogue not published (retrying): %s %s", err.status, err.reason)
    for name, patch in writes.statuses:
        try:
            k.patch_cluster_status(GROUP, VERSION, GPUNODES, name, patch)
        except ApiException as err:
            failed.append(name)
            log.warning("mesh: status of %s not written (retrying): %s", name, err.reason)
    if failed or configmap_failed:
        with _lock:
            state.failed(nodes=failed, configmap=configmap_failed)
        return False
    return True
