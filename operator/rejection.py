"""Writes the API server refused for good, and how long a refusal stands (pure).

A 4xx answer other than a conflict or throttling (a field KubeRay's schema refuses, a
cluster's admission policy saying no) will come back the same however often the write is
tried. So a refusal is told once, as a ``Stalled`` condition and an event, and the write
waits until the object's author changes it (a new generation) or, in case the cluster
changed instead (a policy relaxed), a long pause has passed.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

RETRY_AFTER: Final = timedelta(minutes=5)
"""How long a refusal stands while the object stays the same."""

_TRANSIENT: Final = frozenset({408, 409, 429})
"""Request timeout, conflict and throttling: worth retrying soon."""


def is_permanent(status: int) -> bool:
    """Would the same write be refused again? (4xx, other than the transient ones)."""
    return 400 <= status < 500 and status not in _TRANSIENT


class Rejected(Exception):  # noqa: N818 - what happened, as the condition reason says it
    """The API server refused a write for a reason retrying cannot fix."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}")


@dataclass(frozen=True)
class Refusal:
    """The API server's last word on one object's write, for the generation it was for."""

    generation: int
    message: str
    retry_at: datetime
    """When the write is tried again though the object did not change."""


class Refusals:
    """Per object, the refusal that still stands (a cache: after a restart the write is
    tried once more and refused again, which is one request, not a loop)."""

    def __init__(self, retry_after: timedelta = RETRY_AFTER) -> None:
        self.retry_after = retry_after
        self._by_key: dict[Hashable, Refusal] = {}

    def record(
        self, key: Hashable, generation: int, what: str, err: Rejected, now: datetime
    ) -> Refusal:
        """Remember that writing ``what`` for ``key`` at ``generation`` was refused."""
        message = f"the API server refused {what} ({err.status} {err.reason}): {err.message}"
        refusal = Refusal(generation, message, now + self.retry_after)
        self._by_key[key] = refusal
        return refusal

    def standing(self, key: Hashable, generation: int, now: datetime) -> Refusal | None:
        """The refusal that still holds for ``key`` at ``generation``, if any.

        A new generation, or the pause passed, ends it: the write is tried again.
        """
        refusal = self._by_key.get(key)
        if refusal is None:
            return None
        if refusal.generation != generation or now >= refusal.retry_at:
            del self._by_key[key]
            return None
        return refusal

    def forget(self, key: Hashable) -> None:
        self._by_key.pop(key, None)
