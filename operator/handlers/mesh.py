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
  its data differs. Bursts of events coalesce into one catalogue write;
- the same thread lists GPUNodes, agent Leases and the ConfigMap again every
  ``FULL_RESYNC_S`` and re-plans from them, so an event the watch missed (a dropped
  stream) is repaired. Events that arrive while it lists are replayed on top of the lists,
  which may be older than they are;
- every ``CATALOGUE_CHECK_S`` it reads the catalogue ConfigMap's resourceVersion (its
  metadata only): one that is not the version it last wrote or read means someone else
  wrote or deleted it (a restore from backup, a hand edit), and a full resync follows at
  once, republishing under a newer generation. Watching ConfigMaps with kopf would need
  read access to every ConfigMap of the cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import kopf
from kubernetes.client.exceptions import ApiException

from gpumesh.api.base import GROUP, VERSION
from gpumesh.api.mesh import GENERATION_ANNOTATION
from gpumesh.api.nodes import lease_name, node_of_lease
from gpumesh.backoff import Backoff
from gpumesh.operator import kube
from gpumesh.operator.mesh import MeshConfig, MeshConfigError
from gpumesh.operator.mesh.state import MeshState, Writes, trim_gpunode
from gpumesh.operator.settings import SETTINGS, OperatorSettings

log = logging.getLogger(__name__)

GPUNODES = "gpunodes"
COALESCE_S = 0.02
"""After a wake-up, wait this long so a burst of events becomes one catalogue write."""
IDLE_S = 5.0
BACKOFF_MAX_S = 30.0
FULL_RESYNC_S = SETTINGS.mesh_full_resync_seconds
"""Period of the full resync (``GPUMESH_MESH_FULL_RESYNC_SECONDS``)."""
CATALOGUE_CHECK_S = 5.0
"""How often the catalogue ConfigMap's resourceVersion is compared with ours."""

Event = Callable[[MeshState], None]

_lock = threading.Lock()
_state: MeshState | None = None
_wake = threading.Event()
_stop = threading.Event()
_replay: list[Event] | None = None
"""Events seen while a full resync lists (None when none is listing)."""
_catalogue_version: str | None = None
"""The catalogue ConfigMap's resourceVersion as this process last wrote or read it."""


class MeshKube(Protocol):
    """The calls a full resync makes (``kube.shared()``; tests pass a fake)."""

    def list_cluster_custom(
        self, group: str, version: str, plural: str
    ) -> list[dict[str, Any]]: ...

    def list_leases(self, namespace: str) -> list[dict[str, Any]]: ...

    def list_nodes(self) -> list[dict[str, Any]]: ...

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def configmap_version(self, namespace: str, name: str) -> str | None: ...


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
    return namespace == SETTINGS.namespace and node_of_lease(name) is not None


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
    gpunodes = _list_gpunodes(k, selector)
    leases = k.list_leases(SETTINGS.namespace)
    state = MeshState(config, SETTINGS.namespace, SETTINGS.mesh_catalogue, published=published)
    state.sync(gpunodes, leases, k.list_nodes(), _now())
    with _lock:
        _state = state
        _note_catalogue_version(kube.resource_version(published))
    _stop.clear()
    threading.Thread(target=_publish_loop, name="mesh-publisher", daemon=True).start()
    log.info(
        "mesh: %d GPUNodes, %d members, catalogue %s/%s",
        len(gpunodes),
        len(state.planner.entries),
        SETTINGS.namespace,
        SETTINGS.mesh_catalogue,
    )


def _list_gpunodes(k: MeshKube, selector: dict[str, str]) -> list[dict[str, Any]]:
    return [
        g
        for g in k.list_cluster_custom(GROUP, VERSION, GPUNODES)
        if selected((g.get("metadata") or {}).get("labels"), selector)
    ]


@kopf.on.cleanup()
def stop_mesh(**_: Any) -> None:
    _stop.set()
    _wake.set()


def feed(event: Event) -> None:
    """Apply one watch event to the state under the lock (kept for replay while a full
    resync lists), then wake the publisher."""
    state = _state
    if state is None:
        return
    with _lock:
        event(state)
        if _replay is not None:
            _replay.append(event)
    _wake.set()


# --- events ------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, GPUNODES)
def mesh_gpunode(
    type: str | None, name: str, body: kopf.Body, labels: kopf.Labels, **_: Any
) -> None:
    """A GPUNode appeared, changed or went (its key, endpoint, relays' observations)."""
    gone = type == "DELETED" or not selected(labels, parse_selector(SETTINGS.mesh_node_selector))
    if gone:
        feed(lambda state: state.gpunode_deleted(name, _now()))
    else:
        trimmed = trim_gpunode(body)  # a copy of what the mesh reads, safe to replay
        feed(lambda state: state.gpunode(trimmed, _now()))


