"""Address pools: lowest free index first, freed indices rest for a cooldown.

A pool hands out indices ``0..size-1``; the planner maps them to overlay addresses or pod
blocks. Never-used indices come from a cursor, freed ones (after their cooldown) from a
min-heap, so taking and releasing cost O(log n) and a pool of 65,000 addresses costs no
up-front list. The ledger of what is held and what is cooling is plain data, so the
operator can persist it and a restarted operator reuses nothing early.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from gpumesh.operator.mesh.config import MeshConfig


class PoolExhaustedError(RuntimeError):
    """Every index is held or cooling down."""


class IndexPool:
    """Indices ``0..size-1``; released ones are not handed out for ``cooldown_s``."""

    __slots__ = ("_cooling", "_cursor", "_free", "_held", "cooldown_s", "size")

    def __init__(self, size: int, cooldown_s: float) -> None:
        self.size = size
        self.cooldown_s = cooldown_s
        self._held: set[int] = set()
        self._cursor = 0  # every index >= cursor has never been handed out
        self._free: list[int] = []  # min-heap of indices < cursor, free and cooled
        self._cooling: deque[tuple[float, int]] = deque()  # (released_at, index), in order

    def __len__(self) -> int:
        return len(self._held)

    def held(self, index: int) -> bool:
        return index in self._held

    def take(self, now: float) -> int:
        """The lowest index that is neither held nor cooling down."""
        self._thaw(now)
        while self._free:
            index = heapq.heappop(self._free)
            if index not in self._held:
                self._held.add(index)
                return index
        # Indices at or past the cursor were never released, so none of them is cooling.
        while self._cursor < self.size:
            index = self._cursor
            self._cursor += 1
            if index not in self._held:
                self._held.add(index)
                return index
        raise PoolExhaustedError(f"all {self.size} are in use or cooling down")

    def release(self, index: int, now: float) -> None:
        if index in self._held:
            self._held.discard(index)
            self._cooling.append((now, index))

    def undo(self, index: int) -> None:
        """Return an index taken by mistake (never handed out), skipping the cooldown."""
        if index in self._held:
            self._held.discard(index)
            heapq.heappush(self._free, index)

    def restore(self, held: Iterable[int], cooling: Iterable[tuple[float, int]]) -> list[int]:
        """Load a persisted ledger into an empty pool; returns indices refused as taken twice.

        Everything below the highest recorded index that is not held or cooling becomes
        free at once: its cooldown, if it had one, was longer ago than the record shows.
        """
        assert not self._held and not self._cooling, "restore into a fresh pool"
        refused: list[int] = []
        for index in held:
            if not 0 <= index < self.size or index in self._held:
                refused.append(index)
            else:
                self._held.add(index)
        cool = sorted((t, i) for t, i in cooling if 0 <= i < self.size and i not in self._held)
        self._cooling.extend(cool)
        cooling_set = {i for _, i in cool}
        top = max([*self._held, *cooling_set], default=-1)
        self._cursor = top + 1
        self._free = [i for i in range(self._cursor) if i not in self._held | cooling_set]
        heapq.heapify(self._free)
        return refused

    def cooling(self) -> list[tuple[float, int]]:
        return list(self._cooling)

    def _thaw(self, now: float) -> None:
        while self._cooling and now - self._cooling[0][0] >= self.cooldown_s:
            _, index = self._cooling.popleft()
            if index not in self._held:
                heapq.heappush(self._free, index)


@dataclass(frozen=True)
class AddressMap:
    """Pool indices <-> overlay addresses and pod blocks, by integer arithmetic."""

    overlay_base: int
    pod_base: int
    pod_shift: int
    pod_prefix: int

    @classmethod
    def of(cls, config: MeshConfig) -> AddressMap:
        overlay, pods = config.overlay, config.pods
        return cls(
            overlay_base=int(overlay.network_address) + 1,  # skip the network address
            pod_base=int(pods.network_address),
            pod_shift=32 - config.pod_prefix,
            pod_prefix=config.pod_prefix,
        )

    def overlay_ip(self, index: int) -> str:
        return str(ipaddress.IPv4Address(self.overlay_base + index))

    def pod_cidr(self, index: int) -> str:
        network = ipaddress.IPv4Address(self.pod_base + (index << self.pod_shift))
        return f"{network}/{self.pod_prefix}"

    def overlay_index(self, address: str) -> int:
        return int(ipaddress.IPv4Address(address)) - self.overlay_base

    def pod_index(self, cidr: str) -> int:
        net = ipaddress.IPv4Network(cidr)
        if net.prefixlen != self.pod_prefix:
            return -1
        return (int(net.network_address) - self.pod_base) >> self.pod_shift
