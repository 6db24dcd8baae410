"""Relay choice: the least-loaded relay-capable node of the NAT'd node's own region, else
the least-loaded one anywhere; ties broken by name.

Every packet of a NAT'd node goes through its relay, so a relay in another region adds that
distance to all its traffic: the region comes first, load second. Stability beats balance
otherwise: a NAT'd node keeps its relay for as long as that relay is relay-capable,
because moving it re-routes all of its traffic; the planner moves it only to bring it home
to its region. Lazy min-heaps of (load, name), one over all relays and one per region,
make each choice O(log R).
"""

from __future__ import annotations

import heapq

_ANY = ""
"""The heap key of every relay (region names are DNS labels, never empty)."""


class RelayBalancer:
    """Relay-capable nodes, their regions, and how many NAT'd nodes each carries."""

    __slots__ = ("_heaps", "load", "region")

    def __init__(self) -> None:
        self.load: dict[str, int] = {}
        self.region: dict[str, str | None] = {}
        self._heaps: dict[str, list[tuple[int, str]]] = {_ANY: []}

    def __contains__(self, name: object) -> bool:
        return name in self.load

    def __len__(self) -> int:
        return len(self.load)

    def add(self, name: str, region: str | None = None) -> bool:
        """Make ``name`` a relay in ``region``; True when it was not one there before."""
        if name in self.load and self.region.get(name) == region:
            return False
        self.region[name] = region
        self._set(name, self.load.get(name, 0))
        return True

    def remove(self, name: str) -> None:
        self.load.pop(name, None)  # its heap entries become stale and are skipped
        self.region.pop(name, None)

    def has_region(self, region: str | None) -> bool:
        """Whether any relay sits in ``region``."""
        return region is not None and self._top(region) is not None

    def pick(self, region: str | None = None) -> str | None:
        """The least-loaded relay of ``region`` if it has one, else of all (lowest name
        among equals), without assigning it."""
        if region is not None:
            found = self._top(region)
            if found is not None:
                return found
        return self._top(_ANY)

    def assign(self, name: str) -> None:
        self._set(name, self.load[name] + 1)

    def unassign(self, name: str) -> None:
        if name in self.load:
            self._set(name, max(0, self.load[name] - 1))

    def _top(self, key: str) -> str | None:
        heap = self._heaps.get(key)
        while heap:
            load, name = heap[0]
            if self.load.get(name) == load and (key == _ANY or self.region.get(name) == key):
                return name
            heapq.heappop(heap)
        return None

    def _set(self, name: str, load: int) -> None:
        self.load[name] = load
        region = self.region.get(name)
        for key in (_ANY, region) if region else (_ANY,):
            heap = self._heaps.setdefault(key, [])
            heapq.heappush(heap, (load, name))
            if len(heap) > 4 * len(self.load) + 64:
                self._compact(key)

    def _compact(self, key: str) -> None:
        heap = [(n, k) for k, n in self.load.items() if key == _ANY or self.region.get(k) == key]
        heapq.heapify(heap)
        self._heaps[key] = heap
