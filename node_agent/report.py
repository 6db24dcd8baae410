"""Reports into Kubernetes: GPUNode status, Node labels, taint and condition, and a Lease.

Each sync compares the latest snapshot with the objects as last read (``desired.py``) and
writes only what differs; objects are re-read every ``resync_s`` so that drift (a label
or the taint removed by hand) is repaired, and the node's own GPUNode is watched (field
selector on its name) so a spec change, such as a verification nonce, is seen at once.
The sync client runs on worker threads (one for writes, one for the watch). When the API
server is unreachable the agent keeps collecting and serving metrics, retries with
exponential backoff and jitter, and on return re-reads everything and writes what changed
meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

from gpumesh.api.base import GROUP, VERSION
from gpumesh.api.gpunode import Challenge, Proof
from gpumesh.api.nodes import lease_name
from gpumesh.backoff import Backoff
from gpumesh.clock import Clock
from gpumesh.node_agent.aio import wait_any
from gpumesh.node_agent.desired import (
    agent_lease_body,
    condition_patch,
    new_gpunode,
    node_patch,
    status_patch,
)
from gpumesh.node_agent.kube import MERGE_PATCH, STRATEGIC_MERGE_PATCH, KubeApi, KubeError
from gpumesh.node_agent.metrics import AgentVitals
from gpumesh.node_agent.prove import ProofRunner
from gpumesh.node_agent.snapshot import NodeSnapshot

log = logging.getLogger(__name__)

GPUNODES: Final = f"/apis/{GROUP}/{VERSION}/gpunodes"


@dataclass(frozen=True)
class ReportConfig:
    """Where and how often to report."""

    node: str
    supplier: str | None = None
    region: str | None = None
    price_per_gpu_hour: str | None = None
    head_capable: bool = False
    """spec.headCapable of a GPUNode the agent creates (an existing one is left alone)."""
    public_endpoint: str | None = None
    """spec.publicEndpoint of a GPUNode the agent creates."""
    namespace: str = "gpumesh-system"
    lease_duration_s: int = 40
    lease_renew_s: float = 10.0
    heartbeat_s: float = 30.0
    resync_s: float = 60.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass
class _Cached:
    obj: dict[str, Any] | None
    read_at: float


class Reporter:
    """Keeps the API objects in line with the latest snapshot."""

    def __init__(
        self,
        api: KubeApi,
        config: ReportConfig,
        clock: Clock,
        prover: ProofRunner | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.clock = clock
        self.prover = prover
        self._gpunode: _Cached | None = None
        self._node: _Cached | None = None
        self._lease: dict[str, Any] | None = None
        self._lease_due = float("-inf")
        self._latest: NodeSnapshot | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._said: set[str] = set()
        self._spec_changed = threading.Event()
        self.writes = 0
        self.errors = 0
        self.api_up = False
        if prover is not None:
            prover.on_done = self._wake_threadsafe

    # --- paths ---------------------------------------------------------------------------

    @property
    def gpunode_path(self) -> str:
        return f"{GPUNODES}/{self.config.node}"

    @property
    def node_path(self) -> str:
        return f"/api/v1/nodes/{self.config.node}"

    @property
    def lease_path(self) -> str:
        ns = self.config.namespace
        return f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"

    # --- helpers -------------------------------------------------------------------------

    def _once(self, key: str, message: str, *args: object) -> None:
        """Log a standing problem once, not every sweep."""
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)

    def _write(
        self, method: str, path: str, body: Any, content_type: str = MERGE_PATCH
    ) -> dict[str, Any]:
        result = self.api.request(method, path, body, content_type=content_type)
        self.writes += 1
        return result

    def _fresh(self, cached: _Cached | None, now: float) -> bool:
        return cached is not None and now - cached.read_at < self.config.resync_s

    def vitals(self) -> AgentVitals:
        result = self.prover.result() if self.prover else None
        return AgentVitals(
            api_enabled=True,
            api_up=self.api_up,
            api_writes=self.writes,
            api_errors=self.errors,
            verification=_stage(result),
        )

    # --- one sync (worker thread) --------------------------------------------------------

    def sync(self, snapshot: NodeSnapshot) -> None:
        """Bring every object in line; raises KubeError when the API is unreachable."""
        now = self.clock.monotonic()
        for part in (self._sync_lease, self._sync_gpunode, self._sync_node):
            try:
                part(snapshot, now)
            except KubeError as err:
                if err.transient:
                    raise
                # Refused (RBAC, validation): the other parts may still go through.
                self.errors += 1
                self._once(f"{part.__name__}:{err.status}", "%s", err)

    def _sync_lease(self, snapshot: NodeSnapshot, now: float) -> None:
        if now < self._lease_due:
            return
        cfg = self.config
        name = lease_name(cfg.node)
        if self._lease is None:
            self._lease = self.api.get(f"{self.lease_path}/{name}")
        body = agent_lease_body(
            cfg.node,
            cfg.namespace,
            holder=cfg.node,
            duration_s=cfg.lease_duration_s,
            now=self.clock.now(),
            current=self._lease,
        )
        try:
            if self._lease is None:
                self._lease = self._write("POST", self.lease_path, body, "application/json")
            else:
                self._lease = self._write(
                    "PUT", f"{self.lease_path}/{name}", body, "application/json"
                )
        except KubeError as err:
            self._lease = None  # re-read next time (409: someone else wrote it)
            if err.status == 404:
                self._once("lease-ns", "namespace %s is missing: no Lease yet", cfg.namespace)
                self._lease_due = now + cfg.lease_renew_s
                return
            raise
        self._lease_due = now + cfg.lease_renew_s

    def _read_gpunode(self, now: float) -> dict[str, Any] | None:
        changed = self._spec_changed.is_set()
        if changed or not self._fresh(self._gpunode, now):
            self._spec_changed.clear()
            self._gpunode = _Cached(self.api.get(self.gpunode_path), now)
        assert self._gpunode is not None
        if self._gpunode.obj is not None:
            return self._gpunode.obj
        cfg = self.config
        if not (cfg.supplier and cfg.region and cfg.price_per_gpu_hour):
            self._once(
                "no-gpunode",
                "GPUNode %s does not exist and --supplier/--region/--price are not all set: "
                "waiting for the supplier side to create it",
                cfg.node,
            )
            return None
        body = new_gpunode(
            cfg.node,
            cfg.supplier,
            cfg.region,
            cfg.price_per_gpu_hour,
            head_capable=cfg.head_capable,
            public_endpoint=cfg.public_endpoint,
        )
        try:
            created = self._write("POST", GPUNODES, body, "application/json")
        except KubeError as err:
            if err.status != 409:
                raise
            created = self.api.get(self.gpunode_path) or {}
        log.info("created GPUNode %s", cfg.node)
        self._gpunode = _Cached(created, now)
        return created

    def _sync_gpunode(self, snapshot: NodeSnapshot, now: float) -> None:
        obj = self._read_gpunode(now)
        if obj is None:
            return
        self._maybe_prove(obj, snapshot)
        proof = self.prover.result() if self.prover else None
        patch = status_patch(
            obj, snapshot, now=self.clock.now(), heartbeat_s=self.config.heartbeat_s, proof=proof
        )
        if patch is None:
            return
        try:
            updated = self._write("PATCH", f"{self.gpunode_path}/status", patch)
        except KubeError as err:
            if err.status == 404:
                self._gpunode = None
            raise
        self._gpunode = _Cached(updated, now)

    def _maybe_prove(self, obj: Mapping[str, Any], snapshot: NodeSnapshot) -> None:
        if self.prover is None or not snapshot.nvml_ok:
            return
        raw = (obj.get("status") or {}).get("challenge")
        if not raw:
            return
        try:
            challenge = Challenge.model_validate(raw)
        except ValidationError as err:
            self._once("challenge", "the operator's challenge is unreadable: %s", err)
            return
        self.prover.offer(challenge, {i.uuid: i.index for i in snapshot.identities})

    def _sync_node(self, snapshot: NodeSnapshot, now: float) -> None:
        if not self._fresh(self._node, now):
            self._node = _Cached(self.api.get(self.node_path), now)
        assert self._node is not None
        node = self._node.obj
        if node is None:
            self._once(
                "no-node", "Node %s not found: no labels, taint or condition", self.config.node
            )
            return
        for attempt in (1, 2):
            patch = node_patch(node, snapshot)
            if patch is None:
                break
            try:
                node = self._write("PATCH", self.node_path, patch)
                break
            except KubeError as err:
                if err.status != 409 or attempt == 2:
                    self._node = None
                    raise
                node = self.api.get(self.node_path) or {}
        cond = condition_patch(node, snapshot, now=self.clock.now())
        if cond is not None:
            node = self._write("PATCH", f"{self.node_path}/status", cond, STRATEGIC_MERGE_PATCH)
        self._node = _Cached(node, self._node.read_at if self._node else now)

    # --- the GPUNode watch (own thread) --------------------------------------------------

    def watch_spec(self, stop: threading.Event) -> None:
        """Watch this node's GPUNode (a field selector on its name) and mark the cached copy
        stale when its spec changes, so a new nonce or region is acted on within a second
        rather than at the next resync. Status writes (ours) do not bump the generation
        and are ignored."""
        backoff = Backoff(self.config.backoff_min_s, self.config.backoff_max_s)
        selector = f"metadata.name={self.config.node}"
        while not stop.is_set():
            try:
                for event in self.api.watch(GPUNODES, field_selector=selector):
                    if stop.is_set():
                        return
                    self._on_gpunode_event(event)
                backoff.succeeded()
            except KubeError as err:
                wait = backoff.failed()
                log.debug("GPUNode watch ended (%s); again in %.0f s", err, wait)
                stop.wait(wait)
            except Exception:
                log.exception("GPUNode watch failed")
                stop.wait(backoff.failed())

    def _on_gpunode_event(self, event: Mapping[str, Any]) -> None:
        obj = event.get("object") or {}
        generation = (obj.get("metadata") or {}).get("generation")
        cached = self._gpunode
        seen = (cached.obj or {}) if cached else {}
        known = (seen.get("metadata") or {}).get("generation")
        challenge = (obj.get("status") or {}).get("challenge")
        new_challenge = challenge != (seen.get("status") or {}).get("challenge")
        if event.get("type") == "DELETED" or generation != known or new_challenge:
            self._spec_changed.set()
            self._wake_threadsafe()

    # --- the loop (event loop side) ------------------------------------------------------

    def offer(self, snapshot: NodeSnapshot) -> None:
        """Hand over the latest snapshot (event loop thread)."""
        self._latest = snapshot
        if self._wake is not None:
            self._wake.set()

    def _wake_threadsafe(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Sync on every new snapshot and at least every Lease period until ``stop``."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kube")
        backoff = Backoff(self.config.backoff_min_s, self.config.backoff_max_s)
        watch_stop = threading.Event()
        watcher = threading.Thread(
            target=self.watch_spec, args=(watch_stop,), name="gpunode-watch", daemon=True
        )
        watcher.start()
        try:
            while not stop.is_set():
                delay = self.config.lease_renew_s
                backing_off = False
                snapshot = self._latest
                self._wake.clear()
                if snapshot is not None:
                    try:
                        await self._loop.run_in_executor(pool, self.sync, snapshot)
                    except Exception as err:
                        delay = self._on_failure(err, backoff.failed())
                        backing_off = True
                    else:
                        if not self.api_up:
                            log.info("Kubernetes API reachable; reports are up to date")
                        self.api_up = True
                        backoff.succeeded()
                # New snapshots wake the loop, except while backing off from an outage.
                await wait_any(stop, None if backing_off else self._wake, seconds=delay)
        finally:
            watch_stop.set()  # the thread ends at its next event or watch timeout
            pool.shutdown(wait=False, cancel_futures=True)

    def _on_failure(self, err: Exception, backoff: float) -> float:
        self.errors += 1
        if isinstance(err, KubeError):
            if self.api_up or self.errors == 1:
                log.warning("Kubernetes API unreachable (%s); retrying with backoff", err)
        else:
            log.error("report failed", exc_info=err)
        self.api_up = False
        # Everything is read again once the API answers: it may have changed meanwhile.
        self._gpunode = self._node = None
        self._lease = None
        self._lease_due = float("-inf")
        return backoff * random.uniform(0.8, 1.2)


def _stage(proof: Proof | None) -> str | None:
    """How far the agent's answer to the current challenge got (for its metrics)."""
    if proof is None:
        return None
    return "opened" if proof.openings else "committed"
