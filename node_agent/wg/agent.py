"""The mesh loop on a node: publish our key, watch the catalogue, keep the device in line.

- Publishes ``status.mesh.publicKey`` and ``status.mesh.endpoints`` of its own GPUNode
  (merge patch of the status subresource; the operator's fields there are left alone),
  and re-checks them every ``status_check_s`` (someone may have edited them).
- Watches the catalogue ConfigMap (a field-selected watch on one object: each event
  carries the whole catalogue; a reconnect replays the current one).
- Syncs on every new catalogue and every ``resync_s`` (drift repair); reads the device
  every ``observe_s`` for metrics.
- Optionally renews its own heartbeat Lease (``lease_duration_s``): off by default,
  because the node agent's reporter owns that Lease on real nodes.

Kubernetes calls go through the agent's one client (:mod:`gpumesh.node_agent.kube`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from gpumesh.api.base import GROUP, VERSION
from gpumesh.node_agent.desired import lease_body, lease_name
from gpumesh.node_agent.kube import JSON, MERGE_PATCH, KubeError
from gpumesh.node_agent.wg.device import DeviceError
from gpumesh.node_agent.wg.metrics import MeshCollector
from gpumesh.node_agent.wg.sync import MeshSyncer, SyncResult
from gpumesh.operator.mesh.model import Catalogue, CatalogueError
from gpumesh.operator.mesh.publish import CATALOGUE_NAME, catalogue_from_configmap

log = logging.getLogger(__name__)

GPUNODES: Final = f"/apis/{GROUP}/{VERSION}/gpunodes"
MAX_ENDPOINTS: Final = 16


class MeshApi(Protocol):
    """The calls the mesh loop makes (``RestKubeApi`` has them; tests pass a fake)."""

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = JSON
    ) -> dict[str, Any]: ...

    def get(self, path: str) -> dict[str, Any] | None: ...

    def watch(
        self, path: str, *, field_selector: str, timeout_s: int = 300
    ) -> Iterator[dict[str, Any]]: ...


@dataclass(frozen=True)
class MeshAgentConfig:
    """The mesh loop's settings (device settings live on :class:`MeshSyncer`)."""

    node: str
    namespace: str = "gpumesh-system"
    catalogue: str = CATALOGUE_NAME
    endpoints: tuple[str, ...] = ()
    """Endpoint candidates to publish, best first (the configured public one first)."""
    resync_s: float = 30.0
    observe_s: float = 10.0
    status_check_s: float = 60.0
    lease_duration_s: int | None = None
    lease_renew_s: float = 10.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    watch_timeout_s: int = 300


def mesh_status_patch(public_key: str, endpoints: tuple[str, ...]) -> dict[str, Any]:
    """Merge patch of the agent-owned ``status.mesh`` fields."""
    return {"status": {"mesh": {"publicKey": public_key, "endpoints": list(endpoints)}}}


def published_mesh(gpunode: Mapping[str, Any] | None) -> tuple[str | None, tuple[str, ...]]:
    mesh = ((gpunode or {}).get("status") or {}).get("mesh") or {}
    key = mesh.get("publicKey")
    endpoints = mesh.get("endpoints") or []
    return (key if isinstance(key, str) else None), tuple(str(e) for e in endpoints)


