"""Exponential backoff: the one rule by which gpumesh waits after a failure (an API
outage, NVML that will not start, a work item that failed, a Job's program failures).

The first failure waits ``first``; each further consecutive one waits twice as long, up
to ``most``. A success starts the count again.
"""

from __future__ import annotations

from dataclasses import dataclass


def backoff_delay(failures: int, first: float, most: float) -> float:
    """The wait after ``failures`` consecutive failures (0 before any)."""
    if failures <= 0:
        return 0.0
    return float(min(most, first * 2 ** min(failures - 1, 62)))


@dataclass
class Backoff:
    """Consecutive failures of one thing, and the wait after the latest."""

    first: float
    most: float
    failures: int = 0

    def failed(self) -> float:
        """Count a failure; the seconds to wait before trying again."""
        self.failures += 1
        return backoff_delay(self.failures, self.first, self.most)

    def succeeded(self) -> None:
        self.failures = 0

    @property
    def current(self) -> float:
        """The wait after the latest failure (``first`` while none has happened)."""
        return backoff_delay(max(self.failures, 1), self.first, self.most)
