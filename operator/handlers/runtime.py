"""What kopf's handler threads share with the operator's own threads.

Work queues and alarm clocks run reconciles outside kopf's handlers. They read the same
live indexes, and ``kopf.event`` only works inside a context that kopf set up (it finds
the operator's settings and event queue there), so the first handler call lends both.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kopf

T = TypeVar("T")


class Runtime:
    """The live kopf indexes and a copy of a handler's context, once a handler has run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.indexes: Mapping[str, Any] | None = None
        self._context: contextvars.Context | None = None

    def remember(self, indexes: Mapping[str, Any]) -> Mapping[str, Any]:
        """Keep the indexes a handler was given (they stay live) and kopf's context."""
        with self._lock:
            if self.indexes is None:
                self.indexes = {k: v for k, v in indexes.items() if k.endswith("_index")}
            if self._context is None:
                self._context = contextvars.copy_context()
            return self.indexes

    def run(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Call ``fn(*args)`` in kopf's context; None when no handler has run yet."""
        context = self._context
        if context is None or self.indexes is None:
            return None
        return context.copy().run(fn, *args)

    def index(self, name: str) -> kopf.Index[Any, Any]:
        if self.indexes is None:
            raise RuntimeError("no kopf handler has run yet: the indexes are unknown")
        index: kopf.Index[Any, Any] = self.indexes[name]
        return index


RUNTIME = Runtime()


def frozen(index: kopf.Index[Any, Any]) -> dict[Any, list[Any]]:
    """A consistent copy of a kopf index, taken from a worker thread.

    kopf updates indexes on its event loop while sync handlers and our workers run in
    threads, so iterating a live index can fail with "dictionary changed size during
    iteration". One pass is short; retrying until a pass completes gives a consistent copy.
    """
    for _ in range(1000):
        try:
            return {key: list(store) for key, store in list(index.items())}
        except RuntimeError:
            time.sleep(0.001)
    raise RuntimeError("a kopf index kept changing while it was copied")


def entries(index: kopf.Index[Any, Any], key: Any) -> list[Any]:
    """The values stored under one key of a kopf index (a consistent copy)."""
    for _ in range(1000):
        try:
            store = index.get(key)
            return list(store) if store else []
        except RuntimeError:
            time.sleep(0.001)
    raise RuntimeError("a kopf index entry kept changing while it was read")
