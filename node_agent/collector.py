"""Collection: one batched sweep over every GPU, and a thread that waits for XID events.

The sweep runs on one worker thread (NVML calls block, and a sick driver can block for
seconds), never on the event loop. XIDs arrive on their own thread as soon as the driver
raises them and wait in an inbox for the next sweep; the agent starts that sweep at once,
so a GPU falling off the bus is reported within a second, not at the next interval.
Every NVML failure becomes data (Unknown, Lost) in the snapshot: nothing here raises.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from gpumesh.backoff import Backoff
from gpumesh.clock import Clock
from gpumesh.node_agent.health import (
    GpuHealthState,
    HealthPolicy,
    Observation,
    node_health,
    step,
)
from gpumesh.node_agent.nvml.types import (
    DeviceIdentity,
    DeviceSample,
    GpuLostError,
    GpuResetRequiredError,
    NvmlBackend,
    NvmlError,
    XidEvent,
)
from gpumesh.node_agent.snapshot import GpuSnapshot, NodeSnapshot

log = logging.getLogger(__name__)

INIT_BACKOFF_MIN_S = 1.0
INIT_BACKOFF_MAX_S = 60.0


class XidInbox:
    """XID events handed from the waiting thread to the sweep (thread-safe)."""

    def __init__(self, maxlen: int = 10_000) -> None:
        # Bounded: an XID storm (thousands of XID 13 a second) must not eat the node's memory.
        self._events: collections.deque[XidEvent] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def put(self, event: XidEvent) -> None:
        with self._lock:
            self._events.append(event)

    def drain(self) -> list[XidEvent]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events


class Collector:
    """Turns NVML into :class:`NodeSnapshot`s. Call ``sweep`` from one thread at a time."""

    def __init__(
        self,
        backend: NvmlBackend,
        node: str,
        clock: Clock,
        policy: HealthPolicy | None = None,
        inbox: XidInbox | None = None,
    ) -> None:
        self.backend = backend
        self.node = node
        self.clock = clock
        self.policy = policy or HealthPolicy()
        self.inbox = inbox or XidInbox()
        self.on_initialised: Callable[[], None] | None = None
        """Called (on the sweep thread) each time NVML comes up; the agent arms XIDs here."""
        self._initialised = False
        self._init_error: str | None = None
        self._next_init_at = 0.0
        self._init_backoff = Backoff(INIT_BACKOFF_MIN_S, INIT_BACKOFF_MAX_S)
        self._driver: str | None = None
        self._cuda: str | None = None
        self._identities: dict[int, DeviceIdentity] = {}
        self._reread: set[int] = set()
        self._health: dict[int, GpuHealthState] = {}
        self._xid_counts: dict[int, collections.Counter[int]] = {}
        self._last_xid: dict[int, int] = {}
        self._xids_total = 0
        self._sweeps = 0

    # --- NVML lifecycle ------------------------------------------------------------------

    def _ensure_initialised(self, now: float) -> bool:
        if self._initialised:
            return True
        if now < self._next_init_at:
            return False
        try:
            self.backend.init()
            self._driver = self.backend.driver_version()
            self._cuda = self.backend.cuda_version()
        except NvmlError as err:
            self._init_error = str(err)
            wait = self._init_backoff.failed()
            self._next_init_at = now + wait
            log.warning("NVML unavailable (%s); retrying in %.0f s", err, wait)
            return False
        self._initialised = True
        self._init_error = None
        self._init_backoff.succeeded()
        # After a driver reload the GPUs may enumerate differently: read identities again,
        # keeping the old ones for GPUs that do not answer (reports still name them).
        self._reread = set(self._identities)
        log.info("NVML up: driver %s, CUDA %s", self._driver, self._cuda)
        if self.on_initialised is not None:
            try:
                self.on_initialised()
            except Exception:
                log.exception("on_initialised hook failed")
        return True

    def _lose_library(self, now: float, err: NvmlError) -> None:
        log.warning("NVML failed (%s); re-initialising", err)
        self._initialised = False
        self._init_error = str(err)
        self._next_init_at = now + self._init_backoff.current
        self.backend.shutdown()

    # --- one sweep -----------------------------------------------------------------------

    def _read(self, index: int) -> Observation:
        try:
            if index not in self._identities or index in self._reread:
                identity = self.backend.identity(index)
                known = self._identities.get(index)
                if known is not None and known.uuid != identity.uuid:
                    log.warning("GPU %d is now %s (was %s)", index, identity.uuid, known.uuid)
                self._identities[index] = identity
                self._reread.discard(index)
            sample: DeviceSample = self.backend.sample(index)
        except GpuLostError:
            return Observation(lost=True)
        except GpuResetRequiredError as err:
            return Observation(reset_required=True, error=str(err))
        except NvmlError as err:
            return Observation(error=str(err))
        identity = self._identities[index]
        if sample.errors:
            log.debug("GPU %d (%s): %s", index, identity.uuid, "; ".join(sample.errors))
        return Observation(sample=sample)

    def _observe_all(self, now: float) -> dict[int, Observation]:
        if not self._ensure_initialised(now):
            error = f"NVML unavailable: {self._init_error}"
            return {i: Observation(error=error) for i in self._health}
        try:
            count = self.backend.device_count()
        except NvmlError as err:
            self._lose_library(now, err)
            return {i: Observation(error=f"NVML failed: {err}") for i in self._health}
        observations = {i: self._read(i) for i in range(count)}
        # A GPU we knew that no longer enumerates has fallen off the bus.
        for index in self._identities:
            if index >= count:
                observations[index] = Observation(lost=True)
        return observations

    def sweep(self) -> NodeSnapshot:
        started = time.perf_counter()
        now = self.clock.monotonic()
        observations = self._observe_all(now)
        by_gpu: dict[int, list[int]] = {}
        for event in self.inbox.drain():
            self._xids_total += 1
            self._xid_counts.setdefault(event.index, collections.Counter())[event.xid] += 1
            self._last_xid[event.index] = event.xid
            by_gpu.setdefault(event.index, []).append(event.xid)
            log.warning("GPU %d: XID %d", event.index, event.xid)
        for index, xids in by_gpu.items():
            if index in observations:
                prior = observations[index]
                observations[index] = Observation(
                    sample=prior.sample,
                    lost=prior.lost,
                    reset_required=prior.reset_required,
                    error=prior.error,
                    xids=prior.xids + tuple(xids),
                )
        gpus: list[GpuSnapshot] = []
        for index in sorted(observations):
            obs = observations[index]
            state = step(self._health.get(index, GpuHealthState()), obs, now, self.policy)
            previous = self._health.get(index)
            if previous is not None and previous.health != state.health:
                log.info(
                    "GPU %d: %s -> %s (%s)",
                    index,
                    previous.health,
                    state.health,
                    "; ".join(state.reasons) or "ok",
                )
            self._health[index] = state
            counts = self._xid_counts.get(index, collections.Counter())
            gpus.append(
                GpuSnapshot(
                    index=index,
                    identity=self._identities.get(index),
                    sample=obs.sample,
                    health=state.health,
                    reasons=state.reasons,
                    xid_counts=tuple(sorted(counts.items())),
                    last_xid=self._last_xid.get(index),
                )
            )
        self._sweeps += 1
        return NodeSnapshot(
            node=self.node,
            taken_at=self.clock.now(),
            monotonic=now,
            health=node_health((g.health for g in gpus), nvml_ok=self._initialised),
            gpus=tuple(gpus),
            nvml_ok=self._initialised,
            nvml_error=None if self._initialised else self._init_error,
            driver_version=self._driver,
            cuda_version=self._cuda,
            sweep_seconds=time.perf_counter() - started,
            sweeps=self._sweeps,
            xids_total=self._xids_total,
        )


class XidWatcher:
    """Waits for XID events on a daemon thread; ``on_event`` runs on that thread."""

    def __init__(
        self,
        backend: NvmlBackend,
        on_event: Callable[[XidEvent], None],
        *,
        wait_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._backend = backend
        self._on_event = on_event
        self._wait_s = wait_s
        self._max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._rearm = threading.Event()
        self._thread: threading.Thread | None = None
        self.events = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="xid-watcher", daemon=True)
            self._thread.start()

    def rearm(self) -> None:
        """Register again (NVML was re-initialised, so the old event set is gone)."""
        self._rearm.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        armed = False
        backoff = Backoff(1.0, self._max_backoff_s)
        while not self._stop.is_set():
            if self._rearm.is_set():
                self._rearm.clear()
                armed = False
            try:
                if not armed:
                    self._backend.watch_xids()
                    armed = True
                    backoff.succeeded()
                event = self._backend.wait_xid(self._wait_s)
            except NvmlError as err:
                armed = False
                wait = backoff.failed()
                log.debug("XID wait failed (%s); again in %.0f s", err, wait)
                self._stop.wait(wait)
                continue
            except Exception:
                log.exception("XID watcher error")
                self._stop.wait(backoff.failed())
                continue
            if event is not None:
                self.events += 1
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("XID handler failed")