@kopf.on.event("", "v1", "nodes")
def mesh_admission(type: str | None, name: str, labels: kopf.Labels, **_: Any) -> None:
    """A Node appeared, went, or its labels changed: the mesh operator admitted or withdrew
    it (only admitted nodes join the mesh, and only relay-labelled ones relay)."""
    if type == "DELETED":
        feed(lambda state: state.node_deleted(name, _now()))
        return
    trimmed = {"metadata": {"name": name, "labels": dict(labels)}}
    feed(lambda state: state.node(trimmed, _now()))


def lease_changed(type: str | None, body: kopf.Body) -> None:
    """An agent renewed (or dropped) its heartbeat Lease (called by :mod:`.leases`)."""
    copy = dict(body)
    if type == "DELETED":
        feed(lambda state: state.lease_deleted(copy, _now()))
    else:
        feed(lambda state: state.lease(copy, _now()))


# --- the publisher -----------------------------------------------------------------------


def full_resync(state: MeshState, k: MeshKube) -> bool:
    """List everything again and re-plan from it (see :meth:`MeshState.resync`); events
    fed meanwhile are replayed on top. False when the lists could not be read."""
    global _replay
    with _lock:
        _replay = []
    try:
        gpunodes = _list_gpunodes(k, parse_selector(SETTINGS.mesh_node_selector))
        leases = k.list_leases(SETTINGS.namespace)
        kube_nodes = k.list_nodes()
        configmap = k.get_configmap(SETTINGS.namespace, SETTINGS.mesh_catalogue)
    except ApiException as err:
        with _lock:
            _replay = None
        log.warning("mesh: full resync failed (next in %.0f s): %s", FULL_RESYNC_S, err.reason)
        return False
    with _lock:
        replay, _replay = _replay, None
        _note_catalogue_version(kube.resource_version(configmap))
        state.resync(gpunodes, leases, kube_nodes, configmap, _now())
        for event in replay:
            event(state)
    log.info("mesh: full resync of %d GPUNodes, %d replayed events", len(gpunodes), len(replay))
    return True


def written_elsewhere(k: MeshKube) -> bool:
    """Whether the catalogue ConfigMap is no longer the one this process last wrote or read
    (someone else wrote or deleted it). False when its version cannot be read now."""
    try:
        found = k.configmap_version(SETTINGS.namespace, SETTINGS.mesh_catalogue)
    except ApiException as err:
        log.warning("mesh: catalogue version not read: %s", err.reason)
        return False
    with _lock:
        return found != _catalogue_version


def _note_catalogue_version(version: str | None) -> None:
    """The catalogue's version as this process wrote or read it (``_lock`` is held)."""
    global _catalogue_version
    _catalogue_version = version


def _publish_loop() -> None:
    failing = Backoff(0.5, BACKOFF_MAX_S)
    next_resync = time.monotonic() + FULL_RESYNC_S
    next_check = time.monotonic() + CATALOGUE_CHECK_S
    while not _stop.is_set():
        state = _state
        if state is None:
            return
        k = kube.shared()
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + CATALOGUE_CHECK_S
            if time.monotonic() < next_resync and written_elsewhere(k):
                log.warning("mesh: the catalogue ConfigMap was changed by someone else: resync")
                next_resync = time.monotonic()
        if time.monotonic() >= next_resync:
            next_resync = time.monotonic() + FULL_RESYNC_S
            full_resync(state, k)
        with _lock:
            state.expire(_now(), _read_lease)
            writes = state.take_writes()
            errors, state.errors[:] = list(state.errors), []
            upcoming = state.next_expiry()
        for error in errors:
            log.warning("mesh: %s", error)
        ok = _write(state, writes)
        if ok:
            failing.succeeded()
        backoff = 0.0 if ok else failing.failed()
        wait = IDLE_S if upcoming is None else upcoming - time.time() + 0.01
        wait = max(backoff, min(max(wait, 0.0), IDLE_S))
        if _wake.wait(wait) and not _stop.is_set():
            _stop.wait(COALESCE_S)
        _wake.clear()


def _read_lease(node: str) -> dict[str, Any] | None:
    """The agent's Lease as the API has it now (the watch may lag behind)."""
    return kube.shared().get_lease(SETTINGS.namespace, lease_name(node))


def _write(state: MeshState, writes: Writes) -> bool:
    """Send ``writes``; give back to ``state`` whatever failed. True if all landed."""
    if not writes:
        return True
    k = kube.shared()
    failed: list[str] = []
    configmap_failed = False
    if writes.configmap is not None:
        try:
            version = k.apply_configmap(writes.configmap)
            with _lock:
                _note_catalogue_version(version)
            log.info(
                "mesh: published catalogue generation %s (%d members)",
                writes.configmap["metadata"]["annotations"][GENERATION_ANNOTATION],
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
