"""Status writes that only report progress take turns (pure threading; no Kubernetes).

A burst of new GPUClusters (a GitOps sync, a benchmark) brings a burst of "Provisioning"
status writes, each an API write and an event for every watcher of GPUClusters, at the
moment the API server is busiest creating what those clusters need. Progress is for
people and can wait its turn: such writes draw from a token bucket (``rate`` per second,
``burst`` at once), and a write that finds it empty waits in a first-come line until its
turn comes. A cluster that reaches a phase someone waits on (Ready, Pending with a
reason, Degraded) leaves the line and is written at once, so under a burst most clusters
are Ready before their turn and write once instead of twice. GitOps tools lose nothing:
until the first write the CRD's default ``status.observedGeneration: 0`` reads as not yet
reconciled, and an edit's new generation does the same until it is written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class ProgressLine(Generic[K]):
    """Turns for progress-only writes; ``rate <= 0`` means no limit (every write goes)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._line: dict[K, None] = {}
        """Keys waiting, in the order they came (a dict keeps insertion order)."""
        self._granted: set[K] = set()
        """Keys whose turn came: their next progress write goes."""
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def may_write(self, key: K) -> bool:
        """May ``key`` write its progress now? If not, it keeps (or takes) its place in
        line and the thread :meth:`start` began wakes it when its turn comes."""
        if self.rate <= 0:
            return True
        with self._cond:
            if key in self._granted:
                self._granted.discard(key)
                return True
            self._refill()
            if not self._line and self._tokens >= 1:
                self._tokens -= 1
                return True
            if key not in self._line:
                self._line[key] = None
                self._cond.notify()
            return False

    def leave(self, key: K) -> None:
        """``key`` writes something that is not only progress, or is gone: no turn."""
        with self._cond:
            self._line.pop(key, None)
            self._granted.discard(key)

    def waiting(self) -> int:
        with self._cond:
            return len(self._line)

    def serve(self) -> tuple[list[K], float | None]:
        """The keys whose turn has come, and seconds until the next turn (None: nobody
        waits). Each served key may write once."""
        with self._cond:
            return self._serve()

    def _serve(self) -> tuple[list[K], float | None]:
        self._refill()
        turns: list[K] = []
        while self._line and self._tokens >= 1:
            key = next(iter(self._line))
            del self._line[key]
            self._tokens -= 1
            self._granted.add(key)
            turns.append(key)
        if not self._line:
            return turns, None
        return turns, (1 - self._tokens) / self.rate

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    # -- the thread that serves the line ---------------------------------------------------

    def start(self, wake: Callable[[K], None]) -> None:
        """Serve the line in a thread, calling ``wake(key)`` when a key's turn comes."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, args=(wake,), name="progress-line", daemon=True
            )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _run(self, wake: Callable[[K], None]) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    turns, wait = self._serve()
                    if turns:
                        break
                    self._cond.wait(wait)
            for key in turns:
                wake(key)
