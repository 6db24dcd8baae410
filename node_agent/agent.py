"""The agent: one asyncio loop that sweeps, serves metrics and reports, on any backend.

Threads, and why each exists: ``nvml`` runs sweeps (NVML calls block); ``xid-watcher``
waits in ``nvmlEventSetWait``; ``kube`` runs the sync Kubernetes client; ``metrics-http``
answers scrapes from the cache; ``proof`` answers the operator's proof-of-GPU challenge. The
event loop only schedules them, so none can stall another: a hung driver does not stop
scrapes or the heartbeat Lease, an API outage does not stop collection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

from gpumesh.clock import Clock, SystemClock
from gpumesh.node_agent.aio import wait_any
from gpumesh.node_agent.cheats import hooks
from gpumesh.node_agent.collector import Collector, XidInbox, XidWatcher
from gpumesh.node_agent.health import HealthPolicy
from gpumesh.node_agent.kube import KubeApi
from gpumesh.node_agent.metrics import AgentVitals, MetricsCache, agent_routes
from gpumesh.node_agent.nvml.types import NvmlBackend, XidEvent
from gpumesh.node_agent.prove import ProofRunner, select_prover
from gpumesh.node_agent.report import ReportConfig, Reporter
from gpumesh.node_agent.snapshot import NodeSnapshot
from gpumesh.serve import HttpServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    """The agent's one settings object (the CLI fills it from flags)."""

    node: str
    interval_s: float = 5.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9440
    """None: no HTTP server (tests that read the cache directly)."""
    dcgm_names: bool = False
    policy: HealthPolicy = field(default_factory=HealthPolicy)
    min_sweep_gap_s: float = 0.2
    """An XID starts a sweep at once, but storms get at most one sweep per gap."""
    xid_wait_s: float = 1.0


class Agent:
    """Wires backend, collector, metrics, reporter and prover together."""

    def __init__(
        self,
        config: AgentConfig,
        backend: NvmlBackend,
        *,
        clock: Clock | None = None,
        api: KubeApi | None = None,
        report: ReportConfig | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.clock = clock or SystemClock()
        self.inbox = XidInbox()
        self.collector = Collector(backend, config.node, self.clock, config.policy, self.inbox)
        self.collector.on_initialised = self._nvml_up
        self.watcher = XidWatcher(backend, self._on_xid, wait_s=config.xid_wait_s)
        self.metrics = MetricsCache(dcgm_names=config.dcgm_names)
        cheat = hooks(getattr(backend, "cheat", None), api, config.node)
        self.prover = ProofRunner(
            select_prover(getattr(backend, "is_fake", False), cheat.tamper),
            config.node,
            self.clock,
            delay_until=cheat.delay_until,
            answer_for=cheat.answer_for,
        )
        self.reporter: Reporter | None = None
        if api is not None:
            self.reporter = Reporter(
                api, report or ReportConfig(node=config.node), self.clock, self.prover
            )
        self.server: HttpServer | None = None
        self.latest: NodeSnapshot | None = None
        self._last_sweep_at: float | None = None
        self._started_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._watching = False

    # --- called from worker threads ------------------------------------------------------

    def _nvml_up(self) -> None:
        if self._watching:
            self.watcher.rearm()
        else:
            self._watching = True
            self.watcher.start()

    def _on_xid(self, event: XidEvent) -> None:
        self.inbox.put(event)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    def vitals(self) -> AgentVitals:
        if self.reporter is not None:
            return self.reporter.vitals()
        return AgentVitals()

    def sweep_now(self) -> NodeSnapshot:
        """One sweep, then the metrics cache re-rendered from it."""
        snapshot = self.collector.sweep()
        self.metrics.update(snapshot, self.vitals())
        self.latest = snapshot
        self._last_sweep_at = time.monotonic()
        return snapshot

    def healthz(self) -> tuple[bool, str]:
        """Liveness of the agent itself (not of the GPUs: a bad GPU is no reason to restart)."""
        now = time.monotonic()
        limit = max(3 * self.config.interval_s, 30.0)
        if self._last_sweep_at is None:
            ok = now - self._started_at < limit
            return ok, "starting" if ok else "no sweep has finished"
        age = now - self._last_sweep_at
        snap = self.latest
        health = snap.health if snap else "Unknown"
        ok = age < limit
        return ok, f"{'ok' if ok else 'stalled'}: last sweep {age:.1f} s ago, node {health}"

    # --- the loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever)."""
        stop = stop or asyncio.Event()
        loop = self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nvml")
        if self.config.metrics_port is not None:
            self.server = HttpServer(
                self.config.metrics_host,
                self.config.metrics_port,
                agent_routes(self.metrics, self.healthz),
            ).start("metrics-http")
            log.info("serving /metrics and /healthz on port %d", self.server.port)
        report_task = None
        if self.reporter is not None:
            report_task = asyncio.create_task(self.reporter.run(stop), name="reporter")
        try:
            while not stop.is_set():
                started = loop.time()
                try:
                    snapshot = await loop.run_in_executor(pool, self.sweep_now)
                except Exception:
                    log.exception("sweep failed")  # never fatal: the next sweep tries again
                else:
                    if self.reporter is not None:
                        self.reporter.offer(snapshot)
                remaining = self.config.interval_s - (loop.time() - started)
                await wait_any(stop, self._wake, seconds=remaining)
                if self._wake.is_set() and not stop.is_set():
                    self._wake.clear()
                    gap = self.config.min_sweep_gap_s - (loop.time() - started)
                    if gap > 0:
                        await asyncio.sleep(gap)
        finally:
            stop.set()
            if report_task is not None:
                await asyncio.gather(report_task, return_exceptions=True)
            self.watcher.stop()
            if self.server is not None:
                self.server.stop()
            await loop.run_in_executor(pool, self.backend.shutdown)
            pool.shutdown(wait=False)
