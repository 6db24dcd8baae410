"""Mesh round-trip times: the echo wire format, per-peer samples, what to publish (pure).

Each agent answers a tiny UDP echo on its overlay address and probes every member it can
reach, over the same WireGuard path (direct or through relays) that Ray traffic takes.
Why UDP and not ICMP: the supplier chart's agent has NET_ADMIN and nothing else, so it
may not open raw ICMP sockets (NET_RAW), unprivileged ICMP sockets are off by default
(``net.ipv4.ping_group_range = 1 0``), and running ``ping`` per peer would fork a process
per member per round. A UDP socket needs no privilege, and each reply carries the
responder's own turnaround (kernel receive time to its send), which the prober subtracts,
so a busy responder does not inflate the figure. WireGuard handshake timing is no RTT
(handshakes are minutes apart and include crypto on both sides).

The I/O (socket, thread) is in :mod:`gpumesh.node_agent.wg.echo`.
"""

from __future__ import annotations

import math
import statistics
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

DEFAULT_RTT_PORT: Final = 51871
"""UDP port of the echo on every overlay address (one value across the mesh)."""

MAGIC: Final = b"gmrt"
VERSION: Final = 1
REQUEST: Final = 0
REPLY: Final = 1
_WIRE: Final = struct.Struct("!4sBB2xIQQ")
"""magic, version, kind, seq, the prober's send time (ns), the responder's turnaround (ns)."""
PACKET_SIZE: Final = _WIRE.size


@dataclass(frozen=True, slots=True)
class Echo:
    """One echo packet."""

    kind: int
    seq: int
    sent_ns: int
    turnaround_ns: int = 0

    def encode(self) -> bytes:
        return _WIRE.pack(MAGIC, VERSION, self.kind, self.seq, self.sent_ns, self.turnaround_ns)

    def reply(self, turnaround_ns: int) -> Echo:
        return Echo(REPLY, self.seq, self.sent_ns, max(0, turnaround_ns))


def decode(data: bytes) -> Echo | None:
    """The echo in ``data``, or None for anything else (never raises: it faces the net)."""
    if len(data) != PACKET_SIZE:
        return None
    magic, version, kind, seq, sent_ns, turnaround_ns = _WIRE.unpack(data)
    if magic != MAGIC or version != VERSION or kind not in (REQUEST, REPLY):
        return None
    return Echo(kind, seq, sent_ns, turnaround_ns)


def round_trip_ms(echo: Echo, received_ns: int) -> float | None:
    """Path round trip of a reply received at ``received_ns`` (same clock as sent_ns),
    less the responder's turnaround; None when the clocks make no sense (a step)."""
    rtt_ns = received_ns - echo.sent_ns - echo.turnaround_ns
    return rtt_ns / 1e6 if rtt_ns >= 0 else None


@dataclass
class RttTable:
    """Recent samples per member; the median of the last ``window`` is its RTT.

    A member that missed ``max_losses`` rounds in a row has no RTT (unknown, not
    infinite: placement then neither counts nor excludes it). Members that stop being
    probed are forgotten.
    """

    window: int = 5
    max_losses: int = 3
    _samples: dict[str, deque[float]] = field(default_factory=dict)
    _losses: dict[str, int] = field(default_factory=dict)

    def record(self, results: Mapping[str, float | None]) -> None:
        """One probe round: member -> RTT in ms, None when no reply came."""
        for gone in [n for n in self._samples if n not in results]:
            del self._samples[gone]
            self._losses.pop(gone, None)
        for node, rtt in results.items():
            if rtt is None:
                lost = self._losses.get(node, 0) + 1
                self._losses[node] = lost
                if lost >= self.max_losses:
                    self._samples.pop(node, None)
                continue
            self._losses[node] = 0
            samples = self._samples.get(node)
            if samples is None:
                samples = self._samples[node] = deque(maxlen=self.window)
            samples.append(rtt)

    def current(self) -> dict[str, float]:
        return {n: statistics.median(s) for n, s in self._samples.items() if s}


@dataclass(frozen=True)
class RttPolicy:
    """How much of the table goes into ``status.mesh.rttMs``, and when it is rewritten.

    Bounded, because every GPUNode write reaches every watcher of GPUNodes: the nearest
    ``max_peers`` members only. Rewritten only when a member came or went from that set,
    or an RTT moved by more than ``min_change_ms`` and ``min_change_ratio`` of its
    published value; the agent also spaces such writes (``--rtt-publish-min``).
    """

    max_peers: int = 256
    min_change_ms: float = 1.0
    min_change_ratio: float = 0.2

    def bounded(self, rtts: Mapping[str, float]) -> dict[str, float]:
        """The nearest ``max_peers``, rounded to 10 us (sorted by name for stable output)."""
        nearest = sorted(rtts.items(), key=lambda item: (item[1], item[0]))[: self.max_peers]
        return {n: round(ms, 2) for n, ms in sorted(nearest)}

    def floor(self, rtts: Mapping[str, float]) -> float | None:
        """The least RTT left out by ``bounded`` (rounded down to 10 us), or None when
        nothing is left out: placement reads it as a lower bound for unlisted peers."""
        if len(rtts) <= self.max_peers:
            return None
        left_out = sorted(rtts.values())[self.max_peers]
        return math.floor(left_out * 100) / 100

    def changed(self, published: Mapping[str, float], wanted: Mapping[str, float]) -> bool:
        """Whether ``wanted`` differs enough from ``published`` to be written."""
        if published.keys() != wanted.keys():
            return True
        return any(self._moved(published[n], ms) for n, ms in wanted.items())

    def floor_changed(self, published: float | None, wanted: float | None) -> bool:
        """Whether the floor appeared, went, or moved enough to be written."""
        if published is None or wanted is None:
            return published != wanted
        return self._moved(published, wanted)

    def _moved(self, published: float, wanted: float) -> bool:
        return abs(wanted - published) > max(self.min_change_ms, self.min_change_ratio * published)


def probe_targets(
    members: Iterable[tuple[str, str]], me: str, reachable: Iterable[str]
) -> dict[str, str]:
    """member -> overlay address, for the members this node has a path to."""
    wanted = set(reachable)
    return {name: ip for name, ip in members if name in wanted and name != me}
