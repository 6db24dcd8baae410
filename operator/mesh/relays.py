"""Relay choice: the least-loaded relay-capable node, ties broken by name.

Stability beats balance here: a NAT'd node keeps its relay for as long as that relay is
relay-capable, because moving it re-routes all of its traffic. New NAT'd nodes and those
whose relay left go to the least-loaded relay, so load evens out as nodes come and go.
A lazy min-heap of (load, name) makes each choice O(log R).
"""

from __future__ import annotations

import heapq


class RelayBalancer:
    """Relay-capable nodes and how many NAT'd nodes each carries."""

    __slots__ = ("_heap", "load")

    def __init__(self) -> None:
        self.load: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __contains__(self, name: object) -> bool:
        return name in self.load

    def __len__(self) -> int:
        return len(self.load)

    def add(self, name: str) -> None:
        if name not in self.load:
            self.load[name] = 0
            heapq.heappush(self._heap, (0, name))

    def remove(self, name: str) -> None:
        self.load.pop(name, None)  # its heap entries become stale and are skipped

    def pick(self) -> str | None:
        """The least-loaded relay (lowest name among equals), without assigning it."""
        heap = self._heap
        while heap:
            load, name = heap[0]
            if self.load.get(name) == load:
                return name
            heapq.heappop(heap)
        return None

    def assign(self, name: str) -> None:
        self._set(name, self.load[name] + 1)

    def unassign(self, name: str) -> None:
        if name in self.load:
            self._set(name, max(0, self.load[name] - 1))

    def _set(self, name: str, load: int) -> None:
        self.load[name] = load
        heapq.heappush(self._heap, (load, name))
        if len(self._heap) > 4 * len(self.load) + 64:
            self._heap = [(n, k) for k, n in self.load.items()]
            heapq.heapify(self._heap)
