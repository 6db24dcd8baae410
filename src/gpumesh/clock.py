"""Time as gpumesh sees it: a system clock, and a manual one so tests run in no time."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds for intervals and hysteresis, wall time for what is published."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime:
        """Aware UTC wall time."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ManualClock:
    """A clock that moves only when told; ``sleep`` advances it instead of waiting.

    Tests drive hours of scripted faults in microseconds with it. It is thread-safe, but
    a waiter sleeping on it moves time for everyone, so use one driver per clock.
    """

    def __init__(self, start: float = 0.0, wall: datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._t = start
        self._start = start
        self._wall = wall or datetime(2026, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        with self._lock:
            return self._t

    def now(self) -> datetime:
        with self._lock:
            return self._wall + timedelta(seconds=self._t - self._start)

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._t += seconds
