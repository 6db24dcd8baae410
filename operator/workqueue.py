"""A deduplicating work queue with delays and retries, as controllers use (client-go's idea).

kopf delivers events one object at a time; a reconcile that takes an API round trip would
otherwise run once per event. Putting keys here instead collapses a burst of events for
one object into one reconcile, never runs two reconciles of one key at once, lets a
background pass (admission) ask for reconciles of the objects it decided about, and
retries a failed key with exponential backoff. Pure threading; no Kubernetes imports.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from gpumesh.backoff import backoff_delay

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Keys to process by ``workers`` threads calling ``process(key)``.

    A key added while queued is not queued twice; a key added while being processed is
    processed once more afterwards (the event may have come after the read). A key whose
    ``process`` raises comes back after ``backoff`` seconds, doubling up to
    ``max_backoff``, until it succeeds once.
    """

    def __init__(
        self,
        process: Callable[[K], None],
        *,
        workers: int = 4,
        name: str = "workqueue",
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._process = process
        self._workers = workers
        self._name = name
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._later: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._seq = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # -- producers ---------------------------------------------------------------------------

    def add(self, key: K, after: float = 0.0) -> None:
        """Process ``key`` once, no sooner than ``after`` seconds from now."""
        with self._cond:
            if after > 0:
                self._add_later(key, self._clock() + after)
            else:
                self._add_now(key)
            self._cond.notify()

    def _add_now(self, key: K) -> None:
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)

    def _add_later(self, key: K, at: float) -> None:
        due = self._due.get(key)
        if key in self._queued or (due is not None and due <= at):
            return  # it runs sooner anyway
        self._due[key] = at
        self._seq += 1
        heapq.heappush(self._later, (at, self._seq, key))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._threads:
                return
            self._stopping = False
            self._threads = [
                threading.Thread(target=self._run, name=f"{self._name}-{i}", daemon=True)
                for i in range(self._workers)
            ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout)

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._due)

    def idle(self) -> bool:
        """Nothing queued, due later or being processed (for tests and shutdown)."""
        with self._cond:
            return not (self._ready or self._due or self._active)

    # -- workers -----------------------------------------------------------------------------

    def _next(self) -> tuple[K] | None:
        """The next key to process (in a 1-tuple: a key may itself be None), or None to stop."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._promote_due()
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._active.add(key)
                    return (key,)
                timeout = self._later[0][0] - self._clock() if self._later else None
                self._cond.wait(timeout)

    def _promote_due(self) -> None:
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            at, _, key = heapq.heappop(self._later)
            if self._due.get(key) != at:
                continue  # superseded by an earlier time
            del self._due[key]
            self._add_now(key)

    def _run(self) -> None:
        while (item := self._next()) is not None:
            (key,) = item
            failed = False
            try:
                self._process(key)
            except Exception:  # one key's failure must not stop the others
                failed = True
                log.exception("%s: processing %s failed; retrying", self._name, key)
            self._done(key, failed)

    def _done(self, key: K, failed: bool) -> None:
        with self._cond:
            self._active.discard(key)
            if failed:
                count = self._failures.get(key, 0) + 1
                self._failures[key] = count
                delay = backoff_delay(count, self._backoff, self._max_backoff)
                self._add_later(key, self._clock() + delay)
            else:
                self._failures.pop(key, None)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_now(key)
            self._cond.notify()
