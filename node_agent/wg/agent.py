"""The mesh loop on a node: publish our key, watch the catalogue, keep the device in line.

- Publishes its GPUNode's agent-owned ``status.mesh`` fields (:mod:`.report`: public key,
  endpoint candidates, the NAT mappings it sees as a relay, RTTs to the nearest members)
  as a merge patch of the status subresource that leaves the operator's fields alone:
  at once when the key or an endpoint changes, RTTs only when they moved meaningfully and
  at most every ``rtt_publish_min_s``; and it re-checks them every ``status_check_s``
  (someone may have edited them).
- Measures RTTs with :class:`~gpumesh.node_agent.wg.echo.MeshEcho` (its own thread) to the
  members the last sync gave it a path to.
- Watches the catalogue ConfigMap (a field-selected watch on one object: each event
  carries the whole catalogue; a reconnect replays the current one).
- Syncs on every new catalogue and every ``resync_s`` (drift repair); reads the device
  every ``observe_s`` for metrics.
- Re-creates a peer it just created whose first handshake went unanswered, once a second
  for its first seconds (:mod:`.handshake`): WireGuard itself waits 5 s.
- Optionally renews its own heartbeat Lease (``lease_duration_s``): off by default,
  because the node agent's reporter owns that Lease on real nodes.

Kubernetes calls go through the agent's one client (:mod:`gpumesh.node_agent.kube`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from gpumesh.api.base import GROUP, VERSION
from gpumesh.api.mesh import CATALOGUE_NAME, Catalogue, CatalogueError, catalogue_from_configmap
from gpumesh.api.nodes import lease_name
from gpumesh.backoff import Backoff, backoff_delay
from gpumesh.node_agent.desired import agent_lease_body
from gpumesh.node_agent.kube import JSON, MERGE_PATCH, KubeError
from gpumesh.node_agent.wg.device import DeviceError
from gpumesh.node_agent.wg.diff import ObservedDevice, PeerChanges, apply_changes
from gpumesh.node_agent.wg.handshake import FirstHandshakes
from gpumesh.node_agent.wg.metrics import MeshCollector
from gpumesh.node_agent.wg.peers import DesiredMesh
from gpumesh.node_agent.wg.report import (
    MeshReport,
    endpoint_candidates,
    handshake_endpoints,
    read_report,
    report_patch,
)
from gpumesh.node_agent.wg.rtt import RttPolicy, probe_targets
from gpumesh.node_agent.wg.sync import MeshSyncer, SyncResult

log = logging.getLogger(__name__)

GPUNODES: Final = f"/apis/{GROUP}/{VERSION}/gpunodes"


class MeshApi(Protocol):
    """The calls the mesh loop makes (``RestKubeApi`` has them; tests pass a fake)."""

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = JSON
    ) -> dict[str, Any]: ...

    def get(self, path: str) -> dict[str, Any] | None: ...

    def watch(
        self, path: str, *, field_selector: str, timeout_s: int = 300
    ) -> Iterator[dict[str, Any]]: ...


class RttSource(Protocol):
    """Where RTTs come from (:class:`~gpumesh.node_agent.wg.echo.MeshEcho`; tests fake it)."""

    rounds: int

    def set_targets(self, address: str | None, targets: Mapping[str, str]) -> None: ...

    def current(self) -> dict[str, float]: ...

    def run(self, stop: threading.Event) -> None: ...


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
    rtt_publish_min_s: float = 60.0
    """Least time between two writes for RTTs alone (each write reaches every watcher)."""
    rtt_policy: RttPolicy = field(default_factory=RttPolicy)
    lease_duration_s: int | None = None
    lease_renew_s: float = 10.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    watch_timeout_s: int = 300


class MeshAgent:
    """Runs the loop; :meth:`step` is one pass (tests drive it directly)."""

    def __init__(
        self,
        config: MeshAgentConfig,
        api: MeshApi,
        syncer: MeshSyncer,
        collector: MeshCollector | None = None,
        *,
        rtt: RttSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.api = api
        self.syncer = syncer
        self.collector = collector
        self.rtt = rtt
        self.clock = clock
        self.wall = wall
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._pending: Catalogue | None = None
        self._current: Catalogue | None = None
        self._applied_generation: int | None = None
        self._published: MeshReport | None = None
        """What the API holds of our fields, as of our last read or write."""
        self._observed_endpoint: str | None = None
        self._rtt_written = -float("inf")
        self._rtt_rounds = -1
        self._desired: DesiredMesh | None = None
        self._observed = ObservedDevice()
        self._lease: dict[str, Any] | None = None
        self._due: dict[str, float] = {}
        self._rotate = False
        self._resync_now = False
        self._said: set[str] = set()
        self._first_handshakes = FirstHandshakes()

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
        if self.rtt is not None:
            threading.Thread(
                target=self.rtt.run, args=(stop,), name="mesh-echo", daemon=True
            ).start()
        while not stop.is_set():
            delay = self.step()
            self.wake.wait(timeout=delay)
            self.wake.clear()

    def watch_catalogue(self, stop: threading.Event) -> None:
        cfg = self.config
        path = f"/api/v1/namespaces/{cfg.namespace}/configmaps"
        backoff = Backoff(cfg.backoff_min_s, cfg.backoff_max_s)
        while not stop.is_set():
            try:
                for event in self.api.watch(
                    path,
                    field_selector=f"metadata.name={cfg.catalogue}",
                    timeout_s=cfg.watch_timeout_s,
                ):
                    backoff.succeeded()
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self.offer(event.get("object") or {})
                    if stop.is_set():
                        return
            except KubeError as err:
                self._once("watch", "catalogue watch failed (retrying): %s", err)
                stop.wait(backoff.failed())

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
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._current = pending
        if self._current is not None and (
            pending is not None or self._resync_now or now >= self._due.get("sync", 0.0)
        ):
            self._resync_now = False
            self._sync(self._current, now)
        elif now >= self._due.get("handshakes", float("inf")):
            self._retry_first_handshakes(now)
        elif now >= self._due.get("observe", 0.0):
            self._due["observe"] = now + cfg.observe_s
            try:
                observed = self.syncer.observe()
                self._observed = observed
                if self.collector is not None:
                    self.collector.record_observed(observed)
            except DeviceError as err:
                self._once("observe", "cannot read the device: %s", err)
        # After the sync and the device read, so what they found is published this pass.
        retrying = "status-failures" in self._due
        if now >= self._due.get("status", 0.0) or (not retrying and self._report_stale(now)):
            self._guard("status", self._publish, now, cfg.status_check_s)
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
            cfg = self.config
            self._due[what] = now + backoff_delay(
                int(failures), cfg.backoff_min_s, cfg.backoff_max_s
            )
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
        self._first_handshakes.created(
            (u.public_key for u in result.changes.updates if u.create), now
        )
        self._schedule_handshakes()
        self._applied_generation = result.generation
        self._observed = result.observed
        if result.desired is not None:
            self._desired = result.desired
            if self.rtt is not None:
                members = ((e.name, e.overlay_ip) for e in catalogue.entries)
                reach = result.desired.path_of()
                self.rtt.set_targets(
                    result.desired.me.overlay_ip, probe_targets(members, self.config.node, reach)
                )

    def _retry_first_handshakes(self, now: float) -> None:
        """Peers created in the last seconds whose first initiation went unanswered get
        a fresh one (:mod:`~gpumesh.node_agent.wg.handshake`)."""
        try:
            observed = self.syncer.observe()
            due = self._first_handshakes.due(observed, now)
            changes = self.syncer.recreate(due) if due else PeerChanges()
        except DeviceError as err:
            self._once("handshakes", "cannot restart first handshakes: %s", err)
            self._due.pop("handshakes", None)
            return
        self._observed = apply_changes(observed, changes, self.syncer.public_key)
        if changes:
            log.info(
                "no answer yet to the first handshake with %d peer(s): sent a fresh one",
                len(changes.updates),
            )
        self._schedule_handshakes()

    def _schedule_handshakes(self) -> None:
        upcoming = self._first_handshakes.next_check()
        if upcoming is None:
            self._due.pop("handshakes", None)
        else:
            self._due["handshakes"] = upcoming

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

    def _wanted(self, rtts_of: MeshReport | None = None) -> MeshReport:
        """Our fields as they should be now (no API call); RTTs from the echo, or as
        ``rtts_of`` has them."""
        if rtts_of is None:
            measured = self.rtt.current() if self.rtt is not None else {}
            if self.collector is not None:
                self.collector.record_rtt(measured)
            policy = self.config.rtt_policy
            rtts: Mapping[str, float] = policy.bounded(measured)
            floor = policy.floor(measured)
        else:
            rtts, floor = rtts_of.rtt_ms, rtts_of.rtt_floor_ms
        return MeshReport(
            public_key=self.syncer.public_key,
            endpoints=endpoint_candidates(self.config.endpoints, self._observed_endpoint),
            peer_endpoints=handshake_endpoints(self._desired, self._observed, self.wall()),
            rtt_ms=rtts,
            rtt_floor_ms=floor,
        )

    def _rtt_due(self, published: MeshReport, wanted: MeshReport, now: float) -> bool:
        policy = self.config.rtt_policy
        return now >= self._rtt_written + self.config.rtt_publish_min_s and (
            policy.changed(published.rtt_ms, wanted.rtt_ms)
            or policy.floor_changed(published.rtt_floor_ms, wanted.rtt_floor_ms)
        )

    def _report_stale(self, now: float) -> bool:
        """Whether our fields must be written before the next periodic check: the key or
        an endpoint changed, or a new RTT round moved RTTs enough (and it is time)."""
        published = self._published
        if published is None:
            return False  # the periodic check comes first and reads the object
        rounds = self.rtt.rounds if self.rtt is not None else 0
        fresh = rounds != self._rtt_rounds
        self._rtt_rounds = rounds
        wanted = self._wanted(None if fresh else published)
        if replace(wanted, rtt_ms=published.rtt_ms, rtt_floor_ms=published.rtt_floor_ms) != (
            published
        ):
            return True
        return fresh and self._rtt_due(published, wanted, now)

    def _publish(self, now: float) -> None:
        cfg = self.config
        path = f"{GPUNODES}/{cfg.node}"
        obj = self.api.get(path)
        if obj is None:
            self._once("no-gpunode", "GPUNode %s does not exist yet: waiting", cfg.node)
            raise KubeError("GET", path, 404, "GPUNode not found")
        have, self._observed_endpoint = read_report(obj)
        wanted = self._wanted()
        rtt = self._rtt_due(have, wanted, now)
        patch = report_patch(have, wanted, rtt=rtt)
        if patch is not None:
            self.api.request("PATCH", f"{path}/status", patch, content_type=MERGE_PATCH)
            fields = patch["status"]["mesh"]
            if "publicKey" in fields:
                log.info("published public key %s for %s", wanted.public_key, cfg.node)
            if "endpoints" in fields:
                log.info("published endpoint candidates: %s", ", ".join(wanted.endpoints))
            if "peerEndpoints" in fields:
                log.info(
                    "published %d handshake-observed endpoints: %s",
                    len(wanted.peer_endpoints),
                    ", ".join(f"{n}={e}" for n, e in wanted.peer_endpoints[:8]),
                )
            if "rttMs" in fields or "rttFloorMs" in fields:
                log.info(
                    "published RTTs to %d members (the rest at least %s ms away)",
                    len(wanted.rtt_ms),
                    wanted.rtt_floor_ms,
                )
        if rtt:
            self._rtt_written = now
        if not rtt:
            wanted = replace(wanted, rtt_ms=have.rtt_ms, rtt_floor_ms=have.rtt_floor_ms)
        self._published = wanted

    def _renew_lease(self, now: float) -> None:
        cfg = self.config
        assert cfg.lease_duration_s
        base = f"/apis/coordination.k8s.io/v1/namespaces/{cfg.namespace}/leases"
        name = lease_name(cfg.node)
        if self._lease is None:
            self._lease = self.api.get(f"{base}/{name}")
        body = agent_lease_body(
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