class MeshAgent:
    """Runs the loop; :meth:`step` is one pass (tests drive it directly)."""

    def __init__(
        self,
        config: MeshAgentConfig,
        api: MeshApi,
        syncer: MeshSyncer,
        collector: MeshCollector | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.api = api
        self.syncer = syncer
        self.collector = collector
        self.clock = clock
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._pending: Catalogue | None = None
        self._current: Catalogue | None = None
        self._applied_generation: int | None = None
        self._published: tuple[str | None, tuple[str, ...]] | None = None
        self._lease: dict[str, Any] | None = None
        self._due: dict[str, float] = {}
        self._rotate = False
        self._resync_now = False
        self._said: set[str] = set()

    # --- requests from other threads (watch, signals) ----------------------------------

    def offer(self, configmap: Mapping[str, Any]) -> None:
        """A catalogue ConfigMap arrived (from the watch)."""
        try:
            catalogue = catalogue_from_configmap(configmap)
        except CatalogueError as err:
            log.error("ignoring malformed mesh catalogue: %s", err)
            return
        if catalogue is None:
            return
        with self._lock:
            self._pending = catalogue
        self.wake.set()

    def request_rotation(self) -> None:
        self._rotate = True
        self.wake.set()

    def request_resync(self) -> None:
        self._resync_now = True
        self.wake.set()

    # --- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self.syncer.start()
        log.info(
            "mesh agent for %s on %s (%s), public key %s",
            self.config.node,
            self.syncer.backend.interface,
            self.syncer.backend.kind,
            self.syncer.public_key,
        )
        watcher = threading.Thread(
            target=self.watch_catalogue, args=(stop,), name="catalogue-watch", daemon=True
        )
        watcher.start()
        while not stop.is_set():
            delay = self.step()
            self.wake.wait(timeout=delay)
            self.wake.clear()

    def watch_catalogue(self, stop: threading.Event) -> None:
        cfg = self.config
        path = f"/api/v1/namespaces/{cfg.namespace}/configmaps"
        backoff = cfg.backoff_min_s
        while not stop.is_set():
            try:
                for event in self.api.watch(
                    path,
                    field_selector=f"metadata.name={cfg.catalogue}",
                    timeout_s=cfg.watch_timeout_s,
                ):
                    backoff = cfg.backoff_min_s
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self.offer(event.get("object") or {})
                    if stop.is_set():
                        return
            except KubeError as err:
                self._once("watch", "catalogue watch failed (retrying): %s", err)
                stop.wait(backoff)
                backoff = min(backoff * 2, cfg.backoff_max_s)

    def step(self) -> float:
        """One pass; returns the seconds until something is due."""
        now = self.clock()
        cfg = self.config
        if cfg.lease_duration_s and now >= self._due.get("lease", 0.0):
            self._guard("lease", self._renew_lease, now, cfg.lease_renew_s)
        if self._rotate:
            self._rotate = False
            try:
                key = self.syncer.rotate_key()
                log.info("rotated key; new public key %s", key)
                self._due["status"] = 0.0
            except DeviceError as err:
                log.error("key rotation failed: %s", err)
        if now >= self._due.get("status", 0.0):
            self._guard("status", self._publish, now, cfg.status_check_s)
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._current = pending
        if self._current is not None and (
            pending is not None or self._resync_now or now >= self._due.get("sync", 0.0)
        ):
            self._resync_now = False
            self._sync(self._current, now)
        elif now >= self._due.get("observe", 0.0):
            self._due["observe"] = now + cfg.observe_s
            try:
                observed = self.syncer.observe()
                if self.collector is not None:
                    self.collector.record_observed(observed)
            except DeviceError as err:
                self._once("observe", "cannot read the device: %s", err)
        upcoming = [t for t in self._due.values() if t > now]
        return max(0.05, min(upcoming, default=now + 1.0) - now)

    # --- parts ---------------------------------------------------------------------------

    def _guard(self, what: str, part: Callable[[float], None], now: float, period: float) -> None:
        """Run one API part; on failure retry it with backoff, never stop the loop."""
        try:
            part(now)
        except KubeError as err:
            failures = self._due.get(f"{what}-failures", 0.0) + 1
            self._due[f"{what}-failures"] = failures
            backoff = min(self.config.backoff_min_s * 2**failures, self.config.backoff_max_s)
            self._due[what] = now + backoff
            self._once(f"{what}:{err.status}", "%s failed (retrying): %s", what, err)
            return
        self._due.pop(f"{what}-failures", None)
        self._due[what] = now + period

    def _sync(self, catalogue: Catalogue, now: float) -> None:
        self._due["sync"] = now + self.config.resync_s
        self._due["observe"] = now + self.config.observe_s
        try:
            result = self.syncer.sync(catalogue)
        except (DeviceError, OSError, RuntimeError) as err:
            if self.collector is not None:
                self.collector.record_failure()
            log.error("mesh sync failed (retrying): %s", err)
            self._due["sync"] = now + self.config.backoff_min_s
            return
        if self.collector is not None:
            self.collector.record_sync(result)
        self._log_result(result)
        self._applied_generation = result.generation

    def _log_result(self, result: SyncResult) -> None:
        new = result.generation != self._applied_generation
        if result.desired is None:
            if new:
                log.info(
                    "generation %d: %s is not in the catalogue yet",
                    result.generation,
                    self.config.node,
                )
            return
        if new or result.changed:
            log.info("applied %s in %.1f ms", result.summary(), result.seconds * 1e3)
        if result.desired.unreachable and new:
            log.warning("no path to %s", ", ".join(result.desired.unreachable))

    def _publish(self, now: float) -> None:
        cfg = self.config
        path = f"{GPUNODES}/{cfg.node}"
        wanted = (self.syncer.public_key, cfg.endpoints[:MAX_ENDPOINTS])
        obj = self.api.get(path)
        if obj is None:
            self._once("no-gpunode", "GPUNode %s does not exist yet: waiting", cfg.node)
            raise KubeError("GET", path, 404, "GPUNode not found")
        if published_mesh(obj) == wanted:
            self._published = wanted
            return
        self.api.request(
            "PATCH", f"{path}/status", mesh_status_patch(*wanted), content_type=MERGE_PATCH
        )
        self._published = wanted
        log.info("published public key %s for %s", wanted[0], cfg.node)

    def _renew_lease(self, now: float) -> None:
        cfg = self.config
        assert cfg.lease_duration_s
        base = f"/apis/coordination.k8s.io/v1/namespaces/{cfg.namespace}/leases"
        name = lease_name(cfg.node)
        if self._lease is None:
            self._lease = self.api.get(f"{base}/{name}")
        body = lease_body(
            cfg.node,
            cfg.namespace,
            holder=cfg.node,
            duration_s=cfg.lease_duration_s,
            now=datetime.now(UTC),
            current=self._lease,
        )
        try:
            if self._lease is None:
                self._lease = self.api.request("POST", base, body)
            else:
                self._lease = self.api.request("PUT", f"{base}/{name}", body)
        except KubeError:
            self._lease = None  # re-read next time (a 409 means someone else wrote it)
            raise

    def _once(self, key: str, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)
